--- fibril.events: domain events. `events.define` makes an event class; `Class{...}` checks the
--- fields and freezes them; `events.publish` delivers an event to every subscriber of it:
--- inline ones at once, each as a unit of work of its own whose error is logged (not raised),
--- deferred ones as durable tasks (lua/fibril/deferred.lua). docs/events.md is the guide.
---
---   local E = events.define("Ci.PipelineCreated", { "pipeline_id", "partition_id" })
---   events.publish(E{ pipeline_id = 1, partition_id = 7 })
local core = require "fibril.core.fiber"
local executor = require "fibril.executor"
local log = require "fibril.log"
local json = require "fibril.json"

local type, error, pairs, ipairs, tostring, setmetatable, getmetatable, next, pcall =
      type, error, pairs, ipairs, tostring, setmetatable, getmetatable, next, pcall
local format, find, sub, floor, huge, sort, concat =
      string.format, string.find, string.sub, math.floor, math.huge, table.sort, table.concat
local random, getinfo, getmt = math.random, debug.getinfo, debug.getmetatable
local walltime = core.walltime

local M = {}

local classes = {}            -- name -> class
local subscriptions = {}      -- list of { subscriber =, target =, prefix =, opts = }
local matches = {}            -- event name -> the subscriptions that match it (a cache)

local CLASS = {}              -- key of an event's metatable naming its class
local function frozen(_, k)
  error(format("events: an event is read-only (field '%s')", tostring(k)), 2)
end

-- ---- ids --------------------------------------------------------------------------------

local counter, pid_part = 0, nil
--- A new unique id: milliseconds since the epoch, the process, a counter and random bits, in
--- hex (sortable by creation time within a process).
---@return string
function M.new_id()
  if not pid_part then
    pid_part = require("fibril.core.process").pid() % 0x10000
  end
  counter = (counter + 1) % 0x10000
  return format("%011x%04x%04x%06x", floor(walltime() * 1000), pid_part, counter,
                random(0, 0xffffff))
end

-- ---- payload: JSON values only, deep-copied and frozen ----------------------------------

local function is_finite(n) return n == n and n > -huge and n < huge end

-- Returns a copy of v, checked to hold JSON values only; path names the field in errors.
-- The copy is the event's payload, which nothing outside this file ever holds: the top level
-- of an event is a read-only proxy, and a nested table is copied again for each holder (the
-- event object, each subscriber's view) the first time it reads it (view_of, below). Nested
-- tables stay plain so that #, ipairs and pairs work on them (LuaJIT ignores __len and
-- __pairs on tables, so a read-only proxy would silently read as empty).
local function copy_value(v, where, path, depth)
  local t = type(v)
  if t == "string" or t == "boolean" or v == json.null then return v end
  if t == "number" then
    if not is_finite(v) then
      error(format("%s: field '%s' is %s (events carry JSON values)", where, path, tostring(v)), 4)
    end
    return v
  end
  if t ~= "table" then
    error(format("%s: field '%s' is a %s (events carry JSON values)", where, path, t), 4)
  end
  if depth > 32 then error(format("%s: field '%s' nests too deep", where, path), 4) end
  local copy = {}
  for k, x in pairs(v) do
    if type(k) ~= "string" and type(k) ~= "number" then
      error(format("%s: field '%s' has a %s key", where, path, type(k)), 4)
    end
    copy[k] = copy_value(x, where, path .. "." .. tostring(k), depth + 1)
  end
  if getmetatable(v) == json.array_mt then setmetatable(copy, json.array_mt) end
  return copy
end

