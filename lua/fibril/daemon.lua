--- fibril.daemon: long-running background loops (queue consumers, pollers). A daemon is a
--- class made with `Daemon:extend("Name")`; the runtime runs each in its own fiber, one run of
--- `perform` at a time, each run one unit of work, `cleanup` after every run; it restarts a
--- run that returned or raised after a jittered exponential backoff, and stops them all on
--- shutdown and on a code reload. docs/daemons.md is the guide.
---
---   local Daemon = require "fibril.daemon"
---   local D = Daemon:extend("QueueConsumer")
---   D.scope = "node"                       -- or "worker": one in every worker process
---   function D:perform() while not self:stopping() do ... end end
---   function D:cleanup() if self.conn then self.conn:close() end end
---   return D
local fibril = require "fibril"
local core = require "fibril.core.fiber"
local executor = require "fibril.executor"
local log = require "fibril.log"

local type, error, setmetatable, getmetatable, rawget, tostring, ipairs, xpcall, pcall =
      type, error, setmetatable, getmetatable, rawget, tostring, ipairs, xpcall, pcall
local random, min, max, format = math.random, math.min, math.max, string.format
local now, sleep, schedule, cancel = fibril.now, fibril.sleep, fibril.schedule, fibril.cancel
local set_context, with_traceback = core.set_context, executor.with_traceback

local Daemon = {}
Daemon.__index = Daemon
Daemon.scope = "node"

--- The backoff defaults (config keys daemons.backoff_min, daemons.backoff_max,
--- daemons.reset_after): the first restart waits about 0.1 s, each next one twice as long up
--- to 30 s; a run that lasted 60 s counts as healthy and resets the delay.
Daemon.BACKOFF_MIN, Daemon.BACKOFF_MAX, Daemon.RESET_AFTER = 0.1, 30, 60
--- A wait is the delay minus up to this fraction of it (so waits still grow: 0.75 * 2 > 1).
Daemon.JITTER = 0.25

--- Makes a daemon class (a subclass of Daemon, or of another daemon).
---@param name string the daemon's name in logs (default: the file name, set by the app loader)
---@return table the class
function Daemon:extend(name)
  if name ~= nil and (type(name) ~= "string" or name == "") then
    error("Daemon:extend: the name must be a non-empty string", 2)
  end
  local D = setmetatable({}, self)
  D.__index = D
  D.name = name
  return D
end

--- True when v is a daemon class made with Daemon:extend.
function Daemon.is_daemon(v)
  if type(v) ~= "table" then return false end
  local mt = getmetatable(v)
  while mt do
    if mt == Daemon then return true end
    mt = getmetatable(mt)
  end
  return false
end

--- The work: a loop that runs until it returns, raises or is stopped. Subclasses override it.
function Daemon:perform()
  error(format("daemon %s has no perform method", tostring(self.name)), 2)
end

--- Called after every run of perform, however it ended (returned, raised, stopped), in the
--- same fiber: close what perform opened. The default does nothing.
function Daemon.cleanup() end

--- True once the runtime asked this daemon to stop (shutdown, reload): a loop that catches
--- errors itself should test it, since the stop's "cancelled" error may land in its pcall.
---@return boolean
function Daemon:stopping() return self._run.stopping end

--- The delay before the next run, and the delay to keep for the run after it.
---@param delay number the delay kept from the previous restart (min at first)
---@param lived number seconds the run that just ended lasted
---@param opts table|nil { min =, max =, reset_after = } (defaults: the BACKOFF_* fields)
---@return number wait, number next
function Daemon.backoff(delay, lived, opts)
  local lo = opts and opts.min or Daemon.BACKOFF_MIN
  local hi = opts and opts.max or Daemon.BACKOFF_MAX
  local reset = opts and opts.reset_after or Daemon.RESET_AFTER
  if lived >= reset then delay = lo end
  delay = min(delay, hi)
  return delay * (1 - Daemon.JITTER * random()), min(delay * 2, hi)
end

--- True when a daemon of this scope runs in this process: "worker" everywhere, "node" only in
--- a single-process server or in worker 1 (docs/daemons.md says why not in the master).
---@param scope string "node" | "worker"
---@param worker integer|nil this worker's number (FIBRIL_WORKER), nil without --workers
function Daemon.runs_here(scope, worker)
  return scope == "worker" or worker == nil or worker == 1
end

-- One run: perform, then cleanup (even when perform raised), as one unit of work; the
-- perform error wins over a cleanup error. run.phase tells stop whether a cancel is due.
local function run_once(inst)
  local run = inst._run
  run.phase = "perform"
  local ok, err = xpcall(inst.perform, with_traceback, inst)
  run.phase = "cleanup"               -- a stop now waits for cleanup, never cancels it
  local cok, cerr = xpcall(inst.cleanup, with_traceback, inst)
  run.phase = "done"
  if not ok then error(err, 0) end
  if not cok then error(cerr, 0) end
end

