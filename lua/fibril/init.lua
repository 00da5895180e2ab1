--- fibril: fibers on the libuv loop. schedule/await/sleep/cancel, and the coordination every
--- later feature builds on: channels, semaphores, conditions, map and race.
--- docs/fibers.md is the guide; every function here is documented there with examples.
local core = require "fibril.core.fiber"
local channel = require "fibril.channel"
local semaphore = require "fibril.semaphore"
local cond = require "fibril.cond"

local type, error, select, getmetatable, unpack, pcall =
      type, error, select, getmetatable, unpack, pcall
local spawn, join, csleep, park, wake, cancel, now =
      core.spawn, core.join, core.sleep, core.park, core.wake, core.cancel, core.now
local FIBER_MT, DONE_MT, ERROR_MT =
      core.fiber_metatable, core.done_fiber_metatable, core.error_metatable
local min, max = math.min, math.max

local M = {}

local function is_fiber(v)
  local mt = getmetatable(v)
  return mt == FIBER_MT or mt == DONE_MT
end

local function check_timeout(t, who)
  if t ~= nil and (type(t) ~= "number" or not (t >= 0)) then
    error(who .. ": timeout must be a non-negative number of seconds", 3)
  end
  return t
end

--- Runs fn(...) in a new fiber, started on the next loop turn.
---@param fn function
---@return userdata the fiber handle (`f:cancel()`, `f:status()`, `f:id()`)
M.schedule = spawn

---@return userdata|nil the running fiber's handle
M.current = core.current

-- join's protocol: true, results... | false, err (the fiber failed) | nil, err (timeout/cancel)
local function joined(ok, ...)
  if ok then return ... end
  error((...), 0)
end

local function first_result(ok, v)
  if ok then return v end
  error(v, 0)
end

-- Lua returns at most about 8000 values from one call; past this, await_all's table it is.
local MAX_RESULT_VALUES = 7000

-- Awaits a list of fibers with one deadline; a table of the first result of each, in order.
local function await_all(list, timeout)
  local n = #list
  local results = {}
  local deadline = timeout and now() + timeout
  for i = 1, n do
    local f = list[i]
    if not is_fiber(f) then
      error("fibril.await: element " .. i .. " is a " .. type(f) .. ", not a fiber", 3)
    end
    local ok, v = join(f, deadline and max(0, deadline - now()))
    if ok == nil and getmetatable(v) == ERROR_MT and v.code == "timeout" then
      v.message = "fibril.await: timed out after " .. timeout .. " s"
    end
    results[i] = first_result(ok, v)
  end
  return results, n
end

local function await_list(list, timeout)
  if #list > MAX_RESULT_VALUES then
    error("fibril.await: " .. #list .. " fibers are too many results to return as values; "
          .. "use fibril.await_all(list), which returns a table", 3)
  end
  local results, n = await_all(list, timeout)
  return unpack(results, 1, n)
end

--- Waits for fibers and returns their results; an error raised in one is re-raised here
--- with that fiber's traceback.
---   await(f)                      -> all of f's results
---   await(f1, f2, ...)            -> the first result of each, in order
---   await({f1, f2}, {timeout=s})  -> likewise, raising err.code == "timeout" past s
---   await(f, {timeout=s})         -> all of f's results, with a deadline
function M.await(first, ...)
  local nrest = select("#", ...)
  if nrest == 0 and type(first) == "userdata" then return joined(join(first)) end
  if type(first) == "table" then
    local opts = ...
    return await_list(first, check_timeout(opts and opts.timeout, "fibril.await"))
  end
  if not is_fiber(first) then
    error("fibril.await: expected a fiber or a list of fibers, got " .. type(first), 2)
  end
  if nrest == 0 then return joined(join(first)) end
  local second = ...
  if nrest == 1 and type(second) == "table" and not is_fiber(second) then
    return joined(join(first, check_timeout(second.timeout, "fibril.await")))
  end
  return await_list({ first, ... })
end

--- Like await with a list, but returns a table: results[i] is the first result of list[i].
---@param list table fibers
---@param opts table|nil { timeout = s }
---@return table
function M.await_all(list, opts)
  if type(list) ~= "table" then error("fibril.await_all: expected a list of fibers", 2) end
  return (await_all(list, check_timeout(opts and opts.timeout, "fibril.await_all")))
end

--- Suspends the calling fiber for s seconds (millisecond resolution; 0 = one loop turn).
function M.sleep(s)
  if type(s) ~= "number" or not (s >= 0) then
    error("fibril.sleep: seconds must be a non-negative number", 2)
  end
  local ok, err = csleep(s)
  if not ok then error(err, 0) end
