--- fibril.log: one event per line on stderr, `key=value` text (default) or JSON. Every line
--- carries the tags of the current unit of work (the request id, and what the app adds with
--- `log.tag`); fibers scheduled inside a unit carry them too.
---
---   local log = require "fibril.log"
---   log.tag("account", 7)                      -- for the rest of this unit
---   log.info("status posted", { id = 12 })
---   -- ts=... level=info msg="status posted" req=... account=7 id=12
local core = require "fibril.core.fiber"
local id_string = require("fibril.core.http").id_string   -- a generated request id

local type, tostring, pairs, ipairs, sort, concat, format, find, gsub, date, floor =
      type, tostring, pairs, ipairs, table.sort, table.concat, string.format, string.find,
      string.gsub, os.date, math.floor
local context, walltime = core.context, core.walltime
local M = {}

local write = function(line) io.stderr:write(line, "\n") end

--- Replaces where lines go (a function(line)); nil restores stderr. For tests and tools.
function M.output(fn)
  write = fn or function(line) io.stderr:write(line, "\n") end
end

local LEVELS = { debug = 10, info = 20, warn = 30, error = 40 }
local min_level, json_format = LEVELS.info, false
local json                                   -- loaded when the JSON format is chosen

--- Sets the level (debug|info|warn|error) and the format (text|json), e.g. from config.log.
function M.configure(opts)
  opts = opts or {}
  if opts.level then
    if not LEVELS[opts.level] then
      error("log.configure: unknown level '" .. tostring(opts.level) .. "'", 2)
    end
    min_level = LEVELS[opts.level]
  end
  if opts.format then
    if opts.format ~= "text" and opts.format ~= "json" then
      error("log.configure: format must be text or json", 2)
    end
    json_format = opts.format == "json"
    if json_format and not json then json = require "fibril.json" end
  end
end

local ESC = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
local function esc(c) return ESC[c] or format("\\x%02x", c:byte()) end

-- A value as text: bare when it is plain, else quoted with CR, LF, quotes and controls escaped.
local function text_value(v)
  local s = tostring(v)
  if s ~= "" and not find(s, "[^%w%.%-_/:@+]") then return s end
  return '"' .. gsub(s, '[%c"\\]', esc) .. '"'
end

local function timestamp()
  local t = walltime()
  local s = floor(t)
  return date("!%Y-%m-%dT%H:%M:%S", s) .. format(".%03dZ", floor((t - s) * 1000))
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- Slots of a unit's context, an array with false for empty (lua/fibril/executor.lua says why).
local REQ, TAGS, TAG_KEYS = 2, 4, 5

-- The unit's tags table, or nil; a unit started with only a request id, or a generated one's
-- counter (executor.call, call_new_fiber), gets it here, when it first logs a line.
local function unit_tags(ctx)
  local tags = ctx[TAGS]
  if tags then return tags end
  local req = ctx[REQ]
  if not req then return nil end
  if type(req) == "number" then req = id_string(req) end
  tags = { req = req }
  ctx[TAGS] = tags
  return tags
end
--- The tags of a unit's context (executor.call_nested merges them into its own).
M.context_tags = unit_tags

local function emit(level, msg, fields)
  if LEVELS[level] < min_level then return end
  local ctx = context()
  local tag_keys, tags = ctx and ctx[TAG_KEYS], ctx and unit_tags(ctx)
  if json_format then
    local obj = { ts = timestamp(), level = level, msg = tostring(msg) }
    if tags then for k, v in pairs(tags) do obj[k] = v end end
    if fields then for k, v in pairs(fields) do obj[k] = type(v) == "table" and v or tostring(v) end end
    write(json.encode(obj))
    return
  end
  local parts = { "ts=" .. timestamp(), "level=" .. level, "msg=" .. text_value(msg) }
  if tags then
    for _, k in ipairs(tag_keys or sorted_keys(tags)) do
      parts[#parts + 1] = k .. "=" .. text_value(tags[k])
    end
  end
  if fields then
    for _, k in ipairs(sorted_keys(fields)) do
      parts[#parts + 1] = tostring(k) .. "=" .. text_value(fields[k])
    end
  end
  write(concat(parts, " "))
end

---@param msg string
---@param fields table|nil key = value pairs for this line
function M.debug(msg, fields) emit("debug", msg, fields) end
function M.info(msg, fields) emit("info", msg, fields) end
function M.warn(msg, fields) emit("warn", msg, fields) end
function M.error(msg, fields) emit("error", msg, fields) end

--- Adds a tag to every later line of the current unit of work (and of the fibers it
--- schedules). Outside a unit it does nothing and returns false.
---@return boolean
function M.tag(key, value)
  local ctx = context()
  if not ctx then return false end
  local tags = unit_tags(ctx)
  if not tags then tags = {}; ctx[TAGS] = tags end
  local keys = ctx[TAG_KEYS]
  if not keys then keys = sorted_keys(tags); ctx[TAG_KEYS] = keys end
  if tags[key] == nil then keys[#keys + 1] = key end
  tags[key] = value
  return true
end

--- The current unit's tags (a copy), or an empty table.
function M.tags()
  local ctx, copy = context(), {}
  local tags = ctx and unit_tags(ctx)
  if tags then for k, v in pairs(tags) do copy[k] = v end end
  return copy
end

return M
