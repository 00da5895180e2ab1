--- fibril.deferred: durable background tasks: deferred event subscribers and fibril.task
--- classes. A backend stores them (deferred/journal.lua: a checksummed append-only file per
--- process; deferred/postgres.lua: a shared queue table); this module runs them,
--- deferred.concurrency at a time, each as a unit of work, retrying with exponential backoff
--- and jitter, and dead-lettering after the last retry. Delivery is at least once: a task
--- whose completion was not recorded (crash) runs again. docs/deferred.md.
local fibril = require "fibril"
local core = require "fibril.core.fiber"
local executor = require "fibril.executor"
local log = require "fibril.log"

local type, error, pairs, ipairs, tostring, pcall, next, min, max, random, format, sub, remove =
      type, error, pairs, ipairs, tostring, pcall, next, math.min, math.max, math.random,
      string.format, string.sub, table.remove
local walltime, set_context = core.walltime, core.set_context

local M = {}

M.BACKOFF_MIN, M.BACKOFF_MAX = 1, 600   -- config deferred.backoff_min / backoff_max
M.ERROR_MAX = 4000                      -- bytes of a failure kept in the task record

local runner                            -- the running runner in this process, or nil

--- The delay before retry number attempt (1 = after the first failure): base * 2^(attempt-1)
--- capped at max, then "equal jitter": half of it fixed, half random, so retries of tasks
--- that failed together spread out but still grow.
---@param attempt integer
---@param opts table|nil { min =, max = } seconds
---@return number seconds
function M.backoff(attempt, opts)
  local lo = opts and opts.min or M.BACKOFF_MIN
  local hi = opts and opts.max or M.BACKOFF_MAX
  local d = min(hi, lo * 2 ^ (attempt - 1))
  return d / 2 + random() * d / 2
end

-- ---- what a task runs ---------------------------------------------------------------------

-- The subscriber class named name, from the live subscriptions (after a reload: the new code).
local function find_subscriber(name)
  for _, s in ipairs(require("fibril.events").subscriptions()) do
    if s.subscriber.name == name then return s.subscriber end
  end
end

local function perform(t)
  if t.kind == "event" then
    local events = require "fibril.events"
    local S = find_subscriber(t.subscriber)
    if not S then error(format("deferred: no subscriber named '%s' is loaded", tostring(t.subscriber)), 0) end
    return events.run_subscriber(S, events.from_table(t.event), t)
  elseif t.kind == "task" then
    local Task = require "fibril.task"
    local T = Task.find(t.task)
    if not T then error(format("deferred: no task class named '%s' is loaded", tostring(t.task)), 0) end
    return Task.run(T, t)
  end
  error("deferred: unknown task kind " .. tostring(t.kind), 0)
end

local function short(err)
  local s = tostring(err)
  if #s > M.ERROR_MAX then s = sub(s, 1, M.ERROR_MAX) .. "..." end
  return s
end

local function key_of(t) return t.subscriber or t.task or "?" end

-- Runs one task as a unit of work and records the outcome.
local function execute(r, t)
  local tags = {}
  if type(t.ctx) == "table" then for k, v in pairs(t.ctx) do tags[k] = v end end
  tags.task = t.id
  tags[t.kind == "event" and "subscriber" or "task_class"] = key_of(t)
  t.attempt = (t.attempt or 0) + 1
  r.running = r.running + 1
  local ok, err = executor.call(perform, tags, t)
  r.running = r.running - 1
  local store = r.store
  if ok then
    store:done(t)
    r.stats.done = r.stats.done + 1
    return
  end
  local retries = t.retries or r.retries
  local fields = { task = t.id, [t.kind == "event" and "subscriber" or "task_class"] = key_of(t),
                   attempt = t.attempt, err = tostring(err) }
  if t.attempt > retries then
    log.error("deferred task failed for the last time: dead letter", fields)
    store:dead(t, short(err))
    r.stats.dead = r.stats.dead + 1       -- counted once the dead letter is written
  else
    local wait = M.backoff(t.attempt, t.backoff or r.backoff)
    fields.delay = format("%.3f", wait)
    r.stats.retried = r.stats.retried + 1
    log.warn("deferred task failed: retrying", fields)
    store:retry(t, walltime() + wait, short(err))
  end
end

