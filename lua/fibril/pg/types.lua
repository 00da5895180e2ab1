--- fibril.pg.types: Lua values to query parameters, and the column types runtime/pg_result.c
--- leaves to Lua (json, jsonb, arrays). docs/postgres.md has the table of conversions.
local json = require "fibril.json"

local type, error, tonumber, setmetatable, getmetatable, select, next, unpack =
      type, error, tonumber, setmetatable, getmetatable, select, next, unpack
local format, find, sub, byte, gsub, char = string.format, string.find, string.sub,
      string.byte, string.gsub, string.char
local concat, floor, huge = table.concat, math.floor, math.huge

local M = {}

local NULL = json.null          -- a NULL lightuserdata: pg.null, json.null and redis.null
M.null = NULL

local json_mt = {}
--- Marks a value to be sent as JSON text (a list would otherwise become a SQL array).
function M.json(v) return setmetatable({ value = v }, json_mt) end

-- Numbers keep every digit: integers as integers, others with 17 significant digits.
local function number_text(v)
  if v ~= v then return "NaN" end
  if v == huge then return "Infinity" end
  if v == -huge then return "-Infinity" end
  if v == floor(v) and v > -2^63 and v < 2^63 then return format("%d", v) end
  return format("%.17g", v)
end

local function is_list(t)
  local n = #t
  if n == 0 then return next(t) == nil end
  for k in next, t do
    if type(k) ~= "number" or k < 1 or k > n or k ~= floor(k) then return false end
  end
  return true
end

-- An array literal: {1,"two",NULL,{3,4}}. Strings are always quoted, with " and \ escaped.
local function array_text(t, depth)
  if depth > 6 then error("array nested too deeply", 0) end
  local parts = {}
  for i = 1, #t do
    local v = t[i]
    local tv = type(v)
    if v == NULL or v == nil then parts[i] = "NULL"
    elseif tv == "number" then parts[i] = number_text(v)
    elseif tv == "boolean" then parts[i] = v and "t" or "f"
    elseif tv == "string" then
      if find(v, "\0", 1, true) then error("an array element holds a NUL byte", 0) end
      parts[i] = '"' .. gsub(v, '[\\"]', "\\%0") .. '"'
    elseif tv == "table" then parts[i] = array_text(v, depth + 1)
    else error("an array element is a " .. tv, 0) end
  end
  return "{" .. concat(parts, ",") .. "}"
end

-- One parameter as C takes it: a string (binary when it holds a NUL), or NULL.
local function encode(v, i)
  local tv = type(v)
  if tv == "string" then return v end
  if v == nil or v == NULL then return NULL end
  if tv == "number" then return number_text(v) end
  if tv == "boolean" then return v and "t" or "f" end
  if tv == "table" then
    if getmetatable(v) == json_mt then return json.encode(v.value) end
    if getmetatable(v) ~= json.array_mt and not is_list(v) then return json.encode(v) end
    return array_text(v, 1)
  end
  error("parameter $" .. i .. " cannot be a " .. tv, 0)
end

--- Encodes parameters for the C side: strings stay, numbers and booleans become text,
--- nil and pg.null NULL, lists SQL arrays, other tables (or pg.json(v)) JSON text.
---@return ... the encoded parameters (same count)
function M.encode(...)
  local n = select("#", ...)
  if n == 0 then return end
  if n == 1 then return encode((...), 1) end
  local out = { ... }
  for i = 1, n do out[i] = encode(out[i], i) end
  return unpack(out, 1, n)
end

-- ---- decoding: json and arrays ----------------------------------------------------------

local INT, FLOAT, BOOL, BYTEA, JSON = 1, 2, 3, 4, 5
-- Array type oid -> how its elements convert (absent: strings).
local ELEMENT = {
  [1005] = INT, [1007] = INT, [1016] = INT, [1028] = INT,          -- int2 int4 int8 oid
  [1021] = FLOAT, [1022] = FLOAT,                                  -- float4 float8
  [1000] = BOOL, [1001] = BYTEA, [199] = JSON, [3807] = JSON,
}

local function unhex(s)
  return (gsub(sub(s, 3), "%x%x", function(h) return char(tonumber(h, 16)) end))
end

local function element(s, kind)
  if kind == INT then
    local v = tonumber(s)
    -- As for int8 columns: past 2^53 a double may round it, so keep the digits then.
    if v and (v >= 2^53 or v <= -2^53) and format("%d", v) ~= s then return s end
    return v or s
  elseif kind == FLOAT then
    if s == "NaN" then return 0 / 0 elseif s == "Infinity" then return huge
    elseif s == "-Infinity" then return -huge end
    return tonumber(s) or s
  elseif kind == BOOL then return s == "t"
  elseif kind == BYTEA then return sub(s, 1, 2) == "\\x" and unhex(s) or s
  elseif kind == JSON then return json.decode(s)
  end
  return s
end

-- Parses the text of an array from position i (at a "{"); returns the list and the position
-- after its "}". Quoted elements unescape \x to x; an unquoted NULL is pg.null.
local function parse_array(s, i, kind)
  local list, n = {}, 0
  i = i + 1
  if byte(s, i) == 125 then return list, i + 1 end                 -- "{}"
  while true do
    local c = byte(s, i)
    local v
    if c == 123 then                                               -- "{": nested
      v, i = parse_array(s, i, kind)
    elseif c == 34 then                                            -- '"'
      local parts, j = {}, i + 1
      while true do
        local q = find(s, '[\\"]', j)
        if not q then error("malformed array text", 0) end
        parts[#parts + 1] = sub(s, j, q - 1)
        if byte(s, q) == 34 then i = q + 1 break end
        parts[#parts + 1] = sub(s, q + 1, q + 1)
        j = q + 2
      end
      v = element(concat(parts), kind)
    else
      local e = find(s, "[,}]", i)
      if not e then error("malformed array text", 0) end
      local raw = sub(s, i, e - 1)
      v = raw == "NULL" and NULL or element(raw, kind)
      i = e
    end
    n = n + 1
    list[n] = v
    c = byte(s, i)
    if c == 125 then return list, i + 1 end
    if c ~= 44 then error("malformed array text", 0) end
    i = i + 1
  end
end

--- Converts the text of an array column ("{1,2,NULL}", or with bounds "[0:1]={1,2}").
function M.array(s, oid)
  local start = find(s, "{", 1, true)
  return (parse_array(s, start or 1, ELEMENT[oid]))
end

local JSON_OIDS = { [114] = true, [3802] = true }

--- Finishes the columns C marked in post (name -> type oid): json decoded, arrays parsed.
function M.finish(rows, post)
  local decode, array = json.decode, M.array
  for name, oid in next, post do
    local is_json = JSON_OIDS[oid]
    for r = 1, #rows do
      local row = rows[r]
      local v = row[name]
      if v ~= NULL then row[name] = is_json and decode(v) or array(v, oid) end
    end
  end
  return rows
end

M.number_text = number_text

return M
