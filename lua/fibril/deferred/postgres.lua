--- fibril.deferred.postgres: the deferred backend for several processes and machines: a
--- queue table in the app's database, claimed with FOR UPDATE SKIP LOCKED (no two claimers
--- get one row, none waits on another) under a lease; `{ tx = tx }` inserts a task in the
--- caller's transaction (the outbox: rolled back with it, visible after its commit).
--- docs/deferred.md.
local fibril = require "fibril"
local cond = require "fibril.cond"
local json = require "fibril.json"
local log = require "fibril.log"

local type, error, ipairs, pairs, tostring, tonumber, pcall, setmetatable, format, find, remove, min =
      type, error, ipairs, pairs, tostring, tonumber, pcall, setmetatable, string.format, string.find,
      table.remove, math.min

local M = {}

M.LEASE = 300        -- seconds a claim lasts unless renewed (deferred.lease): a live process
                     -- renews its claims every lease/3, a dead one's run out and are claimed again
M.BACKLOG_SAMPLE = 0.5   -- seconds an enqueue trusts the table's sampled pending count
M.CHANNEL = "fibril_deferred"

local function pg_module() return require "fibril.pg" end

local function pool_of(cfg)
  if cfg.url then return pg_module().pool(cfg.url, { size = 4 }) end
  return pg_module()
end

local function check_table(name)
  if type(name) ~= "string" or not find(name, "^[%a_][%w_]*$") then
    error("deferred: table must be a plain SQL identifier, got " .. tostring(name), 0)
  end
  return name
end

local function ensure_schema(db, t)
  local ddl = {
    format([[create table if not exists %s (
      id text primary key, kind text not null, name text not null, payload jsonb not null,
      attempt int not null default 0, run_at timestamptz not null default now(),
      status text not null default 'pending', locked_until timestamptz, locked_by text,
      error text, created_at timestamptz not null default now(), dead_at timestamptz)]], t),
    format("create index if not exists %s_due on %s (run_at) where status = 'pending'", t, t),
  }
  for _, sql in ipairs(ddl) do
    -- Two processes creating the table at once: one gets a unique violation on the catalog.
    local ok = pcall(db.exec, db, sql)
    if not ok then
      fibril.sleep(0.05)
      local ok2, err = pcall(db.exec, db, sql)
      if not ok2 then error(err, 0) end
    end
  end
end

local Store = {}
Store.__index = Store

