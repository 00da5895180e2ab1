-- bench/events.lua: domain events and deferred tasks, printed, never asserted.
--   1. inline publish: the cost per call of an empty inline subscriber (target: < 2 us), with
--      1 and with 10 subscribers on the event, the event built once
--   2. durable deferred publishes per second from 100 concurrent publishers on the journal
--      backend (fsync = "always": each publish returns after the fdatasync of its batch), and
--      the fdatasyncs per second that took (target: >= 20,000 publishes/s by group commit);
--      also from 1 publisher (no group to commit), and with fsync = "batch" and "never"
--   3. the same on the postgres backend when DATABASE_URL is set (scripts/with-services), and
--      how fast its runner drains a queue of 5,000 tasks
-- The journal goes under build/ (a real disk: /tmp may be tmpfs, where fsync costs nothing).
-- Usage: fibril bench/events.lua [seconds per deferred run]
local fibril = require "fibril"
local events = require "fibril.events"
local Subscriber = require "fibril.subscriber"
local deferred = require "fibril.deferred"

local SECONDS = tonumber(arg and arg[1]) or 3
local now = fibril.now
local dir = (os.getenv("BENCH_DIR") or "build") .. "/bench-events-" .. os.time()
io.stdout:setvbuf("line")

local function median(t)
  table.sort(t)
  return t[math.ceil(#t / 2)]
end

-- ---- 1. inline ----------------------------------------------------------------------------
local function inline(subs)
  events.reset_subscriptions()
  local E = events.define("Bench.Inline" .. subs, { "id" })
  for i = 1, subs do
    local S = Subscriber:extend("Empty" .. i)
    S:subscribe_to(E)
    function S.call() end
  end
  local ev = E{ id = 1 }
  local N, rounds = 200000, {}
  for r = 1, 5 do
    local t0 = now()
    for _ = 1, N do events.publish(ev) end
    rounds[r] = (now() - t0) / (N * subs) * 1e6
  end
  return median(rounds)
end

local function build_cost()
  local E = events.define("Bench.Build", { "id", "name" })
  local N = 200000
  local t0 = now()
  for i = 1, N do E{ id = i, name = "x" } end
  return (now() - t0) / N * 1e6
end

print(("inline: %.2f us per empty subscriber call (1 subscriber), %.2f us (10 subscribers); "
       .. "making an event of 2 fields: %.2f us"):format(inline(1), inline(10), build_cost()))

-- ---- 2./3. deferred -------------------------------------------------------------------------
local function deferred_run(label, opts, publishers)
  publishers = publishers or 100
  events.reset_subscriptions()
  local E = events.define("Bench.Deferred." .. label:gsub("%W", ""), { "id" })
  local S = Subscriber:extend("Noop" .. label:gsub("%W", ""))
  S:subscribe_to(E, { deferred = true })
  local ran = 0
  function S.call() ran = ran + 1 end
  deferred.start(opts)
  local count, stop_at = 0, now() + SECONDS
  local t0 = now()
  local syncs0 = (deferred.stats().store or {}).syncs or 0
  local fibers = {}
  for p = 1, publishers do
    fibers[p] = fibril.schedule(function()
      while now() < stop_at do
        events.publish(E{ id = p })
        count = count + 1
      end
    end)
  end
  fibril.await_all(fibers)
  local took = now() - t0
  local st = deferred.stats().store or {}
  local syncs = (st.syncs or 0) - syncs0
  -- Let the runner catch up before stopping, so the next run starts clean.
  local deadline = now() + 30
  while deferred.pending() > 0 and now() < deadline do fibril.sleep(0.05) end
  deferred.stop(10)
  local extra = st.syncs and (", %d fsyncs/s (%.0f publishes per fsync)"):format(
    syncs / took, syncs > 0 and count / syncs or 0) or ""
  print(("deferred %s: %d publishes/s from %d publishers%s; %d tasks ran")
        :format(label, count / took, publishers, extra, ran))
end

os.execute("mkdir -p '" .. dir .. "'")
deferred_run("journal fsync=always", { dir = dir .. "/one", fsync = "always", concurrency = 16 }, 1)
deferred_run("journal fsync=always", { dir = dir .. "/always", fsync = "always", concurrency = 16 })
deferred_run("journal fsync=batch", { dir = dir .. "/batch", fsync = "batch", concurrency = 16 })
deferred_run("journal fsync=never", { dir = dir .. "/never", fsync = "never", concurrency = 16 })
os.execute("rm -rf '" .. dir .. "'")

local ok_pg = pcall(require, "fibril.pg")
if os.getenv("DATABASE_URL") and ok_pg then
  local pg = require "fibril.pg"
  local tbl = "bench_deferred_" .. os.time()
  deferred_run("postgres", { backend = "postgres", table = tbl, concurrency = 16 })
  pg:exec("drop table if exists " .. tbl)
  -- The runner alone: 5,000 queued tasks (one transaction), then the time until none is left.
  local Task = require "fibril.task"
  local T = Task:extend("BenchDrain")
  function T.perform() end
  local store = require("fibril.deferred.postgres").open{ table = tbl }
  local tasks = {}
  for i = 1, 5000 do
    tasks[i] = { id = "drain-" .. i, kind = "task", task = "BenchDrain", args = {}, attempt = 0 }
  end
  store:add(tasks)
  store:close()
  local t0 = now()
  deferred.start{ backend = "postgres", table = tbl, concurrency = 16, poll_interval = 0.05 }
  while pg:query("select count(*)::int as c from " .. tbl)[1].c > 0 do fibril.sleep(0.02) end
  local took = now() - t0
  deferred.stop(10)
  pg:exec("drop table if exists " .. tbl)
  print(("deferred postgres: the runner (16 workers) drains 5000 empty tasks at %d tasks/s")
        :format(5000 / took))
else
  print("deferred postgres: skipped (no DATABASE_URL, or no fibril.pg)")
end
