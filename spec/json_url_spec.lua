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
