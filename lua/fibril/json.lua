--- fibril.json: JSON through lua-cjson, with errors that say what went wrong.
--- `fibril.json.null` stands for JSON null; empty tables encode as `{}` unless marked with
--- `json.array(t)`.
local cjson = require "cjson"

local pcall, error, setmetatable = pcall, error, setmetatable

local M = {}

local encoder = cjson.new()
encoder.encode_sparse_array(true)          -- {[1]=1, [3]=3} encodes, holes as null
encoder.encode_invalid_numbers(false)      -- NaN and inf are errors, not invalid JSON
local decoder = cjson.new()
decoder.decode_invalid_numbers(false)
decoder.decode_max_depth(200)              -- hostile nesting fails instead of eating the C stack

M.null = cjson.null
-- Debian's lua-cjson (2.1.0) has no array metatable: an empty table always encodes as {}.
-- Tables marked with json.array that are empty are swapped for a placeholder string, and the
-- placeholder for [] after encoding.
local array_mt = {}
M.array_mt = array_mt
local PLACEHOLDER = "\0fibril:empty-array\0"
local ENCODED_PLACEHOLDER = '"\\u0000fibril:empty%-array\\u0000"'   -- a gsub pattern

--- Marks a table as a JSON array, so that an empty one encodes as `[]`.
---@return table t
function M.array(t)
  return setmetatable(t or {}, array_mt)
end

local getmetatable, next, pairs, gsub, type = getmetatable, next, pairs, string.gsub, type

-- Returns value, or a copy in which empty marked arrays are placeholders (depth-limited).
local function mark_empty_arrays(value, depth)
  if type(value) ~= "table" or depth > 200 then return value, false end
  if getmetatable(value) == array_mt and next(value) == nil then return PLACEHOLDER, true end
  local copy, changed = nil, false
  for k, v in pairs(value) do
    local nv, c = mark_empty_arrays(v, depth + 1)
    if c then
      if not copy then
        copy = {}
        for k2, v2 in pairs(value) do copy[k2] = v2 end
      end
      copy[k] = nv
      changed = true
    end
  end
  return copy or value, changed
end

-- The whole value through cjson (after marking empty arrays). Returns ok, string or message.
local function encode_cjson(value)
  local v, marked = mark_empty_arrays(value, 0)
  local ok, s = pcall(encoder.encode, v)
  if ok and marked then s = gsub(s, ENCODED_PLACEHOLDER, "[]") end
  return ok, s
end

-- A fast path for the usual small values, written into one reused string buffer: cjson formats
-- every number with snprintf("%.14g") (about 110 ns each), where an integer needs no more than
-- "%d". It takes strings (escaped by cjson itself), booleans, null, finite numbers, sequences
-- and string-keyed objects of those, up to depth 16, plain or json.array tables; it gives up
-- (returns false) on anything else, and encode then goes through cjson for the whole value.
-- The bytes are cjson's: same escapes, same number format, same key order (pairs and lua_next
-- walk a table alike), {} for an empty table and [] for an empty json.array.
local ok_buffer, string_buffer = pcall(require, "string.buffer")
local buf = ok_buffer and string_buffer.new() or nil
local encode_scalar = encoder.encode
local null, huge, rawget = cjson.null, math.huge, rawget

local function put(v, depth)
  local t = type(v)
  if t == "string" then
    buf:put(encode_scalar(v))
  elseif t == "number" then
    if v % 1 == 0 and v > -1e14 and v < 1e14 and (v ~= 0 or 1 / v > 0) then
      buf:putf("%d", v)                    -- what "%.14g" prints for these
    elseif v == v and v ~= huge and v ~= -huge then
      buf:put(encode_scalar(v))
    else
      return false                         -- NaN, inf: cjson raises
    end
  elseif t == "boolean" then
    buf:put(v and "true" or "false")
  elseif v == null then
    buf:put("null")
  elseif t == "table" then
    if depth > 16 then return false end
    local mt = getmetatable(v)
    if mt ~= nil and mt ~= array_mt then return false end
    local n = #v
    if n > 0 then                          -- a sequence 1..n and nothing else, or give up
      local count = 0
      for _ in pairs(v) do count = count + 1 end
      if count ~= n then return false end
      buf:put("[")
      for i = 1, n do
        if i > 1 then buf:put(",") end
        if not put(rawget(v, i), depth + 1) then return false end
      end
      buf:put("]")
    elseif next(v) == nil then
      buf:put(mt == array_mt and "[]" or "{}")
    else
      buf:put("{")
      local first = true
      for k, x in pairs(v) do
        if type(k) ~= "string" then return false end
        if first then first = false else buf:put(",") end
        buf:put(encode_scalar(k), ":")
        if not put(x, depth + 1) then return false end
      end
      buf:put("}")
    end
  else
    return false
  end
  return true