-- The backoff settings, read at each restart: a reload may change config.
local function backoff_settings(app)
  local d = app.config and app.config.daemons or {}
  return { min = d.backoff_min or Daemon.BACKOFF_MIN, max = d.backoff_max or Daemon.BACKOFF_MAX,
           reset_after = d.reset_after or Daemon.RESET_AFTER }
end

-- The fiber of one daemon: run, wait with backoff, run again, until stopped.
local function supervise(sup, run)
  set_context(nil)                      -- each run is a unit of its own, whoever started us
  local class, name = run.class, run.name
  local delay, attempt = backoff_settings(sup.app).min, 0
  while not run.stopping do
    attempt = attempt + 1
    local inst = setmetatable({ name = name, app = sup.app, attempt = attempt, _run = run }, class)
    local started = now()
    log.debug("daemon started", { daemon = name, attempt = attempt })
    -- Fresh tags each run: log.tag adds to this table for the rest of the unit.
    local ok, err = executor.call(run_once, { daemon = name }, inst)
    if run.stopping then break end
    local wait
    wait, delay = Daemon.backoff(delay, now() - started, backoff_settings(sup.app))
    local fields = { daemon = name, attempt = attempt, delay = format("%.3f", wait) }
    if ok then
      log.warn("daemon returned: restarting", fields)
    else
      fields.err = tostring(err)        -- the message and the traceback
      log.error("daemon failed: restarting", fields)
    end
    run.phase = "wait"
    if not pcall(sleep, wait) then break end   -- cancelled: stopping
  end
  log.info("daemon stopped", { daemon = name, attempts = attempt })
end

local Supervisor = {}
Supervisor.__index = Supervisor

-- Starts one fiber per class that runs in this process.
local function start_all(sup, classes)
  for _, class in ipairs(classes) do
    local scope = rawget(class, "scope") or class.scope
    if Daemon.runs_here(scope, sup.worker) then
      local run = { class = class, name = class.name or "daemon", scope = scope, stopping = false }
      run.fiber = schedule(supervise, sup, run)
      sup.runs[#sup.runs + 1] = run
      log.info("daemon starting", { daemon = run.name, scope = scope, worker = sup.worker or "main" })
    end
  end
end

--- Starts the daemons of app (app.daemons, from fibril.app) that belong in this process, and,
--- in development, restarts them with the new code after each reload (which may add or
--- remove daemons).
---@param app table from fibril.app.load (or { daemons = {...}, config = {...} })
---@param opts table|nil { worker = n } this worker's number (nil: a single process)
---@return table supervisor with stop(), names()
function Daemon.start(app, opts)
  if type(app) ~= "table" then error("Daemon.start: expected an app table", 2) end
  local sup = setmetatable({
    app = app, worker = opts and opts.worker, runs = {},
    stop_timeout = app.config and app.config.http and app.config.http.drain_timeout or 30,
  }, Supervisor)
  start_all(sup, app.daemons or {})
  -- After a reload, app.daemons holds the new classes: stop the old runs, start the new.
  sup.on_reload = executor.to_prepare(function()
    local previous = sup.restarting
    sup.restarting = schedule(function()
      set_context(nil)
      if previous then pcall(fibril.await, previous) end
      if sup.stopped then return end
      sup:stop_runs()
      if not sup.stopped then start_all(sup, app.daemons or {}) end
    end)
  end)
  return sup
end

--- Stops every run: marks it stopping and cancels its fiber (perform raises "cancelled" at
--- its suspension point, then cleanup runs; a cleanup under way is left to finish), and
--- waits up to the stop timeout for them.
function Supervisor:stop_runs(timeout)
  local runs, fibers = self.runs, {}
  self.runs = {}
  for i, run in ipairs(runs) do
    run.stopping = true
    if run.phase ~= "cleanup" then cancel(run.fiber) end
    fibers[i] = run.fiber
  end
  -- Each fiber on its own: one that ended cancelled (before it ever ran) must not cut the
  -- wait for the others short. One deadline for all.
  timeout = timeout or self.stop_timeout
  local deadline, all = now() + timeout, true
  for i, f in ipairs(fibers) do
    pcall(fibril.await, f, { timeout = max(0, deadline - now()) })
    local s = f:status()
    if s ~= "done" and s ~= "failed" and s ~= "cancelled" then
      log.warn("daemon did not stop in time", { daemon = runs[i].name, timeout = timeout })
      all = false
    end
  end
  return all
end

--- Stops the daemons for good (shutdown): no restart, no reload any more.
---@param timeout number|nil seconds to wait for cleanups (default: http.drain_timeout)
---@return boolean true when every daemon stopped in time
function Supervisor:stop(timeout)
  self.stopped = true
  executor.remove(self.on_reload)
  -- A restart under way stops its old runs and, seeing stopped, starts no new ones.
  if self.restarting then pcall(fibril.await, self.restarting, { timeout = timeout or self.stop_timeout }) end
  return self:stop_runs(timeout)
end

--- The names of the daemons running in this process, in start order.
function Supervisor:names()
  local names = {}
  for i, run in ipairs(self.runs) do names[i] = run.name end
  return names
end

return Daemon
