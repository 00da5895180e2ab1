--- fibril.deferred.journal: the default deferred backend, an append-only journal per process
--- in APP/storage/deferred (journal-<slot>.log). Every record is one line `CRC32HEX JSON\n`;
--- a line whose checksum or JSON fails (a torn tail after a crash, a flipped bit) is skipped
--- and the rest replays. Concurrent adds share one write + fdatasync (group commit). Every
--- live task is held in memory (bounded by deferred.max_pending); compaction rewrites the
--- file with the live ones only. docs/deferred.md.
local fibril = require "fibril"
local cjournal = require "fibril.core.journal"
local core = require "fibril.core.fiber"
local cond = require "fibril.cond"
local json = require "fibril.json"
local log = require "fibril.log"
local fs = require "fibril.core.fs"
local semaphore = require "fibril.semaphore"

local type, error, pairs, ipairs, tostring, tonumber, pcall, setmetatable, max, min, floor =
      type, error, pairs, ipairs, tostring, tonumber, pcall, setmetatable, math.max, math.min,
      math.floor
local format, concat, sort, sub, find, match =
      string.format, table.concat, table.sort, string.sub, string.find, string.match
local crc32, walltime, open, remove = cjournal.crc32, core.walltime, io.open, os.remove
local encode, decode = json.encode, json.decode

local M = {}

M.COMPACT_MIN = 4096   -- finished records in the file before a compaction is worth it
local INBOX_EVERY = 1  -- seconds between looks into inbox/ (retries asked by the CLI)

-- ---- the record codec -------------------------------------------------------------------

--- One record as a journal line.
function M.encode_record(rec)
  local body = encode(rec)
  return format("%08x %s\n", crc32(body), body)
end