-- Runs t, honouring its max_concurrency: a task over its limit is parked (still claimed)
-- and run by the worker that frees a slot.
local function run(r, t)
  local limit, key = t.max_concurrency, key_of(t)
  if limit then
    local n = r.per_key[key] or 0
    if n >= limit then
      local q = r.parked[key] or {}
      r.parked[key] = q
      q[#q + 1] = t
      return
    end
  end
  while t do
    r.per_key[key] = (r.per_key[key] or 0) + 1
    execute(r, t)
    r.per_key[key] = r.per_key[key] - 1
    local q = r.parked[key]
    t = q and remove(q, 1)
  end
end

local function worker(r)
  set_context(nil)
  while not r.stopping do
    local ok, t = pcall(r.store.next, r.store, 1)
    if not ok then break end                       -- cancelled: stopping
    if t and not r.stopping then run(r, t) end
  end
end

-- ---- lifecycle ----------------------------------------------------------------------------

local function options(opts)
  local app = opts.app
  local cfg = {}
  local dcfg = app and app.config and app.config.deferred or {}
  for k, v in pairs(dcfg) do cfg[k] = v end
  for k, v in pairs(opts) do if k ~= "app" then cfg[k] = v end end
  cfg.dir = cfg.dir or (app and require("fibril.deferred.journal").dir(app.dir, cfg))
  return cfg, app
end

--- Starts the deferred runtime of this process: opens the backend (replaying the journal),
--- and starts the workers. `fibril run` calls it; a script or spec calls it itself.
---@param opts table { app = app } (its config's deferred section) and/or overrides:
---   { dir =, backend =, concurrency =, retries =, fsync =, fsync_interval =, max_pending =,
---     enqueue_timeout =, backoff_min =, backoff_max =, slot =, schedule = }
---@return table the runner (deferred.stop() ends it)
function M.start(opts)
  if runner then error("deferred.start: already running in this process", 2) end
  local cfg = options(opts or {})
  local store
  if (cfg.backend or "journal") == "postgres" then
    store = require("fibril.deferred.postgres").open(cfg)
  else
    if not cfg.dir then error("deferred.start: no journal directory (dir = ... or app = app)", 2) end
    store = require("fibril.deferred.journal").open(cfg)
  end
  local r = {
    store = store, cfg = cfg, retries = cfg.retries or 20, running = 0, per_key = {}, parked = {},
    backoff = { min = cfg.backoff_min or M.BACKOFF_MIN, max = cfg.backoff_max or M.BACKOFF_MAX },
    stats = { done = 0, retried = 0, dead = 0 }, fibers = {}, slot = cfg.slot or 1,
  }
  for i = 1, cfg.concurrency or 16 do r.fibers[i] = fibril.schedule(worker, r) end
  -- Work that belongs to one process only: the CLI's retries, the periodic schedule.
  if r.slot == 1 then
    if store.watch_inbox then store:watch_inbox() end
    r.scheduled = M._schedule(r, cfg.schedule)
  end
  runner = r
  return r
end

-- One fiber per periodic entry { every = s, task = "Name", args = {...} }: it enqueues the
-- task every `every` seconds (the first time after one period).
function M._schedule(r, entries)
  local fibers = {}
  for _, e in ipairs(entries or {}) do
    fibers[#fibers + 1] = fibril.schedule(function()
      set_context(nil)
      while not r.stopping do
        if not pcall(fibril.sleep, e.every) or r.stopping then return end
        local ok, err = pcall(function()
          local T = require("fibril.task").find(e.task)
          if not T then error("no task class named '" .. tostring(e.task) .. "'", 0) end
          -- One id per task and period: a second scheduler (another machine on the postgres
          -- backend) inserting the same period's task is a no-op (ON CONFLICT DO NOTHING).
          local period = math.floor(walltime() / e.every)
          T:enqueue(e.args or {}, { id = format("schedule:%s:%d", e.task, period) })
        end)
        if not ok then log.error("deferred schedule failed", { task = e.task, err = tostring(err) }) end
      end
    end)
  end
  return fibers
end

local lazy                              -- boot's options, for a start on first enqueue

--- Starts the deferred runtime for a served app when the app uses it (a deferred subscriber,
--- a task class, a schedule, or a journal already on disk, to replay); otherwise on the first
--- enqueue. server.run calls it with this process's slot (FIBRIL_WORKER, or 1) and the
--- number of worker slots (FIBRIL_WORKERS, or 1): slot 1 adopts the journals of slots past it.
function M.boot(app, slot, workers)
  lazy = { app = app, slot = slot, workers = workers }
  local cfg = app.config.deferred or {}
  local used = (app.tasks and #app.tasks > 0) or cfg.schedule ~= nil or cfg.backend == "postgres"
  for _, s in ipairs(require("fibril.events").subscriptions()) do
    used = used or s.opts.deferred == true
  end
  if not used and cfg.path then
    local journal = require "fibril.deferred.journal"
    local dir = journal.dir(app.dir, cfg)
    local f = io.open(dir .. "/journal-" .. slot .. ".log", "r")
    if f then f:close() used = true end
    used = used or (slot == 1 and #journal.orphans(dir, workers or 1) > 0)
  end
  if used then return M.start(lazy) end
end

--- Stops this process's deferred runtime: no new task starts; tasks running may finish for
--- timeout seconds, then are cancelled (they run again later: at least once); the journal
--- is flushed and closed.
---@return boolean true when every running task finished in time
function M.stop(timeout)
  local r = runner
  lazy = nil
  if not r then return true end
  runner = nil
  r.stopping = true
  for _, f in ipairs(r.scheduled or {}) do fibril.cancel(f) end
  if r.store.ready then r.store.ready:broadcast() end
  local deadline, all = fibril.now() + (timeout or 30), true
  for _, f in ipairs(r.fibers) do
    pcall(fibril.await, f, { timeout = max(0, deadline - fibril.now()) })
    local s = f:status()
    if s ~= "done" and s ~= "failed" and s ~= "cancelled" then
      all = false
      fibril.cancel(f)
      pcall(fibril.await, f, { timeout = 1 })
    end
  end
  r.store:close()
  if not all then log.warn("deferred: tasks still running at shutdown were cancelled", {}) end
  return all
end

--- The runner of this process, or nil.
function M.runner() return runner end

--- Tasks pending in this process (0 when not running).
function M.pending() return runner and runner.store:pending() or 0 end

local function need_runner(who, opts)
  if not runner and lazy then M.start(lazy) end
  if opts and opts.tx ~= nil and runner and (runner.cfg.backend or "journal") ~= "postgres" then
    error(who .. ": { tx = } needs deferred.backend = \"postgres\" (the journal cannot join a "
          .. "database transaction)", 3)
  end
  if not runner then
    error(who .. ": deferred tasks are not running in this process (`fibril run` starts them; "
          .. "a script calls require(\"fibril.deferred\").start{ dir = ... })", 3)
  end
  return runner
end

-- The fiber-local context a task carries: the unit's log tags (request id and the app's).
local function context_tags()
  local tags = log.tags()
  if next(tags) == nil then return nil end
  return tags
end

--- Queues one deferred task per subscriber for ev (events.publish calls it); returns once
--- they are durable. opts.tx: write them in that pg transaction (postgres backend).
function M.enqueue_event(ev, subs, opts)
  local r = need_runner("events.publish", opts)
  local events = require "fibril.events"
  local t_ev = events.to_table(ev)
  local ctx = context_tags()
  local tasks = {}
  for i, s in ipairs(subs) do
    local o = s.opts
    tasks[i] = { id = t_ev.id .. "/" .. s.subscriber.name, kind = "event",
                 subscriber = s.subscriber.name, event = t_ev, attempt = 0, ctx = ctx,
                 retries = o.retries, backoff = o.backoff, max_concurrency = o.max_concurrency }
  end
  r.store:add(tasks, opts and opts.tx)
  return tasks
end

--- Queues a task of a fibril.task class (Task:enqueue calls it).
---@param opts table|nil { delay = s } or { delay_until = epoch seconds }, { tx = tx },
---   { id = "..." } (a task with that id still pending makes this a no-op)
function M.enqueue_task(class, args, opts)
  local r = need_runner(class.name .. ":enqueue", opts)
  local run_at
  if opts and opts.delay then run_at = walltime() + opts.delay end
  if opts and opts.delay_until then run_at = opts.delay_until end
  local t = { id = opts and opts.id or require("fibril.events").new_id(), kind = "task", task = class.name,
              args = args, attempt = 0, run_at = run_at, ctx = context_tags(),
              retries = class.retries, backoff = class.backoff,
              max_concurrency = class.max_concurrency }
  r.store:add({ t }, opts and opts.tx)
  return t.id
end

--- Counters of this process: { done, retried, dead, pending, running }.
function M.stats()
  if not runner then return { done = 0, retried = 0, dead = 0, pending = 0, running = 0 } end
  local s = runner.stats
  return { done = s.done, retried = s.retried, dead = s.dead, pending = runner.store:pending(),
           running = runner.running, store = runner.store.stats }
end

return M