--- Opens the backend: the table (created if missing), a listener for new-task notifications.
---@param cfg table { table =, poll_interval =, concurrency =, lease =, max_pending =,
---   enqueue_timeout =, url = (else the app's database) }
function M.open(cfg)
  local db = pool_of(cfg)
  local t = check_table(cfg.table or "fibril_deferred")
  ensure_schema(db, t)
  local self = setmetatable({
    db = db, table = t, poll = cfg.poll_interval or 1, batch = cfg.concurrency or 16,
    owner = format("%s:%d", require("fibril.core.process").pid(), cfg.slot or 1),
    queue = {}, claimed = {}, count = 0, ready = cond.new(),
    stats = { claims = 0, inserts = 0, renewals = 0 },
    channel = M.CHANNEL .. "_" .. t, lease = cfg.lease or M.LEASE,
    max_pending = cfg.max_pending or 100000, enqueue_timeout = cfg.enqueue_timeout or 5,
  }, Store)
  local ok, sub = pcall(db.listen, db, self.channel, function() self.ready:broadcast() end)
  if ok then self.sub = sub else log.warn("deferred: no LISTEN, polling only", { err = tostring(sub) }) end
  self.renewer = fibril.schedule(self._renew_loop, self)
  return self
end

-- Every lease/3 seconds, extends the lease of every task this process holds (queued or
-- running), so a task that runs longer than the lease is not claimed by another process;
-- `locked_by` keeps it from taking back a claim that already ran out and moved on.
function Store:_renew_loop()
  while not self.closed do
    if not pcall(fibril.sleep, self.lease / 3) or self.closed then return end
    local ids = {}
    for id in pairs(self.claimed) do ids[#ids + 1] = id end
    if #ids > 0 then
      local ok, err = pcall(self.db.exec, self.db, format(
        "update %s set locked_until = now() + make_interval(secs => $1) "
        .. "where locked_by = $2 and id = any($3)", self.table), self.lease, self.owner, ids)
      if ok then
        self.stats.renewals = self.stats.renewals + 1
      elseif fibril.is_error(err, "cancelled") then
        return
      else
        log.error("deferred: renewing task leases failed", { err = tostring(err), tasks = #ids })
      end
    end
  end
end

-- The table's pending tasks (every process's), sampled at most every BACKLOG_SAMPLE seconds.
function Store:_backlog(fresh)
  local now = fibril.now()
  if fresh or not self.backlog_at or now - self.backlog_at > M.BACKLOG_SAMPLE then
    local rows = self.db:query(format("select count(*)::int as n from %s where status = 'pending'",
                                      self.table))
    self.backlog, self.backlog_at = rows[1].n, now
  end
  return self.backlog
end

-- Backpressure: while the table holds more than max_pending pending tasks (a backlog no
-- runner keeps up with), an enqueue waits, looking again every 0.2 s, for up to
-- enqueue_timeout seconds, then raises instead of letting the table grow without bound.
function Store:_wait_for_room(n)
  if self:_backlog() + n <= self.max_pending then
    self.backlog = self.backlog + n
    return
  end
  local deadline = fibril.now() + self.enqueue_timeout
  while fibril.now() < deadline do
    fibril.sleep(min(0.2, deadline - fibril.now()))
    if self:_backlog(true) + n <= self.max_pending then
      self.backlog = self.backlog + n
      return
    end
  end
  error(format("deferred: %d tasks pending in table %s (deferred.max_pending = %d): "
               .. "enqueue gave up after %gs", self.backlog, self.table, self.max_pending,
               self.enqueue_timeout), 0)
end

local function insert_all(self, q, tasks)
  local sql = format("insert into %s (id, kind, name, payload, attempt, run_at) values "
                     .. "($1, $2, $3, $4::jsonb, $5, coalesce(to_timestamp($6), now())) "
                     .. "on conflict (id) do nothing", self.table)
  for _, task in ipairs(tasks) do
    q:exec(sql, task.id, task.kind, task.subscriber or task.task, json.encode(task),
           task.attempt or 0, task.run_at)
  end
  q:exec("select pg_notify($1, '')", self.channel)   -- delivered at commit, not before
  self.stats.inserts = self.stats.inserts + #tasks
end

--- Inserts tasks: in tx when given (part of the caller's transaction), else in a
--- transaction of their own, returning after its commit.
function Store:add(tasks, tx)
  self:_wait_for_room(#tasks)
  if tx then return insert_all(self, tx, tasks) end
  self.db:transaction(function(t) insert_all(self, t, tasks) end)
end

-- Claims up to n due tasks for this process (one statement: SKIP LOCKED, then a lease).
function Store:_claim(n)
  local sql = format([[update %s set locked_until = now() + make_interval(secs => $1),
      locked_by = $2
    where id in (select id from %s where status = 'pending' and run_at <= now()
                 and (locked_until is null or locked_until < now())
                 order by run_at limit $3 for update skip locked)
    returning id, payload, attempt]], self.table, self.table)
  local rows = self.db:query(sql, self.lease, self.owner, n)
  self.stats.claims = self.stats.claims + 1
  for _, row in ipairs(rows) do
    local t = row.payload
    if type(t) == "string" then t = json.decode(t) end
    t.attempt = row.attempt
    self.claimed[t.id] = t
    self.count = self.count + 1
    self.queue[#self.queue + 1] = t
  end
  return #rows
end

--- The next claimed task; one waiting worker claims a batch for all (the others wait on
--- ready), an idle process looks again every poll_interval or at a NOTIFY.
function Store:next(timeout)
  local deadline = fibril.now() + (timeout or 1)
  while not self.closed do
    local t = remove(self.queue, 1)
    if t then return t end
    if not self.claiming then
      self.claiming = true
      local ok, n = pcall(self._claim, self, self.batch)
      self.claiming = false
      if not ok then
        if fibril.is_error(n, "cancelled") then error(n, 0) end
        log.error("deferred: claiming tasks failed", { err = tostring(n) })
        n = 0
      end
      if n > 0 then
        self.ready:broadcast()
      else
        local wait = min(self.poll, deadline - fibril.now())
        if wait <= 0 then return nil end
        local wok, err = pcall(self.ready.wait, self.ready, wait)
        if not wok and fibril.is_error(err, "cancelled") then error(err, 0) end
      end
    else
      local wait = deadline - fibril.now()
      if wait <= 0 then return nil end
      local wok, err = pcall(self.ready.wait, self.ready, wait)
      if not wok and fibril.is_error(err, "cancelled") then error(err, 0) end
    end
    if fibril.now() >= deadline and #self.queue == 0 then return nil end
  end
end

function Store:_forget(t)
  if self.claimed[t.id] then
    self.claimed[t.id] = nil
    self.count = self.count - 1
  end
end

-- Runs a statement, retrying a few times: a lost update means the task runs again (at least
-- once), so it is worth a retry when the database blinks.
local function exec_retry(self, sql, ...)
  for i = 1, 3 do
    local ok, err = pcall(self.db.exec, self.db, sql, ...)
    if ok then return true end
    if i == 3 then log.error("deferred: cannot record a task's outcome", { err = tostring(err) }) end
    pcall(fibril.sleep, 0.1 * i)
  end
end

function Store:done(t)
  self:_forget(t)
  exec_retry(self, format("delete from %s where id = $1", self.table), t.id)
end

function Store:retry(t, run_at, err)
  self:_forget(t)
  t.run_at, t.error = run_at, err
  exec_retry(self, format("update %s set attempt = $2, run_at = to_timestamp($3), error = $4, "
                          .. "locked_until = null, locked_by = null where id = $1", self.table),
             t.id, t.attempt, run_at, err)
end

function Store:dead(t, err)
  self:_forget(t)
  exec_retry(self, format("update %s set status = 'dead', attempt = $2, error = $3, dead_at = now(), "
                          .. "locked_until = null, locked_by = null where id = $1", self.table),
             t.id, t.attempt, err)
end

--- Tasks claimed by this process and not finished.
function Store:pending() return self.count end

--- Stops listening; claimed tasks not started are released for others at once.
function Store:close()
  if self.closed then return end
  self.closed = true
  self.ready:broadcast()
  if self.renewer then fibril.cancel(self.renewer) end
  if self.sub then pcall(self.sub.unlisten, self.sub) end
  local ids = {}
  for _, t in ipairs(self.queue) do ids[#ids + 1] = t.id end
  self.queue = {}
  if #ids > 0 then
    pcall(self.db.exec, self.db, format("update %s set locked_until = null, locked_by = null "
                                        .. "where id = any($1)", self.table), ids)
  end
  if self.db ~= pg_module() then pcall(self.db.close, self.db) end
end

-- ---- dead letters, for the CLI -------------------------------------------------------------

local function cli_store(config)
  local pg = pg_module()
  if config.database then pg.configure(config.database) end
  return pg, check_table(config.deferred.table or "fibril_deferred")
end

--- The dead tasks, oldest first.
function M.dead_tasks(config)
  local pg, t = cli_store(config)
  local rows = pg:query(format("select payload, attempt, error, extract(epoch from dead_at) as dead_at "
                               .. "from %s where status = 'dead' order by dead_at, id", t))
  local list = {}
  for i, row in ipairs(rows) do
    local task = type(row.payload) == "string" and json.decode(row.payload) or row.payload
    task.attempt, task.error, task.dead_at = row.attempt, row.error, tonumber(row.dead_at)
    list[i] = task
  end
  return list
end

--- The pending tasks, due first; a claimed one has claimed_by and claimed_until (epoch s).
function M.pending_tasks(config)
  local pg, t = cli_store(config)
  local rows = pg:query(format("select payload, attempt, error, extract(epoch from run_at) as run_at, "
                               .. "locked_by, extract(epoch from locked_until) as locked_until "
                               .. "from %s where status = 'pending' order by run_at, id", t))
  local list, now = {}, require("fibril.core.fiber").walltime()
  local function value(v) if v ~= json.null then return v end end   -- SQL NULL (pg.null): nil
  for i, row in ipairs(rows) do
    local task = type(row.payload) == "string" and json.decode(row.payload) or row.payload
    task.attempt, task.error, task.run_at = row.attempt, value(row.error), tonumber(row.run_at)
    local until_ = value(row.locked_until) and tonumber(row.locked_until)
    if until_ and until_ > now and value(row.locked_by) then
      task.claimed_by, task.claimed_until = row.locked_by, until_
    end
    list[i] = task
  end
  return list
end

--- Sets dead tasks (ids, or all) pending again with attempts from zero; returns their ids.
function M.retry_dead(config, ids)
  local pg, t = cli_store(config)
  local sql = format("update %s set status = 'pending', attempt = 0, run_at = now(), error = null, "
                     .. "dead_at = null where status = 'dead'%s returning id", t,
                     ids and " and id = any($1)" or "")
  local rows = ids and pg:query(sql, ids) or pg:query(sql)
  local out = {}
  for i, row in ipairs(rows) do out[i] = row.id end
  pg:exec("select pg_notify($1, '')", M.CHANNEL .. "_" .. t)
  return out
end

return M