end

--- Encodes a Lua value; raises "json: ..." naming the problem.
---@return string
function M.encode(value)
  if type(value) == "string" then return encode_scalar(value) end
  if buf then
    buf:reset()
    if put(value, 0) then
      local s = buf:tostring()
      if #buf > 65536 then buf:free() end  -- do not keep a big buffer for small values
      return s
    end
  end
  local ok, s = encode_cjson(value)
  if not ok then error("json: cannot encode: " .. tostring(s):gsub("^.-: ", ""), 2) end
  return s
end

-- cjson alone, for the spec that checks the fast path gives the same bytes.
M._encode_cjson = encode_cjson

-- Decoding: cjson 2.1.0 decodes [] as a plain {} (which would encode back as {}). A text with
-- an empty array gets each `[]` outside strings swapped for the placeholder string first, and
-- the decoded placeholders become json.array{} (a text spelling the placeholder itself gets
-- an empty array, which it could have sent as []). Texts without `[]` pay one find.
local find, sub, byte, concat = string.find, string.sub, string.byte, table.concat
local ENCODED_PLACEHOLDER_TEXT = '"\\u0000fibril:empty-array\\u0000"'

local function mark_empty_arrays_in(text)
  if not find(text, "%[[ \t\r\n]*%]") then return text, false end
  local out, n, last, pos = {}, 0, 1, 1
  while true do
    local i = find(text, '["%[]', pos)
    if not i then break end
    if byte(text, i) == 34 then             -- a string: skip to its closing quote
      local j = i + 1
      while true do
        local q = find(text, '["\\]', j)
        if not q then return text, false end  -- unterminated: cjson reports it
        if byte(text, q) == 92 then j = q + 2 else pos = q + 1 break end
      end
    else
      local _, e = find(text, "^%[[ \t\r\n]*%]", i)
      if e then
        out[n + 1], out[n + 2] = sub(text, last, i - 1), ENCODED_PLACEHOLDER_TEXT
        n, last = n + 2, e + 1
      end
      pos = (e or i) + 1
    end
  end
  if n == 0 then return text, false end
  out[n + 1] = sub(text, last)
  return concat(out), true
end

local function restore_empty_arrays(v)
  if v == PLACEHOLDER then return setmetatable({}, array_mt) end
  if type(v) == "table" then
    for k, x in pairs(v) do
      if x == PLACEHOLDER or type(x) == "table" then v[k] = restore_empty_arrays(x) end
    end
  end
  return v
end

local function decode(text)
  local t, marked = mark_empty_arrays_in(text)
  local ok, v = pcall(decoder.decode, t)
  if ok and marked then v = restore_empty_arrays(v) end
  return ok, v
end

--- Decodes a JSON text; raises "json: ..." with cjson's position. An empty array decodes as
--- a table marked with json.array, so it encodes back as [].
---@param text string
---@return any
function M.decode(text)
  if type(text) ~= "string" then error("json: decode expects a string, got " .. type(text), 2) end
  local ok, v = decode(text)
  if not ok then error("json: cannot decode: " .. tostring(v):gsub("^.-: ", ""), 2) end
  return v
end

--- Like decode, but returns nil and the message instead of raising (for request bodies).
function M.try_decode(text)
  if type(text) ~= "string" then return nil, "json: decode expects a string, got " .. type(text) end
  local ok, v = decode(text)
  if ok then return v end
  return nil, "json: " .. tostring(v)
end

return M