end

--- Cancels a fiber: its next suspension point raises err.code == "cancelled"; a wait it is
--- in now is released at once. ---@return boolean false when it had already finished
function M.cancel(f) return cancel(f) end

--- Ends the process with the given status after the current loop turn; never returns.
function M.exit(code)
  code = code or 0
  if code == true then code = 0 elseif code == false then code = 1 end
  if not core.exit(code) then os.exit(code) end
end

--- Monotonic clock in seconds (for measuring; not wall time).
M.now = now

--- Creates an error object `{ code = code, message = message }` like the runtime's own
--- ("timeout", "cancelled"); tostring gives the message and any traceback.
---@return table
function M.error(code, message) return core.error(code, message) end

--- True when v is a fibril error object, and (given code) has that code.
function M.is_error(v, code)
  return getmetatable(v) == ERROR_MT and (code == nil or v.code == code)
end

--- JSON encode/decode (lua-cjson): docs/controllers.md.
M.json = require "fibril.json"

--- The current unit of work's local state (nil outside one): docs/executor.md.
function M.locals() return require("fibril.executor").locals() end

--- Logging with the unit's tags: docs/executor.md.
M.log = require "fibril.log"

M.channel = channel.new
M.semaphore = semaphore.new
M.cond = cond.new

--- Runs fn(item, i) for every item in fibers, at most opts.concurrency at once (default:
--- all), and returns the results in item order. The first error cancels the other calls
--- and is re-raised; so is a timeout (opts.timeout, for the whole map) or a cancel.
---@return table results (results[i] = fn(items[i], i))
function M.map(items, fn, opts)
  if type(items) ~= "table" then error("fibril.map: items must be a list", 2) end
  if type(fn) ~= "function" then error("fibril.map: fn must be a function", 2) end
  opts = opts or {}
  local n = #items
  local results = {}
  if n == 0 then return results end
  local concurrency = opts.concurrency or n
  if type(concurrency) ~= "number" or concurrency < 1 then
    error("fibril.map: concurrency must be a positive integer", 2)
  end
  local timeout = check_timeout(opts.timeout, "fibril.map")
  local me = core.current()
  local next_index, running, failure = 0, 0, nil

  local function worker()
    while failure == nil do
      next_index = next_index + 1
      local i = next_index
      if i > n then break end
      local ok, r = pcall(fn, items[i], i)
      if ok then results[i] = r
      elseif failure == nil then
        failure = r
        wake(me)
      end
    end
    running = running - 1
    if running == 0 then wake(me) end
  end

  local workers = {}
  for w = 1, min(concurrency, n) do
    running = running + 1
    workers[w] = spawn(worker)
  end
  local ok, woken, err = pcall(park, timeout, "fibril.map")
  if not ok or not woken or failure ~= nil then
    for w = 1, #workers do cancel(workers[w]) end
    if not ok then error(woken, 0) end
    error(failure or err, 0)
  end
  return results
end

--- Returns the first of the given fibers to finish (succeeded or failed); the others keep
--- running unless cancelled. `fibril.await(fibril.race(a, b))` gives the winner's results.
--- A table of options as the last argument may give a timeout.
function M.race(...)
  local list, n = { ... }, select("#", ...)
  local timeout
  if n > 0 and type(list[n]) == "table" and list[n][1] == nil then   -- options, not a list
    timeout = check_timeout(list[n].timeout, "fibril.race")
    list[n] = nil
    n = n - 1
  end
  if n == 1 and type(list[1]) == "table" and not is_fiber(list[1]) then
    list = list[1]
    n = #list
  end
  if n == 0 then error("fibril.race: no fibers given", 2) end
  for i = 1, n do
    local f = list[i]
    if not is_fiber(f) then error("fibril.race: argument " .. i .. " is not a fiber", 2) end
    local s = f:status()
    if s == "done" or s == "failed" or s == "cancelled" then return f end
  end
  local me, decided = core.current(), false
  local watchers = {}
  for i = 1, n do
    watchers[i] = spawn(function(f)
      join(f)
      if not decided then
        decided = true
        wake(me, f)
      end
    end, list[i])
  end
  local ok, woken, winner = pcall(park, timeout, "fibril.race")
  decided = true
  for i = 1, n do cancel(watchers[i]) end
  if not ok then error(woken, 0) end
  if not woken then error(winner, 0) end
  return winner
end

--- Counters that must return to zero: live fibers, registry refs and libuv handles held by
--- the scheduler, fibers queued to run.
M.debug = { live = core.live }

return M
