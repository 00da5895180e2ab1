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
local array_mt = cjson.array_mt or {}
M.array_mt = array_mt

--- Marks a table as a JSON array, so that an empty one encodes as `[]`.
---@return table t
function M.array(t)
  return setmetatable(t or {}, array_mt)
end

--- Encodes a Lua value; raises "json: ..." naming the problem.
---@return string
function M.encode(value)
  local ok, s = pcall(encoder.encode, value)
  if not ok then error("json: cannot encode: " .. tostring(s):gsub("^.-: ", ""), 2) end
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
