local fibril = require "fibril"
local json = require "fibril.json"
local url = require "fibril.url"

describe("fibril.json", function()
  it("is reachable as fibril.json and round-trips values", function()
    assert.are.equal(json, fibril.json)
    local v = { a = 1, list = { 1, 2, 3 }, nested = { ok = true, s = "é\n\"" } }
    assert.are.same(v, json.decode(json.encode(v)))
  end)

  it("encodes an empty table as an object unless it is marked as an array", function()
    assert.are.equal("{}", json.encode({}))
    assert.are.equal("[]", json.encode(json.array({})))
    assert.are.equal("[1,2]", json.encode(json.array({ 1, 2 })))
  end)

  it("decodes an empty array as one that encodes back as [], wherever it is", function()
    assert.are.equal("[]", json.encode(json.decode("[]")))
    assert.are.equal('[[],{"c":[]}]', json.encode(json.decode('[[],{"c":[ ]}]')))
    assert.are.equal('{"a":[]}', json.encode(json.decode('{"a":[]}')))
    local v = json.decode('{"a":[ \n ],"b":[1]}')
    assert.are.equal(json.array_mt, getmetatable(v.a))
    assert.are.equal(0, #v.a)
    assert.is_nil(getmetatable(json.decode("{}")))
  end)

  it("leaves [] inside strings alone when it marks empty arrays", function()
    local v = json.decode('{"s":"x[]y \\\"[]\\\\","t":[],"u":"\\u0000"}')
    assert.are.equal('x[]y "[]\\', v.s)
    assert.are.equal("\0", v.u)
    assert.are.equal(json.array_mt, getmetatable(v.t))
    assert.is_nil((json.try_decode('{"s":"[] unterminated')))
    assert.is_nil((json.try_decode("[\f]")))       -- only JSON's own whitespace counts
  end)

  it("keeps JSON null distinguishable", function()
    local v = json.decode('{"a":null}')
    assert.are.equal(json.null, v.a)
    assert.are.equal('{"a":null}', json.encode({ a = json.null }))
  end)

  it("raises errors that say json and what went wrong", function()
    local ok, err = pcall(json.decode, '{"a":')
    assert.is_false(ok)
    assert.matches("^json: cannot decode:", err)
    ok, err = pcall(json.encode, { f = function() end })
    assert.is_false(ok)
    assert.matches("^json: cannot encode:", err)
    assert.is_nil((json.try_decode("nope")))
  end)

  it("refuses NaN and infinity instead of writing invalid JSON", function()
    assert.has_error(function() json.encode({ x = 0 / 0 }) end)
    assert.has_error(function() json.encode({ x = math.huge }) end)
  end)

  local util = { deep_equal = function(a, b) return require("luassert.util").deepcompare(a, b, true) end }

  it("writes the same bytes as cjson alone, for values its fast path takes and those it does not", function()
    local seed = os.time()
    math.randomseed(seed)
    local strings = { "", "a", "Hello, World!", "q\"b\\s/\n\t\0\1", "\xc3\xa9t\xc3\xa9", "\xff" }
    local numbers = { 0, -0.0, 1, -1, 42, 2 ^ 31, -2 ^ 40, 99999999999999, 1e14, -1e14, 1e15, 0.5,
                      -3.25, 1 / 3, 1e-7, 123456.789, 2 ^ 53 }
    local function value(depth)
      local r = math.random(depth > 3 and 6 or 10)
      if r == 1 then return strings[math.random(#strings)]
      elseif r == 2 or r == 3 then return numbers[math.random(#numbers)]
      elseif r == 4 then return math.random(2) == 1
      elseif r == 5 then return json.null
      elseif r == 6 then return math.random(-1000, 1000)
      elseif r == 7 then                   -- a sequence, sometimes marked, sometimes empty
        local t = {}
        for i = 1, math.random(0, 4) do t[i] = value(depth + 1) end
        return math.random(2) == 1 and json.array(t) or t
      elseif r == 8 then                   -- an object
        local t = {}
        for _ = 1, math.random(0, 4) do t[strings[math.random(#strings)] .. math.random(9)] = value(depth + 1) end
        return t
      elseif r == 9 then                   -- shapes the fast path leaves to cjson
        local t = { value(depth + 1), value(depth + 1) }
        local k = math.random(4)
        if k == 1 then t[4] = 1                                  -- a hole
        elseif k == 2 then t.name = "x"                          -- mixed keys
        elseif k == 3 then t = { [3] = true, [10] = false }      -- sparse
        else t = setmetatable({ 1 }, { __index = {} }) end       -- another metatable
        return t
      else
        return { nested = value(depth + 1), list = { value(depth + 1), value(depth + 1) } }
      end
    end
    -- cjson alone goes through a copy of any table holding an empty json.array, and a copy may
    -- list its keys in another order: those are compared decoded.
    local function copied(v)
      if type(v) ~= "table" then return false end
      if getmetatable(v) == json.array_mt and next(v) == nil then return true end
      for _, x in pairs(v) do if copied(x) then return true end end
      return false
    end
    for i = 1, 3000 do
      local v = value(0)
      local ok, want = json._encode_cjson(v)
      assert(ok, want)
      local got = json.encode(v)
      local same = got == want
      if not same and copied(v) then same = util.deep_equal(json.decode(got), json.decode(want)) end
      if not same then
        error(("value %d (seed %d): json.encode gave %s, cjson %s"):format(i, seed, got, want))
      end
    end
  end)

  it("refuses nesting deeper than 200 levels instead of exhausting the C stack", function()
    local deep = ("["):rep(1000) .. ("]"):rep(1000)
    assert.is_nil((json.try_decode(deep)))
  end)
end)

describe("fibril.url", function()
  it("decodes percent escapes, and plus as space in forms", function()
    assert.are.equal("a b/c", url.decode("a%20b%2Fc"))
    assert.are.equal("a+b", url.decode("a+b"))
    assert.are.equal("a b", url.decode("a+b", true))
  end)

  it("encodes everything but unreserved characters", function()
    assert.are.equal("a%20b%2Fc~-._", url.encode("a b/c~-._"))
  end)

  it("parses query strings with repeated keys and key[] lists", function()
    assert.are.same({ a = "1", b = { "2", "3" }, c = { "x" }, d = "", e = "f g" },
                    url.parse_query("a=1&b=2&b=3&c[]=x&d&e=f+g"))
  end)

  it("reads at most max_pairs pairs from a hostile query", function()
    local t = url.parse_query(("x=1&"):rep(10) .. "y=2", nil, 3)
    assert.are.same({ x = { "1", "1", "1" } }, t)
    local n = 0
    local q = ("k=v&"):rep(5000):gsub("k=", function() n = n + 1 return "k" .. n .. "=" end)
    local parsed = 0
    for _ in pairs(url.parse_query(q)) do parsed = parsed + 1 end
    assert.are.equal(5000, n)
    assert.are.equal(1000, parsed)       -- the default cap: 1000 pairs
  end)

  it("builds a stable query string", function()
    assert.are.equal("a=1&b=x%20y&c=1&c=2", url.build_query({ b = "x y", a = 1, c = { 1, 2 } }))
  end)
end)