-- A plain deep copy of a payload value; JSON arrays stay marked as arrays.
local function thaw(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = thaw(x) end
  if getmetatable(v) == json.array_mt then setmetatable(out, json.array_mt) end
  return out
end

-- A holder's face of a payload with nested tables: top-level reads of scalars go straight to
-- data; a nested table is thawed on its first read and that copy kept for this holder, so
-- `ev.items == ev.items` and a holder's changes stay its own (the payload never changes).
local function private_index(data)
  local mine = {}
  return function(_, k)
    local v = mine[k]
    if v ~= nil then return v end
    v = data[k]
    if type(v) == "table" then v = thaw(v); mine[k] = v end
    return v
  end
end

-- ---- classes ----------------------------------------------------------------------------

local Class = {}
Class.__index = Class

local function build(class, fields, id)
  local name = class.name
  local data, nested = {}, false
  id = id or M.new_id()
  if type(fields) ~= "table" then
    error(format("%s{...}: expected a table of fields, got %s", name, type(fields)), 3)
  end
  for k, v in pairs(fields) do
    if not class.known[k] then
      error(format("%s: unknown field '%s' (fields: %s)", name, tostring(k), class.field_list), 3)
    end
    local c = copy_value(v, name, k, 1)
    data[k] = c
    nested = nested or type(c) == "table"
  end
  for _, f in ipairs(class.required) do
    if data[f] == nil then error(format("%s: missing required field '%s'", name, f), 3) end
  end
  return setmetatable({}, { __index = nested and private_index(data) or data,
                            __newindex = frozen, __metatable = "event",
                            __raw = data, [CLASS] = class, id = id, nested = nested,
                            __pairs = function() return next, data, nil end,
                            __tostring = function() return name .. " " .. id end })
end

-- What a subscriber (or its `if` filter) receives: the event itself when its fields are all
-- scalars (nothing to protect), else a view of its own over the same payload, so nested
-- tables one subscriber changes are not what the next one reads.
local function view_of(ev)
  local mt = getmt(ev)
  if not mt.nested then return ev end
  local vmt = {}
  for k, v in pairs(mt) do vmt[k] = v end
  vmt.__index = private_index(mt.__raw)
  return setmetatable({}, vmt)
end

Class.__call = function(class, fields) return build(class, fields) end

--- Defines an event class. fields lists the required field names; fields.optional lists
--- the others allowed. Redefining a name from the same file (a code reload) replaces it.
---@param name string e.g. "Ci.PipelineCreated" (dots group names: subscribe to "Ci.*")
---@param fields table { "a", "b", optional = { "c" } }
---@return table the class: call it with the fields to make an event
function M.define(name, fields)
  if type(name) ~= "string" or not find(name, "^[%a_][%w_%.]*$") or find(name, "%.%.")
     or sub(name, -1) == "." then
    error("events.define: the name must be letters, digits, _ and dots (\"Ci.PipelineCreated\"), got "
          .. tostring(name), 2)
  end
  if type(fields) ~= "table" then error("events.define: fields must be a list of names", 2) end
  local required, known, list = {}, {}, {}
  local function add(f, req)
    if type(f) ~= "string" or f == "" then
      error(format("events.define(%q): field names must be non-empty strings", name), 3)
    end
    if known[f] then error(format("events.define(%q): field '%s' twice", name, f), 3) end
    known[f] = true
    list[#list + 1] = f
    if req then required[#required + 1] = f end
  end
  for _, f in ipairs(fields) do add(f, true) end
  for k in pairs(fields) do
    if type(k) ~= "number" and k ~= "optional" then
      error(format("events.define(%q): unknown option '%s'", name, tostring(k)), 2)
    end
  end
  for _, f in ipairs(fields.optional or {}) do add(f, false) end
  local source = getinfo(2, "S").source
  local old = classes[name]
  if old and old.source ~= source then
    error(format("events.define: '%s' is already defined in %s", name, sub(old.source, 2)), 2)
  end
  local class = setmetatable({ name = name, required = required, known = known,
                               field_list = concat(list, ", "), source = source }, Class)
  classes[name] = class
  return class
end

-- The class of an event, or nil for anything else. An event's metatable hides behind
-- __metatable = "event"; debug.getmetatable reaches it.
local function class_of(ev)
  if type(ev) ~= "table" or getmetatable(ev) ~= "event" then return nil end
  return getmt(ev)[CLASS]
end

--- True when v is an event.
function M.is_event(v) return class_of(v) ~= nil end

--- The event's class name ("Ci.PipelineCreated").
function M.name(ev)
  local class = class_of(ev)
  if not class then error("events.name: not an event", 2) end
  return class.name
end

--- The event's unique id (kept across deferred delivery).
function M.id(ev)
  if not class_of(ev) then error("events.id: not an event", 2) end
  return getmt(ev).id
end

--- The event's fields as a plain (mutable) table: a deep copy.
function M.fields(ev)
  if not class_of(ev) then error("events.fields: not an event", 2) end
  return thaw(getmt(ev).__raw)
end

--- The class registered under name, or nil.
function M.class(name) return classes[name] end

--- Every defined class, sorted by name.
function M.classes()
  local list = {}
  for _, c in pairs(classes) do list[#list + 1] = c end
  sort(list, function(a, b) return a.name < b.name end)
  return list
end

-- ---- JSON -------------------------------------------------------------------------------

--- The event as a plain table { name =, id =, fields = } (what a deferred task stores).
function M.to_table(ev)
  local class = class_of(ev)
  if not class then error("events.to_table: not an event", 2) end
  local mt = getmt(ev)
  return { name = class.name, id = mt.id, fields = thaw(mt.__raw) }
end

--- The event back from to_table's shape; the class must be defined (its file loaded).
function M.from_table(t)
  if type(t) ~= "table" or type(t.name) ~= "string" then
    error("events.from_table: expected { name =, id =, fields = }", 2)
  end
  local class = classes[t.name]
  if not class then error(format("events: no event class '%s' is defined", t.name), 2) end
  return build(class, t.fields or {}, t.id)
end

function M.encode(ev) return json.encode(M.to_table(ev)) end
function M.decode(s) return M.from_table(json.decode(s)) end

-- ---- subscriptions ----------------------------------------------------------------------

--- "*" (every event), "Prefix.*" (names under Prefix.), or a class / class name.
local function target_of(t)
  if type(t) == "table" and getmetatable(t) == Class then return t.name end
  if type(t) == "string" and (t == "*" or find(t, "^[%a_][%w_%.]*$") or find(t, "^[%a_][%w_%.]*%.%*$")) then
    return t
  end
  return nil
end

--- Adds a subscription (Subscriber:subscribe_to calls it). opts as in docs/events.md.
function M.subscribe(subscriber, target, opts)
  local name = target_of(target)
  if not name then
    error("subscribe_to: expected an event class, \"*\" or \"Prefix.*\", got " .. tostring(target), 3)
  end
  local prefix = name == "*" and "" or (sub(name, -2) == ".*" and sub(name, 1, -2)) or nil
  local s = { subscriber = subscriber, target = name, prefix = prefix, opts = opts or {} }
  subscriptions[#subscriptions + 1] = s
  matches = {}
  return s
end

--- Forgets every subscription (the app loader calls it before loading subscribers/ again);
--- returns the old ones, for restore_subscriptions.
function M.reset_subscriptions()
  local old = subscriptions
  subscriptions = {}
  matches = {}
  return old
end

--- Puts back what reset_subscriptions returned (a reload that failed).
function M.restore_subscriptions(list)
  subscriptions = list or {}
  matches = {}
end

--- True when v is an event class (events.define's result).
function M.is_class(v) return type(v) == "table" and getmetatable(v) == Class end

--- The subscriptions an event named name reaches, in subscription order.
function M.subscriptions_for(name)
  local list = matches[name]
  if list then return list end
  list = {}
  for _, s in ipairs(subscriptions) do
    if s.target == name or (s.prefix and sub(name, 1, #s.prefix) == s.prefix) then
      list[#list + 1] = s
    end
  end
  matches[name] = list
  return list
end

--- Every subscription, in order.
function M.subscriptions() return subscriptions end

-- ---- the graph as text (fibril events APP) ------------------------------------------------

local function describe(s, via)
  local o, marks = s.opts, {}
  if o.deferred then
    marks[#marks + 1] = "deferred"
    if o.retries then marks[#marks + 1] = "retries " .. o.retries end
    if o.max_concurrency then marks[#marks + 1] = "max_concurrency " .. o.max_concurrency end
  else
    marks[#marks + 1] = "inline"
  end
  if o["if"] then marks[#marks + 1] = "if" end
  if via then marks[#marks + 1] = "via " .. via end
  return format("%s [%s]", tostring(s.subscriber.name), concat(marks, ", "))
end

--- The event graph as lines: each defined class (sorted) with the subscribers it reaches,
--- then subscriptions to names no loaded file defines.
---@return table lines
function M.tree()
  local lines = {}
  local function branch(list, name)
    for i, s in ipairs(list) do
      local last = i == #list
      lines[#lines + 1] = (last and "└── " or "├── ") .. describe(s, s.target ~= name and s.target or nil)
    end
    if #list == 0 then lines[#lines + 1] = "└── (no subscribers)" end
  end
  for _, c in ipairs(M.classes()) do
    lines[#lines + 1] = c.name
    branch(M.subscriptions_for(c.name), c.name)
  end
  local undefined = {}
  for _, s in ipairs(subscriptions) do
    if not s.prefix and not classes[s.target] then undefined[#undefined + 1] = s end
  end
  if #undefined > 0 then
    lines[#lines + 1] = "(events no loaded file defines)"
    for i, s in ipairs(undefined) do
      lines[#lines + 1] = (i == #undefined and "└── " or "├── ") .. s.target .. ": " .. describe(s)
    end
  end
  return lines
end

-- ---- publish ----------------------------------------------------------------------------

local function call_subscriber(s, ev)
  local inst = setmetatable({}, s.subscriber)
  return inst:call(ev)
end

local unit = executor.call_nested

-- Runs an inline subscriber as a unit of its own; returns ok, err.
local function deliver_inline(s, ev, name)
  local sub_name = s.subscriber.name
  local ok, err = unit(call_subscriber, { subscriber = sub_name }, s, view_of(ev))
  if not ok then
    log.error("subscriber failed", { event = name, event_id = getmt(ev).id, subscriber = sub_name,
                                     err = tostring(err) })
  end
  return ok, err
end

local function passes(s, ev, name)
  local cond = s.opts["if"]
  if not cond then return true end
  local ok, r = pcall(cond, view_of(ev))
  if not ok then
    log.error("subscriber filter failed", { event = name, subscriber = s.subscriber.name, err = tostring(r) })
    return false, r
  end
  return r and true or false
end

--- Delivers ev to every subscriber of its class: inline ones now (in subscription order),
--- then deferred ones as durable tasks (returns once they are durable).
---@param ev table an event (Class{...})
---@param opts table|nil { raise = true } re-raises the first inline error (and enqueues
---   nothing); { tx = tx } writes deferred tasks in that pg transaction (postgres backend)
---@return integer how many subscribers it reached (inline ones run, deferred ones queued)
function M.publish(ev, opts)
  local class = class_of(ev)
  if not class then error("events.publish: expected an event (Class{...}), got " .. type(ev), 2) end
  local name = class.name
  local list = matches[name] or M.subscriptions_for(name)
  local raise = opts and opts.raise
  local deferred, n = nil, 0
  for i = 1, #list do
    local s = list[i]
    local pass, ferr = passes(s, ev, name)
    if ferr ~= nil and raise then error(ferr, 0) end
    if pass then
      n = n + 1
      if s.opts.deferred then
        deferred = deferred or {}
        deferred[#deferred + 1] = s
      else
        local ok, err = deliver_inline(s, ev, name)
        if not ok and raise then error(err, 0) end
      end
    end
  end
  if deferred then require("fibril.deferred").enqueue_event(ev, deferred, opts) end
  return n
end

--- Runs subscriber (a class) on ev as a deferred task does, raising its error (the
--- deferred runner calls this inside the task's unit of work).
function M.run_subscriber(subscriber, ev, task)
  local inst = setmetatable({ task_id = task and task.id, attempt = task and task.attempt }, subscriber)
  return inst:call(ev)
end

return M
