-- bench/pg.lua: fibril.pg throughput, printed, never asserted (bench/pg.sh runs it next to
-- pgbench on the same server). F fibers share a pool of F connections, each running the
-- pgbench -S primary-key select with a random aid for D seconds; prints transactions/s.
-- Also the per-query latency of one fiber on one connection, prepared against unprepared.
-- With batch=N > 1, each fiber sends its selects N at a time with pool:batch (libpq pipeline
-- mode, one round trip per batch) and the figure counts queries, not batches.
-- Usage: fibril bench/pg.lua URL [seconds=10] [fibers=20] [scale=1] [prepare=1] [batch=1]
local fibril = require "fibril"
local pg = require "fibril.pg"

local url = arg[1] or os.getenv("DATABASE_URL")
local seconds = tonumber(arg[2]) or 10
local nfibers = tonumber(arg[3]) or 20
local scale = tonumber(arg[4]) or 1
local prepare = (arg[5] or "1") ~= "0"
local batch = tonumber(arg[6]) or 1
assert(url, "usage: fibril bench/pg.lua URL [seconds] [fibers] [scale] [prepare]")

local SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
local naccounts = 100000 * scale
local random, now = math.random, fibril.now

local pool = pg.pool{ url = url, size = nfibers, prepare = prepare, checkout_timeout = 30 }
-- Open every connection (and prepare) before timing, as pgbench connects before it measures.
local warm = {}
for i = 1, nfibers do
  warm[i] = fibril.schedule(function()
    pool:transaction(function(tx)
      tx:query(SQL, 1)
      tx:query(SQL, 1)
      fibril.sleep(0.05)
    end)
  end)
end
fibril.await_all(warm)

local count, stop = 0, false
local fibers = {}
local t0 = now()
for i = 1, nfibers do
  fibers[i] = fibril.schedule(function()
    local n = 0
    local function queue(b)
      for _ = 1, batch do b:query(SQL, random(naccounts)) end
    end
    while not stop do
      if batch > 1 then
        local results = pool:batch(queue)
        assert(results[batch][1].abalance)
        n = n + batch
      else
        local rows = pool:query(SQL, random(naccounts))
        assert(rows[1].abalance)
        n = n + 1
      end
    end
    count = count + n
  end)
end
fibril.sleep(seconds)
stop = true
fibril.await_all(fibers)
local elapsed = now() - t0
print(("fibril.pg: %d fibers, pool of %d, prepare=%s%s: %d queries in %.2f s = %.0f tps")
      :format(nfibers, nfibers, tostring(prepare), batch > 1 and (", batches of " .. batch) or "",
              count, elapsed, count / elapsed))
pool:close()
if batch > 1 then return end

-- Latency of one query, one fiber, one connection: the prepared-statement gain alone.
local function serial(prep)
  local conn = pg.connect(url, { prepare = prep })
  for _ = 1, 200 do conn:query(SQL, random(naccounts)) end
  local n, start = 0, now()
  while now() - start < 2 do
    conn:query(SQL, random(naccounts))
    n = n + 1
  end
  local us = (now() - start) / n * 1e6
  conn:close()
  return us
end
local unprep, prep = serial(false), serial(true)
print(("one fiber, one connection: unprepared %.1f us/query, prepared %.1f us/query (%.2fx)")
      :format(unprep, prep, unprep / prep))
