-- fibril.deferred with the journal backend: the record codec and its checksums, replay after
-- a torn or corrupt write, group commit, compaction, retries with backoff, dead letters and
-- the CLI that retries them, backpressure, max_concurrency, task classes; then real servers:
-- SIGKILL right after publish returns, and --workers 2 running each task once.
local fibril = require "fibril"
local events = require "fibril.events"
local Subscriber = require "fibril.subscriber"
local Task = require "fibril.task"
local deferred = require "fibril.deferred"
local journal = require "fibril.deferred.journal"
local cjournal = require "fibril.core.journal"
local log = require "fibril.log"
local support = require "spec.support"
local ffi = require "ffi"

ffi.cdef [[ uint32_t fb_journal_crc32(uint32_t crc, const void *data, size_t len); ]]

local eventually = support.wait_for

local function read(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

local function fresh_dir()
  local dir = support.tmpdir() .. "/deferred-" .. math.random(1e9)
  os.execute("mkdir -p '" .. dir .. "'")
  return dir
end

local function count_lines(text, pattern)
  local c = 0
  for line in text:gmatch("[^\n]+") do if line:find(pattern) then c = c + 1 end end
  return c
end

local n = 0
local function unique(prefix)
  n = n + 1
  return (prefix or "Deferred") .. ".E" .. n
end

describe("fibril.deferred", function()
  local saved
  before_each(function() saved = events.reset_subscriptions() end)
  after_each(function()
    deferred.stop(5)
    events.restore_subscriptions(saved)
    log.output(nil)
  end)

  describe("the record codec", function()
    it("checksums with the standard CRC-32, the same in C and in Lua", function()
      assert.are.equal(0xCBF43926, cjournal.crc32("123456789"))
      assert.are.equal(0xCBF43926, tonumber(ffi.C.fb_journal_crc32(0, "123456789", 9)))
      assert.are.equal(0, cjournal.crc32(""))
    end)

    it("decodes what it encodes", function()
      local recs = { { op = "add", task = { id = "a", args = { x = "\n\0" } } }, { op = "done", id = "a" } }
      local data = journal.encode_record(recs[1]) .. journal.encode_record(recs[2])
      local back, bad = journal.decode_records(data)
      assert.are.equal(0, bad)
      assert.are.same(recs, back)
    end)

    it("skips a torn last record and keeps every earlier one", function()
      local good = journal.encode_record({ op = "add", task = { id = "a" } })
                   .. journal.encode_record({ op = "add", task = { id = "b" } })
      local torn = journal.encode_record({ op = "add", task = { id = "c" } })
      for cut = 1, #torn - 1 do
        local recs, bad = journal.decode_records(good .. torn:sub(1, cut))
        assert.are.equal(2, #recs)
        assert.are.equal(1, bad)
      end
    end)

    it("skips a record with a flipped byte, a bad checksum or bad JSON, and keeps the rest", function()
      local a = journal.encode_record({ op = "add", task = { id = "a" } })
      local b = journal.encode_record({ op = "add", task = { id = "b" } })
      local c = journal.encode_record({ op = "add", task = { id = "c" } })
      local flipped = b:sub(1, 20) .. string.char((b:byte(21) + 1) % 256) .. b:sub(22)
      local recs, bad = journal.decode_records(a .. flipped .. "garbage\n" .. "00000000 {}\n" .. c)
      assert.are.equal(3, bad)
      assert.are.same({ "a", "c" }, { recs[1].task.id, recs[2].task.id })
    end)

    it("replays adds, retries and completions into the live tasks", function()
      local tasks = journal.replay({
        { op = "add", task = { id = "a", attempt = 0 } }, { op = "add", task = { id = "b", attempt = 0 } },
        { op = "retry", id = "b", attempt = 2, run_at = 5, error = "x" }, { op = "done", id = "a" },
        { op = "done", id = "zzz" } })
      assert.is_nil(tasks.a)
      assert.are.same({ id = "b", attempt = 2, run_at = 5, error = "x" }, tasks.b)
    end)

    it("computes retry delays that double up to the cap, with jitter in the upper half", function()
      for attempt = 1, 12 do
        local nominal = math.min(8, 0.5 * 2 ^ (attempt - 1))
        for _ = 1, 20 do
          local d = deferred.backoff(attempt, { min = 0.5, max = 8 })
          assert.is_true(d >= nominal / 2 and d <= nominal, tostring(d))
        end
      end
    end)
  end)

  describe("the journal backend in this process", function()
    it("replays a journal with a torn tail: the earlier tasks run, the file is clean again", function()
      local dir = fresh_dir()
      local E = events.define(unique(), { "k" })
      local ids = {}
      local lines = {}
      for i = 1, 3 do
        local ev = E{ k = i }
        ids[i] = events.id(ev)
        lines[i] = journal.encode_record({ op = "add", task = { id = ids[i] .. "/Replayed", kind = "event",
          subscriber = "Replayed", event = events.to_table(ev), attempt = 0 } })
      end
      -- The third record was being written when the process died: half of it is on disk.
      write(dir .. "/journal-1.log", lines[1] .. lines[2] .. lines[3]:sub(1, 30))
      local got = {}
      local S = Subscriber:extend("Replayed")
      S:subscribe_to(E, { deferred = true })
      function S.call(_, ev) got[#got + 1] = ev.k end
      local logged = {}
      log.output(function(l) logged[#logged + 1] = l end)
      deferred.start{ dir = dir, concurrency = 1 }
      eventually(function() return #got == 2 end, 5, "the replayed tasks")
      assert.are.same({ 1, 2 }, got)
      assert.truthy(table.concat(logged, "\n"):find("skipped corrupt records", 1, true))
      deferred.stop(5)
      local recs, bad = journal.decode_records(read(dir .. "/journal-1.log"))
      assert.are.equal(0, bad)                               -- rewritten at boot
      assert.are.same({}, journal.replay(recs))              -- both done
    end)

    it("commits concurrent publishers together: fewer fsyncs than publishes", function()
      local dir = fresh_dir()
      local E = events.define(unique(), { "k" })
      local S = Subscriber:extend("Grouped")
      S:subscribe_to(E, { deferred = true })
      local ran = 0
      function S.call() ran = ran + 1 end
      deferred.start{ dir = dir, concurrency = 4 }
      local fibers = {}
      for i = 1, 200 do fibers[i] = fibril.schedule(function() events.publish(E{ k = i }) end) end
      fibril.await_all(fibers)
      local st = deferred.stats().store
      assert.is_true(st.syncs < 200 and st.syncs >= 1, "syncs: " .. st.syncs)
      eventually(function() return ran == 200 end, 10, "200 tasks")
    end)

    it("retries a failing task with growing delays, then dead-letters it with its error", function()
      local dir = fresh_dir()
      local E = events.define(unique(), { "k" })
      local times = {}
      local S = Subscriber:extend("AlwaysFails")
      S:subscribe_to(E, { deferred = true, retries = 3, backoff = { min = 0.05, max = 1 } })
      function S:call() times[#times + 1] = fibril.now(); error("nope " .. self.attempt) end
      log.output(function() end)
      deferred.start{ dir = dir, concurrency = 1 }
      local ev = E{ k = 1 }
      events.publish(ev)
      eventually(function() return deferred.stats().dead == 1 end, 5, "the dead letter")
      assert.are.equal(4, #times)                         -- the first run and 3 retries
      for i = 2, 4 do
        local nominal = 0.05 * 2 ^ (i - 2)
        assert.is_true(times[i] - times[i - 1] >= nominal / 2 - 0.005, "retry " .. i)
      end
      local dead = journal.dead_tasks(dir)
      assert.are.equal(1, #dead)
      assert.are.equal(events.id(ev) .. "/AlwaysFails", dead[1].id)
      assert.are.equal(4, dead[1].attempt)
      assert.truthy(dead[1].error:find("nope 4", 1, true))
      assert.are.equal(0, deferred.pending())
    end)

    it("queues a dead task again through the inbox, and the running process picks it up", function()
      local dir = fresh_dir()
      local E = events.define(unique(), { "k" })
      local fail, ok_runs = true, 0
      local S = Subscriber:extend("Revived")
      S:subscribe_to(E, { deferred = true, retries = 0 })
      function S.call() if fail then error("down") end ok_runs = ok_runs + 1 end
      log.output(function() end)
      deferred.start{ dir = dir, concurrency = 1 }
      events.publish(E{ k = 1 })
      eventually(function() return #journal.dead_tasks(dir) == 1 end, 5, "the dead letter")
      fail = false
      local ids = journal.retry_dead(dir, nil)
      assert.are.equal(1, #ids)
      assert.are.same({}, journal.dead_tasks(dir))            -- marked retried
      eventually(function() return ok_runs == 1 end, 5, "the retried task")
    end)

    it("makes enqueue wait past max_pending, then raise a clear error", function()
      local dir = fresh_dir()
      local T = Task:extend("Blocked" .. math.random(1e6))
      local release = false
      function T.perform() while not release do fibril.sleep(0.01) end end
      deferred.start{ dir = dir, concurrency = 1, max_pending = 3, enqueue_timeout = 0.2 }
      for i = 1, 3 do T:enqueue({ i = i }) end
      local ok, err = pcall(T.enqueue, T, { i = 4 })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("deferred.max_pending = 3", 1, true), err)
      -- Room appears as tasks finish: an enqueue that waits gets in.
      local f = fibril.schedule(function() return T:enqueue({ i = 5 }) end)
      release = true
      assert.is_string(fibril.await(f))
    end)

    it("runs at most max_concurrency tasks of a subscriber at once, the others still flowing", function()
      local dir = fresh_dir()
      local E = events.define(unique(), { "k" })
      local now_running, peak, done, other = 0, 0, 0, 0
      local S = Subscriber:extend("Narrow")
      S:subscribe_to(E, { deferred = true, max_concurrency = 2 })
      function S.call()
        now_running = now_running + 1
        peak = math.max(peak, now_running)
        fibril.sleep(0.02)
        now_running = now_running - 1
        done = done + 1
      end
      local O = Subscriber:extend("Wide")
      O:subscribe_to(E, { deferred = true })
      function O.call() other = other + 1 end
      deferred.start{ dir = dir, concurrency = 8 }
      for i = 1, 10 do events.publish(E{ k = i }) end
      eventually(function() return done == 10 and other == 10 end, 10, "all tasks")
      assert.are.equal(2, peak)
    end)

    it("runs task classes, after their delay, with their arguments", function()
      local dir = fresh_dir()
      local T = Task:extend("Digest" .. math.random(1e6))
      local got, at = nil, nil
      function T:perform(args) got, at = args, fibril.now(); self.seen = self.task_id end
      deferred.start{ dir = dir, concurrency = 1 }
      local t0 = fibril.now()
      local id = T:enqueue({ account = 7 }, { delay = 0.15 })
      assert.is_string(id)
      eventually(function() return got ~= nil end, 5, "the task")
      assert.are.same({ account = 7 }, got)
      assert.is_true(at - t0 >= 0.14)
      assert.has_error(function() T:enqueue("x") end)
    end)

    it("with fsync = \"batch\" acknowledges after the write and syncs within the interval", function()
      local T = Task:extend("Batched" .. math.random(1e6))
      local ran = 0
      function T.perform() ran = ran + 1 end
      deferred.start{ dir = fresh_dir(), concurrency = 2, fsync = "batch", fsync_interval = 0.5 }
      for i = 1, 10 do T:enqueue({ i = i }) end
      assert.are.equal(0, deferred.stats().store.syncs)     -- none waited for a sync
      eventually(function() return ran == 10 and deferred.stats().store.syncs >= 1 end, 5, "a sync")
    end)

    it("compacts the journal once finished records pile up", function()
      local dir = fresh_dir()
      local old = journal.COMPACT_MIN
      journal.COMPACT_MIN = 50
      local T = Task:extend("Compacted" .. math.random(1e6))
      local ran = 0
      function T.perform() ran = ran + 1 end
      deferred.start{ dir = dir, concurrency = 4 }
      for i = 1, 100 do T:enqueue({ i = i }) end
      eventually(function() return ran == 100 end, 10, "100 tasks")
      T:enqueue({ i = 101 })                       -- one more batch: the writer checks after it
      eventually(function() return ran == 101 end, 10, "the last task")
      journal.COMPACT_MIN = old
      deferred.stop(5)
      local recs = journal.decode_records(read(dir .. "/journal-1.log"))
      assert.is_true(#recs < 100, "records left: " .. #recs)
      assert.are.same({}, journal.replay(recs))
    end)

    it("has slot 1 adopt the journals of slots past --workers N, and remove them", function()
      local dir = fresh_dir()
      local T = Task:extend("Orphaned" .. math.random(1e6))
      local got = {}
      function T.perform(_, args) got[#got + 1] = args.n end
      write(dir .. "/journal-3.log", journal.encode_record({ op = "add", task = { id = "o1", kind = "task",
        task = T.name, args = { n = 1 }, attempt = 0 } }))
      write(dir .. "/journal-2.log", "")          -- slot 2 still exists: not adopted
      log.output(function() end)
      deferred.start{ dir = dir, concurrency = 1, slot = 1, workers = 2 }
      eventually(function() return #got == 1 end, 5, "the adopted task")
      assert.is_nil(io.open(dir .. "/journal-3.log"))
      assert.is_not_nil(io.open(dir .. "/journal-2.log"))
    end)

    it("enqueues the tasks of the periodic schedule from slot 1", function()
      local T = Task:extend("Periodic" .. math.random(1e6))
      local runs = 0
      function T.perform(_, args) runs = runs + args.add end
      deferred.start{ dir = fresh_dir(), concurrency = 1,
                      schedule = { { every = 0.05, task = T.name, args = { add = 1 } } } }
      eventually(function() return runs >= 3 end, 5, "three runs")
    end)

    it("keeps one pending task per event and subscriber, and refuses { tx = }", function()
      local E = events.define(unique(), { "k" })
      local runs = 0
      local S = Subscriber:extend("Once")
      S:subscribe_to(E, { deferred = true })
      function S.call() runs = runs + 1 end
      deferred.start{ dir = fresh_dir(), concurrency = 1 }
      local ev = E{ k = 1 }
      fibril.schedule(function() events.publish(ev) end)
      events.publish(ev)
      eventually(function() return runs >= 1 end, 5, "the task")
      fibril.sleep(0.1)
      assert.are.equal(1, runs)
      local ok, err = pcall(events.publish, E{ k = 2 }, { tx = {} })
      assert.is_false(ok)
      assert.truthy(tostring(err):find('needs deferred.backend = "postgres"', 1, true), err)
    end)

    it("leaves no journal open, no operation in flight and no fiber after stop", function()
      local function fibers() return fibril.debug.live().fibers end
      local before = fibers()
      local T = Task:extend("Settled" .. math.random(1e6))
      function T.perform() fibril.sleep(0.01) end
      deferred.start{ dir = fresh_dir(), concurrency = 2, schedule = { { every = 0.01, task = T.name } } }
      for i = 1, 5 do T:enqueue({ i = i }) end
      fibril.sleep(0.05)
      deferred.stop(5)
      assert.are.equal(before, support.settled(fibers, before))
      local j, ops = cjournal.live()
      assert.are.equal(0, j)
      assert.are.equal(0, ops)
    end)
  end)

  describe("with a served app", function()
    local app = "spec/fixtures/orders"

    it("runs every task published before a SIGKILL after the restart", function()
      local base = fresh_dir()
      local env = { RESULT_FILE = base .. "/result", DEFERRED_DIR = base .. "/deferred", HOLD_SALES = "1" }
      local s = support.start_app(app, "--env test", env)
      for i = 1, 20 do
        local out = support.curl("-X POST http://127.0.0.1:" .. s.port .. "/orders/" .. i)
        assert.are.equal('{"published":' .. i .. '}', out)
      end
      s.stop("KILL")                               -- the sales were held: none ran yet
      assert.is_true(s.wait_exit(5))
      assert.are.equal(0, count_lines(read(env.RESULT_FILE), "^sale "))
      env.HOLD_SALES = nil
      local s2 = support.start_app(app, "--env test", env)
      eventually(function() return count_lines(read(env.RESULT_FILE), "^sale ") >= 20 end, 15, "20 sales")
      s2.stop("TERM")
      assert.is_true(s2.wait_exit(10))
      local text = read(env.RESULT_FILE)
      for i = 1, 20 do assert.are.equal(1, count_lines(text, "^sale " .. i .. " "), "order " .. i) end
    end)

    it("with --workers 2 runs each task exactly once", function()
      local base = fresh_dir()
      local env = { RESULT_FILE = base .. "/result", DEFERRED_DIR = base .. "/deferred" }
      local s = support.start_app(app, "--env test --workers 2", env)
      for i = 1, 40 do support.curl("-X POST http://127.0.0.1:" .. s.port .. "/orders/" .. i) end
      eventually(function() return count_lines(read(env.RESULT_FILE), "^sale ") >= 40 end, 15, "40 sales")
      fibril.sleep(0.3)                            -- time for a duplicate to show, if any ran
      s.stop("TERM")
      assert.is_true(s.wait_exit(15))
      local text = read(env.RESULT_FILE)
      for i = 1, 40 do assert.are.equal(1, count_lines(text, "^sale " .. i .. " "), "order " .. i) end
    end)

    it("lists pending tasks with fibril deferred APP pending, from the journal on disk", function()
      local base = fresh_dir()
      local env = { RESULT_FILE = base .. "/result", DEFERRED_DIR = base .. "/deferred", HOLD_SALES = "1" }
      local prefix = ("DEFERRED_DIR='%s' RESULT_FILE='%s' "):format(env.DEFERRED_DIR, env.RESULT_FILE)
      local s = support.start_app(app, "--env test", env)
      for i = 1, 3 do support.curl("-X POST http://127.0.0.1:" .. s.port .. "/orders/" .. i) end
      local status, out = support.run_env(prefix, "deferred " .. app .. " pending")   -- server running
      s.stop("KILL")
      assert.is_true(s.wait_exit(5))
      assert.are.equal(0, status)
      local rows = 0
      for line in out:gmatch("[^\n]+") do
        if line:find("\tRecordSale\tnow\tjournal 1\t", 1, true) then rows = rows + 1 end
      end
      assert.are.equal(3, rows, out)
      assert.truthy(out:find("^ID\tRUNS\tSUBSCRIBER/TASK\tRUN AT\tWHERE\tLAST ERROR\n"), out)
      -- Nothing on disk: no journal, nothing pending.
      status, out = support.run_env(("DEFERRED_DIR='%s/none' "):format(base), "deferred " .. app .. " pending")
      assert.are.equal(0, status)
      assert.are.equal("no pending tasks\n", out)
    end)

    it("lists dead tasks with fibril deferred APP, and retries them", function()
      local base = fresh_dir()
      local env = { RESULT_FILE = base .. "/result", DEFERRED_DIR = base .. "/deferred", FLAKY_FAILS = "10" }
      local s = support.start_app(app, "--env test", env)
      support.curl("-X POST http://127.0.0.1:" .. s.port .. "/orders/5")
      eventually(function() return #journal.dead_tasks(env.DEFERRED_DIR) == 1 end, 10, "the dead letter")
      s.stop("TERM")
      assert.is_true(s.wait_exit(10))
      local prefix = ("DEFERRED_DIR='%s' RESULT_FILE='%s' "):format(env.DEFERRED_DIR, env.RESULT_FILE)
      local status, out = support.run_env(prefix, "deferred " .. app .. " list")
      assert.are.equal(0, status)
      local id = out:match("\n([^\t]+/Flaky)\t4\tFlaky\t")
      assert.truthy(id, out)
      assert.truthy(out:find("flaky failure", 1, true), out)
      status = support.run_env(prefix, "deferred " .. app .. " retry nope")
      assert.are.equal(1, status)
      status, out = support.run_env(prefix, "deferred " .. app .. " retry '" .. id .. "'")
      assert.are.equal(0, status)
      assert.are.equal("queued again: 1 task(s)\n", out)
      -- The next boot takes it from the inbox; it succeeds now that it may.
      env.FLAKY_FAILS = "0"
      local s2 = support.start_app(app, "--env test", env)
      eventually(function() return count_lines(read(env.RESULT_FILE), "^flaky 5 attempt 1") == 2 end, 10,
                 "the retried task")
      s2.stop("TERM")
      assert.is_true(s2.wait_exit(10))
      status, out = support.run_env(prefix, "deferred " .. app .. " list")
      assert.are.equal(0, status)
      assert.are.equal("no dead tasks\n", out)
    end)
  end)
end)
