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

local getmetatable, next, pairs, gsub = getmetatable, next, pairs, string.gsub

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

--- Encodes a Lua value; raises "json: ..." naming the problem.
---@return string
function M.encode(value)
  local v, marked = mark_empty_arrays(value, 0)
  local ok, s = pcall(encoder.encode, v)
  if not ok then error("json: cannot encode: " .. tostring(s):gsub("^.-: ", ""), 2) end
  if marked then s = gsub(s, ENCODED_PLACEHOLDER, "[]") end
  return s
end

--- Decodes a JSON text; raises "json: ..." with cjson's position.
---@param text string
---@return any
function M.decode(text)
  if type(text) ~= "string" then error("json: decode expects a string, got " .. type(text), 2) end
  local ok, v = pcall(decoder.decode, text)
  if not ok then error("json: cannot decode: " .. tostring(v):gsub("^.-: ", ""), 2) end
  return v
end

--- Like decode, but returns nil and the message instead of raising (for request bodies).
function M.try_decode(text)
  local ok, v = pcall(decoder.decode, text)
  if ok then return v end
  return nil, "json: " .. tostring(v)
end

return M