--- The records in data (a whole file), and how many lines were corrupt. A line is good when
--- its checksum matches and its JSON decodes to a table with an op; anything else is skipped,
--- including a last line without its newline (a write cut short by a crash).
function M.decode_records(data)
  local records, bad, pos, n = {}, 0, 1, #data
  while pos <= n do
    local nl = find(data, "\n", pos, true)
    if not nl then bad = bad + 1 break end              -- torn tail
    local line = sub(data, pos, nl - 1)
    pos = nl + 1
    local sum, body = match(line, "^(%x%x%x%x%x%x%x%x) (.*)$")
    local ok, rec = false, nil
    if sum and tonumber(sum, 16) == crc32(body) then
      ok, rec = pcall(decode, body)
    end
    if ok and type(rec) == "table" and type(rec.op) == "string" then
      records[#records + 1] = rec
    else
      bad = bad + 1
    end
  end
  return records, bad
end

local function read_file(path)
  local f = open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

--- The live tasks after replaying the records in order (id -> task), and the number of
--- finished records (what a compaction would drop).
function M.replay(records)
  local tasks, finished = {}, 0
  for _, r in ipairs(records) do
    if r.op == "add" and type(r.task) == "table" and type(r.task.id) == "string" then
      if tasks[r.task.id] then finished = finished + 1 end
      tasks[r.task.id] = r.task
    elseif r.op == "done" or r.op == "dead" then
      if tasks[r.id] then tasks[r.id] = nil end
      finished = finished + 2
    elseif r.op == "retry" and tasks[r.id] then
      local t = tasks[r.id]
      t.attempt, t.run_at, t.error = r.attempt, r.run_at, r.error
      finished = finished + 1
    end
  end
  return tasks, finished
end

-- ---- a min-heap of tasks by run_at (then by sequence: FIFO among equals) -----------------

local function before(a, b)
  local ra, rb = a.run_at or 0, b.run_at or 0
  if ra ~= rb then return ra < rb end
  return a._seq < b._seq
end

local function heap_push(h, t)
  local i = #h + 1
  h[i] = t
  while i > 1 do
    local p = floor(i / 2)
    if not before(h[i], h[p]) then break end
    h[i], h[p] = h[p], h[i]
    i = p
  end
end

local function heap_pop(h)
  local n = #h
  local top, last = h[1], h[n]
  h[n] = nil                 -- two statements: `h[1], h[n] = h[n], nil` has no defined order
  n = n - 1
  if n == 0 then return top end
  h[1] = last
  local i = 1
  while true do
    local l, r, m = 2 * i, 2 * i + 1, i
    if l <= n and before(h[l], h[m]) then m = l end
    if r <= n and before(h[r], h[m]) then m = r end
    if m == i then break end
    h[i], h[m] = h[m], h[i]
    i = m
  end
  return top
end

-- ---- the store --------------------------------------------------------------------------

local Store = {}
Store.__index = Store

--- The journal directory of an app config (deferred.path, relative to the app).
function M.dir(app_dir, cfg)
  local p = cfg.path
  if sub(p, 1, 1) ~= "/" then p = app_dir .. "/" .. p end
  return p
end

local function mkdir_p(dir)
  os.execute("mkdir -p '" .. dir:gsub("'", "'\\''") .. "'")
end

-- Sorts tasks for a stable rewrite and queue order.
local function by_seq(a, b) return a._seq < b._seq end

--- The journals in dir of slots past workers (left by a larger --workers N), as paths.
function M.orphans(dir, workers)
  local list = {}
  for _, e in ipairs(fs.list(dir) or {}) do
    local k = tonumber(match(e.name, "^journal%-(%d+)%.log$"))
    if k and k > workers then list[#list + 1] = dir .. "/" .. e.name end
  end
  sort(list)
  return list
end

--- Opens (creating) the journal of this process slot in dir and replays it. Slot 1 also
--- adopts orphan journals (opts.workers: slots now running): their live tasks join its
--- journal, which is rewritten before the orphan files are removed (a crash in between runs
--- them twice: at least once).
---@param opts table { dir =, slot = n, fsync = "always"|"batch"|"never", fsync_interval =,
---   max_pending =, enqueue_timeout = }
function M.open(opts)
  local dir = opts.dir
  mkdir_p(dir .. "/inbox")
  local path = format("%s/journal-%d.log", dir, opts.slot or 1)
  local data = read_file(path) or ""
  local records, bad = M.decode_records(data)
  local tasks, finished = M.replay(records)
  local orphans = (opts.slot or 1) == 1 and M.orphans(dir, opts.workers or 1) or {}
  for _, o in ipairs(orphans) do
    local orecs, obad = M.decode_records(read_file(o) or "")
    bad = bad + obad
    for id, t in pairs(M.replay(orecs)) do tasks[id] = t end
    log.info("deferred journal adopted", { path = o, into = path })
  end
  if #orphans > 0 then finished = finished + 1 end     -- forces the rewrite below
  local self = setmetatable({
    dir = dir, path = path, slot = opts.slot or 1, fsync = opts.fsync or "always",
    fsync_interval = opts.fsync_interval or 0.1, max_pending = opts.max_pending or 100000,
    enqueue_timeout = opts.enqueue_timeout or 5,
    tasks = {}, adding = {}, count = 0, heap = {}, seq = 0, finished = finished,
    buf = {}, batch = { done = cond.new() }, writing = false, wake = cond.new(),
    ready = cond.new(), room = cond.new(), dead_lock = semaphore.new(1),
    stats = { writes = 0, syncs = 0, records = 0 },
  }, Store)
  local list = {}
  for _, t in pairs(tasks) do list[#list + 1] = t end
  sort(list, function(a, b) return tostring(a.id) < tostring(b.id) end)
  for _, t in ipairs(list) do self:_track(t) end
  local j, err = cjournal.open(path)
  if not j then error("deferred: " .. tostring(err), 0) end
  self.j = j
  local dj, derr = cjournal.open(dir .. "/dead.log")
  if not dj then error("deferred: " .. tostring(derr), 0) end
  self.dead_j = dj
  if bad > 0 then
    log.warn("deferred journal: skipped corrupt records", { path = path, records = bad })
  end
  -- A replayed file with garbage or finished records is rewritten before anything is added,
  -- so appends never follow a torn line.
  if bad > 0 or finished > 0 then
    if not self:_rewrite() and #orphans > 0 then
      error("deferred: cannot rewrite " .. path .. " to adopt " .. concat(orphans, ", "), 0)
    end
  end
  for _, o in ipairs(orphans) do remove(o) end
  self.replayed = self.count
  if self.count > 0 then
    log.info("deferred journal replayed", { path = path, tasks = self.count })
  end
  self.writer = fibril.schedule(self._write_loop, self)
  return self
end

function Store:_track(t)
  self.seq = self.seq + 1
  t._seq = self.seq
  if not self.tasks[t.id] then self.count = self.count + 1 end
  self.tasks[t.id] = t
  heap_push(self.heap, t)
  self.ready:signal()
end

-- The record of a task as stored: without the in-memory fields.
local function stored(t)
  local c = {}
  for k, v in pairs(t) do if sub(k, 1, 1) ~= "_" then c[k] = v end end
  return c
end

-- Queues a line for the writer; wait = true suspends until it is durable (or raises).
-- tasks: the ones the line adds, queued to run by the writer once the line is written.
function Store:_put(line, wait, tasks)
  local batch = self.batch
  local buf = self.buf
  buf[#buf + 1] = line
  if tasks then
    local list = batch.tasks or {}
    batch.tasks = list
    for _, t in ipairs(tasks) do list[#list + 1] = t end
  end
  if wait then batch.waiters = (batch.waiters or 0) + 1 end
  self.wake:signal()
  if not wait then return end
  local err = batch.done:wait()
  if err then error("deferred: journal write failed (" .. self.path .. "): " .. tostring(err), 0) end
end

-- The group-commit loop, the only user of the journal's descriptor: takes every line queued
-- meanwhile, one write (+ fdatasync when fsync = "always" and a publisher waits), then wakes
-- that batch's publishers. With fsync = "batch" it syncs every fsync_interval instead.
function Store:_write_loop()
  core.set_context(nil)
  local unsynced, last_sync = false, fibril.now()
  while true do
    if #self.buf == 0 then
      if self.closed then break end
      local wait = 1
      if unsynced then wait = max(0, last_sync + self.fsync_interval - fibril.now()) end
      pcall(self.wake.wait, self.wake, wait)
    end
    if #self.buf > 0 then
      local lines, batch = self.buf, self.batch
      self.buf, self.batch = {}, { done = cond.new() }
      local sync = self.fsync == "always" and (batch.waiters or 0) > 0
      local ok, err = self.j:append(concat(lines), sync)
      local st = self.stats
      st.writes, st.records = st.writes + 1, st.records + #lines
      if sync then st.syncs = st.syncs + 1 end
      if not sync and self.fsync == "batch" then unsynced = true end
      -- Publishers first, then the workers: a task starts after its publish has returned.
      batch.done:broadcast((not ok) and (err or "write failed") or nil)
      for _, t in ipairs(batch.tasks or {}) do
        self.adding[t.id] = nil
        if ok then self:_track(t) end
      end
      if not ok then log.error("deferred journal write failed", { path = self.path, err = err }) end
    end
    if unsynced and fibril.now() - last_sync >= self.fsync_interval then
      self.j:sync()
      self.stats.syncs = self.stats.syncs + 1
      unsynced, last_sync = false, fibril.now()
    end
    if self.finished >= max(M.COMPACT_MIN, 2 * self.count) then self:_rewrite() end
  end
  if unsynced then self.j:sync() end
end

--- Compaction: the file becomes the live tasks only (written aside, synced, renamed over).
function Store:_rewrite()
  local list = {}
  for _, t in pairs(self.tasks) do list[#list + 1] = t end
  sort(list, by_seq)
  local lines = {}
  for i, t in ipairs(list) do lines[i] = M.encode_record({ op = "add", task = stored(t) }) end
  local ok, err = self.j:rewrite(concat(lines))
  if not ok then
    log.error("deferred journal compaction failed", { path = self.path, err = err })
    self.finished = 0       -- try again after as many new finished records
    return false
  end
  log.debug("deferred journal compacted", { path = self.path, tasks = #list, dropped = self.finished })
  self.finished = 0
  return true
end

--- Makes tasks durable (returns once they are, per the fsync setting) and queues them. Waits
--- (bounded) while more than max_pending tasks are pending, then raises.
function Store:add(tasks)
  if self.closed then error("deferred: the journal is closed (shutting down)", 2) end
  local deadline = fibril.now() + self.enqueue_timeout
  while self.count + #tasks > self.max_pending do
    local left = deadline - fibril.now()
    if left <= 0 then
      error(format("deferred: %d tasks pending (deferred.max_pending = %d): enqueue gave up after %gs",
                   self.count, self.max_pending, self.enqueue_timeout), 0)
    end
    local ok, err = pcall(self.room.wait, self.room, left)
    if not ok and fibril.is_error(err, "cancelled") then error(err, 0) end
  end
  -- A task id already pending (the same event published twice) is not added again, as the
  -- postgres backend's ON CONFLICT DO NOTHING: one pending task per event and subscriber.
  local lines, fresh = {}, {}
  local adding = self.adding
  for _, t in ipairs(tasks) do
    if not self.tasks[t.id] and not adding[t.id] then
      fresh[#fresh + 1] = t
      adding[t.id] = true                  -- until durable: a concurrent add skips it too
      lines[#lines + 1] = M.encode_record({ op = "add", task = t })
    end
  end
  if #fresh == 0 then return end
  -- The writer queues them once they are written, even if this fiber is cancelled meanwhile.
  self:_put(concat(lines), true, fresh)
end

--- The next task due, claimed; waits up to timeout seconds (nil when none came).
function Store:next(timeout)
  local deadline = fibril.now() + (timeout or 1)
  while true do
    local top = self.heap[1]
    -- Done or dead meanwhile (a task may sit in the heap once per retry): skip it.
    while top and (self.tasks[top.id] ~= top or top._running) do
      heap_pop(self.heap)
      top = self.heap[1]
    end
    local wait = deadline - fibril.now()
    if top then
      local due = (top.run_at or 0) - walltime()
      if due <= 0 then
        heap_pop(self.heap)
        top._running = true
        return top
      end
      wait = min(wait, due)
    end
    if wait <= 0 or self.closed then return nil end
    local ok, err = pcall(self.ready.wait, self.ready, wait)
    if not ok and fibril.is_error(err, "cancelled") then error(err, 0) end
  end
end

function Store:_finish(t)
  if self.tasks[t.id] == t then
    self.tasks[t.id] = nil
    self.count = self.count - 1
    self.room:broadcast()
  end
  t._running = nil
end

--- The task ran: forget it (the record needs no fsync: losing it re-runs the task once).
function Store:done(t)
  self:_finish(t)
  self.finished = self.finished + 2
  self:_put(M.encode_record({ op = "done", id = t.id }), false)
end

--- The task failed and runs again at run_at.
function Store:retry(t, run_at, err)
  t.attempt, t.run_at, t.error, t._running = t.attempt, run_at, err, nil
  self.finished = self.finished + 1
  self:_put(M.encode_record({ op = "retry", id = t.id, attempt = t.attempt, run_at = run_at,
                             error = err }), false)
  if self.tasks[t.id] == t then
    self.seq = self.seq + 1
    t._seq = self.seq
    heap_push(self.heap, t)
    self.ready:signal()
  end
end

--- The task failed for the last time: into dead.log (durably), then out of the journal.
function Store:dead(t, err)
  local rec = stored(t)
  rec.error = err
  local line = M.encode_record({ op = "dead", task = rec, at = walltime() })
  local ok, werr = self.dead_lock:with(function() return self.dead_j:append(line, true) end)
  if not ok then log.error("deferred: cannot write the dead letter", { task = t.id, err = werr }) end
  self:_finish(t)
  self.finished = self.finished + 2
  self:_put(M.encode_record({ op = "dead", id = t.id }), false)
end

--- Tasks pending in this process (queued, waiting to retry or running).
function Store:pending() return self.count end

--- Takes the retries the CLI left in inbox/ into this journal (one file per task).
-- The inbox's files (the CLI's retries, one file each) and the tasks each holds:
-- calls each(path, tasks) per file.
local function each_inbox_file(dir, each)
  for _, e in ipairs(fs.list(dir .. "/inbox") or {}) do
    if sub(e.name, -5) == ".json" then
      local path = dir .. "/inbox/" .. e.name
      local tasks = {}
      for _, r in ipairs(M.decode_records(read_file(path) or "")) do
        if r.op == "add" and type(r.task) == "table" and type(r.task.id) == "string" then
          tasks[#tasks + 1] = r.task
        end
      end
      each(path, tasks)
    end
  end
end

function Store:take_inbox()
  local n = 0
  each_inbox_file(self.dir, function(path, tasks)
    if #tasks > 0 then self:add(tasks) end
    remove(path)
    n = n + #tasks
  end)
  if n > 0 then log.info("deferred: dead tasks queued again", { tasks = n }) end
  return n
end

--- Looks into inbox/ now and every second (the process in slot 1 only).
function Store:watch_inbox()
  self.inbox = fibril.schedule(function()
    core.set_context(nil)
    while not self.closed do
      local ok, err = pcall(self.take_inbox, self)
      if not ok then log.error("deferred: inbox", { err = tostring(err) }) end
      if not pcall(fibril.sleep, INBOX_EVERY) then return end
    end
  end)
end

--- Flushes what is queued and closes the files (shutdown).
function Store:close()
  if self.closed then return end
  self.closed = true
  self.wake:signal()
  pcall(fibril.await, self.writer, { timeout = 5 })
  if self.inbox then fibril.cancel(self.inbox) end
  self.ready:broadcast()
  -- The last batch (done records) is written by the loop before it ends; then sync.
  self.j:close()
  self.dead_j:close()
end

-- ---- dead letters (read by the CLI, and the store's own dead.log) ------------------------

--- The dead tasks in dir (not retried since), oldest first.
function M.dead_tasks(dir)
  local recs = M.decode_records(read_file(dir .. "/dead.log") or "")
  local dead, order = {}, {}
  for _, r in ipairs(recs) do
    if r.op == "dead" and type(r.task) == "table" and type(r.task.id) == "string" then
      if not dead[r.task.id] then order[#order + 1] = r.task.id end
      r.task.dead_at = r.at
      dead[r.task.id] = r.task
    elseif r.op == "retried" and type(r.id) == "string" then
      dead[r.id] = nil
    end
  end
  local list = {}
  for _, id in ipairs(order) do if dead[id] then list[#list + 1] = dead[id] end end
  return list
end

--- The pending tasks in dir (the CLI; read-only, so a running server is not disturbed): the
--- live tasks of every journal-<slot>.log after replay, and the retries waiting in inbox/.
--- Each task gets slot (its journal's, or "inbox"); sorted by run_at, then id.
function M.pending_tasks(dir)
  local list = {}
  for _, e in ipairs(fs.list(dir) or {}) do
    local slot = match(e.name, "^journal%-(%d+)%.log$")
    if slot then
      for _, t in pairs((M.replay(M.decode_records(read_file(dir .. "/" .. e.name) or "")))) do
        t.slot = tonumber(slot)
        list[#list + 1] = t
      end
    end
  end
  each_inbox_file(dir, function(_, tasks)
    for _, t in ipairs(tasks) do
      t.slot = "inbox"
      list[#list + 1] = t
    end
  end)
  sort(list, function(a, b)
    local ra, rb = tonumber(a.run_at) or 0, tonumber(b.run_at) or 0
    if ra ~= rb then return ra < rb end
    return tostring(a.id) < tostring(b.id)
  end)
  return list
end

--- Queues dead tasks again (the CLI): each goes to inbox/ (picked up by the running server,
--- or at the next boot) with its attempts reset, and dead.log records it as retried.
---@param ids table|nil the task ids; nil: every dead task
---@return table the ids queued again
function M.retry_dead(dir, ids)
  local want
  if ids then want = {}; for _, id in ipairs(ids) do want[id] = true end end
  mkdir_p(dir .. "/inbox")
  local done, marks = {}, {}
  for _, t in ipairs(M.dead_tasks(dir)) do
    if not want or want[t.id] then
      t.attempt, t.run_at, t.error, t.dead_at = 0, nil, nil, nil
      local name = t.id:gsub("[^%w%-_.]", "_")
      local tmp = format("%s/inbox/%s.tmp", dir, name)
      local f = assert(open(tmp, "wb"))
      f:write(M.encode_record({ op = "add", task = t }))
      f:close()
      assert(os.rename(tmp, format("%s/inbox/%s.json", dir, name)))
      marks[#marks + 1] = M.encode_record({ op = "retried", id = t.id })
      done[#done + 1] = t.id
    end
  end
  if #marks > 0 then
    local f = assert(open(dir .. "/dead.log", "ab"))
    f:write(concat(marks))
    f:close()
  end
  return done
end

return M
