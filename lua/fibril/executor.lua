--- fibril.executor: the border between framework code and application code. Every unit of
--- work (an HTTP request; later an SSE stream, an event delivery, a deferred task) runs
--- through `wrap`: `to_run` callbacks before it, `to_complete` callbacks after it (even when it
--- raised), fresh unit-local state, and log tags for its lines. docs/executor.md lists every
--- place the framework calls application code.
local core = require "fibril.core.fiber"
local log = require "fibril.log"

local type, error, xpcall, ipairs, pairs, rawget, tostring =
      type, error, xpcall, ipairs, pairs, rawget, tostring
local getinfo, traceback = debug.getinfo, debug.traceback
local context, set_context = core.context, core.set_context

local M = {}

-- A unit's context, the table core.fiber's set_context gives the fiber (and the fibers it
-- schedules inherit), is an array of five slots, false when empty: an array part that small
-- lives inside the table's own allocation, where five named fields would need a second one
-- for the hash part (a request makes one of these: one object fewer to collect). The slots:
-- ACTIVE, the request id (or a generated one's counter), LOCALS, the log tags and their
-- order; log.lua keeps the last three (2, 4, 5), the constructors below spell them out.
local ACTIVE, LOCALS = 1, 3

local run_callbacks, complete_callbacks, prepare_callbacks = {}, {}, {}
local before_unit                  -- the reloader's hook: swap stale code before a unit

local function register(list, who, cb)
  if type(cb) ~= "function" then error("executor." .. who .. ": expected a function", 3) end
  list[#list + 1] = cb
  return cb
end

--- Calls cb() before every unit of work, in registration order.
function M.to_run(cb) return register(run_callbacks, "to_run", cb) end
--- Calls cb(ok, err) after every unit of work, in reverse registration order, even when the
--- unit raised (ok false, err its error).
function M.to_complete(cb) return register(complete_callbacks, "to_complete", cb) end
--- Calls cb() after each code reload (development), to re-create state app modules hold.
function M.to_prepare(cb) return register(prepare_callbacks, "to_prepare", cb) end

--- Removes a callback registered with to_run, to_complete or to_prepare.
function M.remove(cb)
  for _, list in ipairs({ run_callbacks, complete_callbacks, prepare_callbacks }) do
    for i = #list, 1, -1 do
      if list[i] == cb then table.remove(list, i) end
    end
  end
end

local function origin(cb)
  local info = getinfo(cb, "S")
  return info.short_src .. ":" .. (info.linedefined or "?")
end

-- Runs one callback; an error is logged with where the callback was defined, and returned.
-- Fixed arguments (no ...): it runs for every callback of every unit, and the JIT compiles it.
local function call_safely(kind, cb, a, b)
  local ok, err = xpcall(cb, traceback, a, b)
  if not ok then
    log.error("executor callback failed", { callback = kind, origin = origin(cb), err = tostring(err) })
    return err
  end
end

--- Runs the to_prepare callbacks (the reloader calls this after swapping code).
function M.prepare()
  for i = 1, #prepare_callbacks do call_safely("to_prepare", prepare_callbacks[i]) end
end

--- Sets the hook run before every outermost unit (one hook: the reloader's check).
function M.set_before_unit(fn) before_unit = fn end

--- xpcall message handler: every error leaves as a table (a fibril error object for a plain
--- error) with the traceback of where it was raised. Units, controllers and the server use it.
local function add_traceback(err)
  if type(err) == "table" then
    if rawget(err, "traceback") == nil then err.traceback = traceback("", 2):sub(2) end
    return err
  end
  local e = core.error(nil, tostring(err))
  e.value = err
  e.traceback = traceback("", 2):sub(2)
  return e
end

M.with_traceback = add_traceback

-- After the unit: to_complete in reverse, then the context is retired.
local function retire(ctx, ok, err)
  local n = #complete_callbacks
  if n > 0 then
    if ok then err = nil end
    for i = n, 1, -1 do call_safely("to_complete", complete_callbacks[i], ok, err) end
  end
  ctx[ACTIVE] = false
  if ctx[LOCALS] then ctx[LOCALS] = false end   -- unit state never outlives the unit
end

-- retire, and the fiber's context goes back to previous (it may live on: a script, a test
-- runner). Returns ok, ...
local function complete(ctx, previous, ok, ...)
  retire(ctx, ok, (...))
  set_context(previous)
  return ok, ...
end

-- A fresh, active context: for a request id (a string, or a generated one's counter), or
-- for a table of log tags.
local function new_context(id, tags)
  return { true, id or false, false, tags or false, false }
end

local function context_for(tags)
  local kind = type(tags)
  if kind == "string" or kind == "number" then return new_context(tags, nil) end
  return new_context(nil, tags)
end

-- The to_run callbacks; returns the error of the first that fails, or nil.
local function run_callbacks_for_unit()
  for i = 1, #run_callbacks do
    local err = call_safely("to_run", run_callbacks[i])
    if err then return err end
  end
end

local function raise_or_return(ok, ...)
  if not ok then error((...), 0) end
  return ...
end

--- Like wrap, but never raises the unit's error: returns true, results... or false, err (the
--- error object, with its traceback). The framework's own units use this.
---@param tags table|string|nil log tags for the unit ({ req = id }); a string is a request
--- id, the tag req=id (fibril.log makes the tags table only if a line is logged)
function M.call(fn, tags, ...)
  local previous = context()
  if previous and previous[ACTIVE] then return xpcall(fn, add_traceback, ...) end
  if before_unit then before_unit() end
  local ctx = context_for(tags)
  if not set_context(ctx) then
    error("executor: not inside a fiber (units of work run in fibers)", 2)
  end
  local err = run_callbacks_for_unit()
  if err then
    -- The unit cannot trust its set-up: it does not run, but what did run is released.
    return complete(ctx, previous, false, add_traceback(err))
  end
  return complete(ctx, previous, xpcall(fn, add_traceback, ...))
end

--- call for a fiber that was just spawned (without a context) and ends with the unit, as the
--- server's request fibers: fn(a, b) runs as one unit; returns true and fn's first result, or
--- false and the error. It learns there is no enclosing unit from set_context itself and
--- does not restore the fiber's context afterwards (nothing runs in it after the unit):
--- two fewer C calls per request than call, and fixed arguments the JIT compiles. In a fiber
--- that has a context, or with the reloader's hook set (development), it is call.
---@param id string|number the unit's request id (its log tag), or the counter of a generated
--- one (req._id): its string is made only if the unit logs a line
function M.call_new_fiber(fn, id, a, b)
  -- The reloader's hook (development) runs before the unit's context is set: call does that.
  if before_unit then return M.call(fn, id, a, b) end
  local ctx = new_context(id, nil)
  local inside, previous = set_context(ctx)
  if not inside then
    error("executor: not inside a fiber (units of work run in fibers)", 2)
  end
  if previous ~= nil then                  -- not a new fiber after all: this is call's case
    set_context(previous)
    return M.call(fn, id, a, b)
  end
  local ok, result
  local err = run_callbacks_for_unit()
  if err then ok, result = false, add_traceback(err)
  else ok, result = xpcall(fn, add_traceback, a, b) end
  retire(ctx, ok, result)
  return ok, result
end

--- Like call, but a unit of its own even inside another unit, in this same fiber: the outer
--- unit's context is set aside (its tags are inherited) and restored after. No reload check
--- runs first: code must not change under the unit that called it. Inline event subscribers
--- run through it (lua/fibril/events.lua): their own to_run/to_complete, their own locals.
---@param tags table|nil log tags added to the outer unit's
function M.call_nested(fn, tags, ...)
  local previous = context()
  local outer = previous and log.context_tags(previous)   -- made from its request id if need be
  if outer then
    local merged = {}
    for k, v in pairs(outer) do merged[k] = v end
    if tags then for k, v in pairs(tags) do merged[k] = v end end
    tags = merged
  end
  local ctx = new_context(nil, tags)
  if not set_context(ctx) then
    error("executor: not inside a fiber (units of work run in fibers)", 2)
  end
  for i = 1, #run_callbacks do
    local err = call_safely("to_run", run_callbacks[i])
    if err then return complete(ctx, previous, false, add_traceback(err)) end
  end
  return complete(ctx, previous, xpcall(fn, add_traceback, ...))
end

--- Runs fn(...) as one unit of work and returns its results (or raises its error, after the
--- to_complete callbacks ran). A wrap inside a running unit (same fiber, or a fiber the unit
--- scheduled) just calls fn: the callbacks run once, for the outermost.
---@param opts table|nil { tags = { req = id } } log tags for the unit
function M.wrap(fn, opts, ...)
  local previous = context()
  if previous and previous[ACTIVE] then return fn(...) end
  return raise_or_return(M.call(fn, opts and opts.tags, ...))
end

--- The current unit's local state: a table that lives as long as the unit (shared with the
--- fibers it schedules) and is dropped after it. nil outside a unit.
---@return table|nil
function M.locals()
  local ctx = context()
  if not ctx or not ctx[ACTIVE] then return nil end
  local t = ctx[LOCALS]
  if not t then t = {}; ctx[LOCALS] = t end
  return t
end

--- True inside a unit of work.
function M.active()
  local ctx = context()
  return ctx ~= nil and ctx[ACTIVE] == true
end

return M
