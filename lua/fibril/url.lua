--- fibril.url: percent-decoding and encoding, query strings and form bodies.
local char, byte, format, gsub, find, sub = string.char, string.byte, string.format,
                                             string.gsub, string.find, string.sub
local tonumber, type = tonumber, type

local M = {}

local function hex_to_char(h) return char(tonumber(h, 16)) end

--- Decodes %XX escapes (and, with plus_as_space, '+' as a space, as forms do).
---@return string
function M.decode(s, plus_as_space)
  if plus_as_space then s = gsub(s, "+", " ") end
  return (gsub(s, "%%(%x%x)", hex_to_char))
end

local function char_to_hex(c) return format("%%%02X", byte(c)) end

--- Encodes every byte outside A-Z a-z 0-9 - _ . ~ as %XX.
---@return string
function M.encode(s)
  return (gsub(s, "[^%w%-_%.~]", char_to_hex))
end

--- Parses "a=1&b=2&b=3" into { a = "1", b = { "2", "3" } }; "a[]=1" always gives a list.
--- At most max_pairs pairs are read (default 1000): a hostile query cannot build a huge table.
---@return table
function M.parse_query(s, into, max_pairs)
  local t = into or {}
  if not s or s == "" then return t end
  max_pairs = max_pairs or 1000
  local n, pos, len = 0, 1, #s
  while pos <= len and n < max_pairs do
    local amp = find(s, "&", pos, true) or len + 1
    local pair = sub(s, pos, amp - 1)
    pos = amp + 1
    if pair ~= "" then
      n = n + 1
      local eq = find(pair, "=", 1, true)
      local k = M.decode(eq and sub(pair, 1, eq - 1) or pair, true)
      local v = eq and M.decode(sub(pair, eq + 1), true) or ""
      if sub(k, -2) == "[]" then
        k = sub(k, 1, -3)
        local list = t[k]
        if type(list) ~= "table" then list = {}; t[k] = list end
        list[#list + 1] = v
      else
        local prev = t[k]
        if prev == nil then t[k] = v
        elseif type(prev) == "table" then prev[#prev + 1] = v
        else t[k] = { prev, v } end
      end
    end
  end
  return t
end

--- Builds a query string from a table (keys sorted, so the result is stable).
---@return string
function M.build_query(t)
  local keys, parts = {}, {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(keys) do
    local v = t[k]
    if type(v) == "table" then
      for _, item in ipairs(v) do
        parts[#parts + 1] = M.encode(tostring(k)) .. "=" .. M.encode(tostring(item))
      end
    else
      parts[#parts + 1] = M.encode(tostring(k)) .. "=" .. M.encode(tostring(v))
    end
  end
  return table.concat(parts, "&")
end

return M
