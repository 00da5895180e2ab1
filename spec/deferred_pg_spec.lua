-- fibril.deferred with the postgres backend, against the real PostgreSQL of
-- scripts/with-services (DATABASE_URL): tasks run after publish, retries and dead rows, the
-- CLI's retry, the outbox (rollback leaves no task, commit makes exactly one), and two
-- processes sharing one table run each task once.
local fibril = require "fibril"
local events = require "fibril.events"
local Subscriber = require "fibril.subscriber"
local deferred = require "fibril.deferred"
local log = require "fibril.log"
local support = require "spec.support"

support.service_env("DATABASE_URL")            -- a real PostgreSQL, never skipped

local eventually = support.wait_for

local n = 0
local function unique(prefix)
  n = n + 1
  return (prefix or "Pg") .. ".E" .. n .. "_" .. math.random(1e6)
end

local baseline
do
  local c, r = require("fibril.core.pg").live()
  baseline = c .. "/" .. r
end

describe("fibril.deferred (postgres)", function()
  local pg, tbl, saved
  before_each(function()
    pg = require "fibril.pg"
    tbl = "spec_deferred_" .. math.random(1e9)
    saved = events.reset_subscriptions()
  end)
  after_each(function()
    deferred.stop(5)
    events.restore_subscriptions(saved)
    log.output(nil)
    pg:exec("drop table if exists " .. tbl)
  end)

  it("runs deferred subscribers after publish, and deletes their rows", function()
    local E = events.define(unique(), { "k" })
    local got = {}
    local S = Subscriber:extend("PgLater")
    S:subscribe_to(E, { deferred = true })
    function S:call(ev) got[#got + 1] = { k = ev.k, task = self.task_id } end
    deferred.start{ backend = "postgres", table = tbl, concurrency = 2, poll_interval = 0.2 }
    local ev = E{ k = 7 }
    events.publish(ev)
    eventually(function() return #got == 1 end, 10, "the task")
    assert.are.equal(7, got[1].k)
    assert.are.equal(events.id(ev) .. "/PgLater", got[1].task)
    eventually(function() return pg:query("select count(*)::int as c from " .. tbl)[1].c == 0 end, 5,
               "the row to go")
  end)

  it("retries, then keeps the row as dead; the CLI's retry sets it pending again", function()
    log.output(function() end)
    local E = events.define(unique(), { "k" })
    local fail, runs = true, 0
    local S = Subscriber:extend("PgFlaky")
    S:subscribe_to(E, { deferred = true, retries = 1, backoff = { min = 0.05, max = 0.1 } })
    function S.call() runs = runs + 1 if fail then error("db says no") end end
    deferred.start{ backend = "postgres", table = tbl, concurrency = 1, poll_interval = 0.05 }
    events.publish(E{ k = 1 })
    eventually(function() return deferred.stats().dead == 1 end, 10, "the dead row")
    assert.are.equal(2, runs)
    local admin = require "fibril.deferred.postgres"
    local config = { deferred = { table = tbl } }
    local dead = admin.dead_tasks(config)
    assert.are.equal(1, #dead)
    assert.are.equal(2, dead[1].attempt)
    assert.truthy(dead[1].error:find("db says no", 1, true))
    fail = false
    assert.are.same({ dead[1].id }, admin.retry_dead(config, { dead[1].id }))
    eventually(function() return runs == 3 end, 10, "the retried task")
    assert.are.same({}, admin.dead_tasks(config))
  end)

  it("outbox: a rolled back transaction leaves no task, a committed one exactly one", function()
    local E = events.define(unique(), { "k" })
    local ran = {}
    local S = Subscriber:extend("PgOutbox")
    S:subscribe_to(E, { deferred = true })
    function S.call(_, ev) ran[#ran + 1] = ev.k end
    deferred.start{ backend = "postgres", table = tbl, concurrency = 2, poll_interval = 0.05 }
    local ok = pcall(pg.transaction, pg, function(tx)
      events.publish(E{ k = 1 }, { tx = tx })
      -- Inside the transaction the row exists; outside it does not yet.
      assert.are.equal(1, tx:query("select count(*)::int as c from " .. tbl)[1].c)
      error("business write failed")
    end)
    assert.is_false(ok)
    pg:transaction(function(tx)
      events.publish(E{ k = 2 }, { tx = tx })
      fibril.sleep(0.3)                         -- runners poll meanwhile: nothing is visible
      assert.are.same({}, ran)
    end)
    eventually(function() return #ran == 1 end, 10, "the committed task")
    fibril.sleep(0.3)
    assert.are.same({ 2 }, ran)
  end)

  it("two processes sharing the table run each task once", function()
    pg:exec("create table " .. tbl .. "_runs (id text, pid int)")
    local script = [[
      local fibril = require "fibril"
      local pg = require "fibril.pg"
      local Task = require "fibril.task"
      local deferred = require "fibril.deferred"
      local tbl, want = arg[1], tonumber(arg[2])
      local T = Task:extend("Shared")
      local pid = require("fibril.core.process").pid()
      function T:perform()
        pg:exec("insert into " .. tbl .. "_runs (id, pid) values ($1, $2)", self.task_id, pid)
        fibril.sleep(0.01)
      end
      deferred.start{ backend = "postgres", table = tbl, concurrency = 4, poll_interval = 0.05 }
      local deadline = fibril.now() + 30
      while fibril.now() < deadline do
        local c = pg:query("select count(*)::int as c from " .. tbl .. "_runs")[1].c
        if c >= want then break end
        fibril.sleep(0.05)
      end
      fibril.sleep(0.3)
      deferred.stop(5)
      pg:close()
    ]]
    local path = support.write("pg_shared_" .. math.random(1e9) .. ".lua", script)
    -- The table exists before the children start (they would create it, too).
    local store = require("fibril.deferred.postgres").open{ table = tbl }
    local tasks = {}
    for i = 1, 120 do
      tasks[i] = { id = "shared-" .. i, kind = "task", task = "Shared", args = {}, attempt = 0 }
    end
    store:add(tasks)
    store:close()
    local cmd = ("%s '%s' %s 120 >/dev/null 2>&1"):format(support.fibril, path, tbl)
    local p1 = io.popen(cmd .. " & " .. cmd .. " & wait; echo done")
    assert.are.equal("done", p1:read("*l"))
    p1:close()
    local row = pg:query(("select count(*)::int as runs, count(distinct id)::int as ids, "
                          .. "count(distinct pid)::int as pids from %s_runs"):format(tbl))[1]
    pg:exec("drop table " .. tbl .. "_runs")
    assert.are.equal(120, row.ids)
    assert.are.equal(120, row.runs)                -- none twice
    assert.are.equal(2, row.pids)                  -- both took a share
  end)

  it("renews the lease of a task running past it: another process's claims never get it", function()
    local E = events.define(unique(), { "k" })
    local runs, finished = 0, false
    local S = Subscriber:extend("PgLong")
    S:subscribe_to(E, { deferred = true })
    function S.call() runs = runs + 1; fibril.sleep(2); finished = true end
    deferred.start{ backend = "postgres", table = tbl, concurrency = 1, poll_interval = 0.05,
                    lease = 0.6 }
    events.publish(E{ k = 1 })
    eventually(function() return runs == 1 end, 10, "the task to start")
    -- Another claimer of the table (slot 2: an owner of its own), trying all along.
    local other = require("fibril.deferred.postgres").open{ table = tbl, slot = 2, lease = 0.6 }
    local stolen = 0
    while not finished do
      stolen = stolen + other:_claim(10)
      fibril.sleep(0.1)
    end
    other:close()
    assert.are.equal(0, stolen)
    assert.are.equal(1, runs)
    assert.is_true(deferred.runner().store.stats.renewals >= 2)
  end)

  it("claims again a task whose claimer stopped renewing, once its lease has run out", function()
    local Task = require "fibril.task"
    local name = "PgOrphan" .. math.random(1e6)
    local T = Task:extend(name)
    local ran_at
    function T.perform() ran_at = fibril.now() end
    local store = require("fibril.deferred.postgres").open{ table = tbl, slot = 2, lease = 0.8 }
    store:add({ { id = "orphan-1", kind = "task", task = name, args = {}, attempt = 0 } })
    assert.are.equal(1, store:_claim(10))
    fibril.cancel(store.renewer)                    -- the claimer "dies": no more renewals
    local claimed_at = fibril.now()
    deferred.start{ backend = "postgres", table = tbl, concurrency = 1, poll_interval = 0.05 }
    eventually(function() return ran_at ~= nil end, 10, "the orphaned task")
    assert.is_true(ran_at - claimed_at >= 0.7, "ran before the lease ran out")
    store.queue, store.claimed = {}, {}
    store:close()
  end)

  it("makes an enqueue wait while the table is over max_pending, then raise a clear error", function()
    local Task = require "fibril.task"
    local T = Task:extend("PgBacklog" .. math.random(1e6))
    function T.perform() end
    deferred.start{ backend = "postgres", table = tbl, concurrency = 1, poll_interval = 0.05,
                    max_pending = 2, enqueue_timeout = 0.4 }
    T:enqueue({}, { delay = 60 })
    T:enqueue({}, { delay = 60 })
    local t0 = fibril.now()
    local ok, err = pcall(T.enqueue, T, {}, { delay = 60 })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("2 tasks pending in table " .. tbl
                                     .. " (deferred.max_pending = 2): enqueue gave up after 0.4s", 1, true), err)
    assert.is_true(fibril.now() - t0 >= 0.35)
    assert.are.equal(2, pg:query("select count(*)::int as c from " .. tbl)[1].c)
    -- Room made while an enqueue waits lets it through.
    fibril.schedule(function() fibril.sleep(0.1); pg:exec("delete from " .. tbl) end)
    T:enqueue({}, { delay = 60 })
    assert.are.equal(1, pg:query("select count(*)::int as c from " .. tbl)[1].c)
  end)

  it("lists pending tasks for the CLI, due first, with the process that claimed one", function()
    local admin = require "fibril.deferred.admin"
    local store = require("fibril.deferred.postgres").open{ table = tbl, slot = 3, lease = 30 }
    local later = os.time() + 3600
    store:add({ { id = "p-later", kind = "task", task = "Later", args = {}, attempt = 0, run_at = later },
                { id = "p-now", kind = "task", task = "Now", args = {}, attempt = 0 } })
    assert.are.equal(1, store:_claim(10))                -- p-now: due, so claimed
    local list = require("fibril.deferred.postgres").pending_tasks({ deferred = { table = tbl } })
    assert.are.same({ "p-now", "p-later" }, { list[1].id, list[2].id })
    assert.are.equal(store.owner, list[1].claimed_by)
    assert.is_nil(list[2].claimed_by)
    local text = admin.format_pending(list)
    assert.truthy(text:find("\np%-now\t0\tNow\tnow\tclaimed by " .. store.owner:gsub("%p", "%%%0") .. "\t"), text)
    local stamp = os.date("!%Y-%m-%dT%H:%M:%SZ", later)
    assert.truthy(text:find("\np-later\t0\tLater\t" .. stamp .. "\tqueued\t", 1, true), text)
    store:close()
  end)

  it("leaves no connection, poll handle or operation behind (the default pool closed)", function()
    local core = require "fibril.core.pg"
    local function live() local c, r = core.live() return c .. "/" .. r end
    pg:close()
    assert.are.equal(baseline, support.settled(live, baseline))
  end)
end)
