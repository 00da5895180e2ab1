-- fibril.ratelimit: token buckets in-process and in Redis (REDIS_URL, from scripts/with-services).
-- The rate checks count the tokens granted over a window of a few seconds and compare them
-- with rate * window + burst: a late wake-up on a busy machine shifts a grant, but the bucket
-- keeps filling meanwhile, so the count over the window stays put (as long as no stall is
-- longer than burst / rate: a quarter of a second here).
local fibril = require "fibril"
local ratelimit = require "fibril.ratelimit"
local redis = require "fibril.redis"
local support = require "spec.support"

local REDIS_URL = support.service_env("REDIS_URL")

-- Takes single tokens in `fibers` fibers for `window` seconds; returns how many were granted
-- before the window ended.
local function count_grants(rl, window, fibers)
  local t0 = fibril.now()
  local deadline = t0 + window
  local granted = 0
  local workers = {}
  for i = 1, fibers or 1 do
    workers[i] = fibril.schedule(function()
      while true do
        rl:take()
        if fibril.now() > deadline then return end
        granted = granted + 1
      end
    end)
  end
  fibril.await(workers)
  return granted
end

local function assert_within(expected, got, fraction)
  assert.is_true(math.abs(got - expected) <= expected * fraction,
                 ("granted %d tokens, expected %d within %d %%"):format(got, expected, fraction * 100))
end

describe("fibril.ratelimit in-process", function()
  it("grants the burst at once, then nothing until tokens come back", function()
    local rl = ratelimit.new{ rate = 10, burst = 3 }
    assert.is_true(rl:try())
    assert.is_true(rl:try(2))
    assert.is_false(rl:try())
    assert.are.equal(0, ratelimit.new{ rate = 1, burst = 5 }:take(5))
  end)

  it("keeps the long-run rate within 5 % of its setting, with several fibers taking", function()
    local rate, burst, window = 200, 50, 3
    local rl = ratelimit.new{ rate = rate, burst = burst }
    assert_within(rate * window + burst, count_grants(rl, window, 4), 0.05)
  end)

  it("serves waiting fibers in the order they came", function()
    local rl = ratelimit.new{ rate = 50, burst = 1 }
    rl:take()
    local order = {}
    local fibers = {}
    for i = 1, 4 do
      fibers[i] = fibril.schedule(function() rl:take(); order[#order + 1] = i end)
    end
    fibril.await(fibers)
    assert.are.same({ 1, 2, 3, 4 }, order)
  end)

  it("suspends the fiber while it waits instead of spinning", function()
    local rl = ratelimit.new{ rate = 20, burst = 1 }
    local cpu0 = os.clock()
    local t0 = fibril.now()
    for _ = 1, 11 do rl:take() end                    -- 10 waits of 50 ms
    assert.is_true(fibril.now() - t0 >= 0.49)
    assert.is_true(os.clock() - cpu0 < 0.1, "CPU time " .. (os.clock() - cpu0))
  end)

  it("raises timeout at once, taking nothing, when the tokens would come too late", function()
    local rl = ratelimit.new{ rate = 10, burst = 2 }
    rl:take(2)
    local other_ran = false
    fibril.schedule(function() other_ran = true end)   -- runs only if take suspends
    local ok, err = pcall(rl.take, rl, 1, { timeout = 0.05 })
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    assert.matches("would take 0.1", err.message, 1, true)
    assert.is_false(other_ran)                          -- raised without waiting
    assert.is_true(rl:available() > -0.5)              -- nothing was reserved
    assert.is_true(rl:take(1, { timeout = 1 }) > 0)
  end)

  it("gives reserved tokens back when a waiting fiber is cancelled", function()
    local rl = ratelimit.new{ rate = 1, burst = 1 }
    rl:take()
    local f = fibril.schedule(function() rl:take() end)
    fibril.sleep(0.02)
    assert.is_true(rl:available() < -0.5)              -- reserved by the waiting fiber
    f:cancel()
    assert.is_false(pcall(fibril.await, f))
    assert.is_true(rl:available() > -0.1)
  end)

  it("rejects bad settings and token counts, naming them", function()
    assert.has_error(function() ratelimit.new{ rate = 0 } end,
                     "ratelimit.new: rate must be a positive number of tokens per second")
    assert.has_error(function() ratelimit.new{ rate = 1, burst = 0.5 } end,
                     "ratelimit.new: burst must be a number >= 1")
    assert.has_error(function() ratelimit.new{ rate = 1, redis = "redis://127.0.0.1" } end,
                     "ratelimit.new: a Redis bucket needs a key (a non-empty string naming it)")
    local rl = ratelimit.new{ rate = 5, burst = 2 }
    assert.has_error(function() rl:take(3) end,
                     "ratelimit: take: 3 tokens is more than the burst (2): it could never be granted")
    assert.has_error(function() rl:try(-1) end, "ratelimit: try: n must be a positive number of tokens")
  end)
end)

describe("fibril.ratelimit in Redis", function()
  local conn, n = nil, 0
  local function key()
    n = n + 1
    return "spec" .. math.random(1e9) .. "-" .. n
  end

  before_each(function()
    conn = redis.connect(REDIS_URL)
  end)
  after_each(function() if conn then conn:close() end end)

  it("grants the burst, then refuses, and keeps its bucket under the prefix with an expiry", function()
    local k = key()
    local rl = ratelimit.new{ rate = 10, burst = 3, redis = conn, key = k }
    assert.is_true(rl:try(3))
    assert.is_false(rl:try())
    local stored = ratelimit.KEY_PREFIX .. k
    assert.is_true(tonumber(conn:hget(stored, "tokens")) < 0.5)
    local ttl = conn:pttl(stored)
    assert.is_true(ttl > 0 and ttl <= 1300, "pttl " .. ttl)
    -- timed by the server: ts is the server's TIME in microseconds
    local t = conn:time()
    local server_us = tonumber(t[1]) * 1e6 + tonumber(t[2])
    assert.is_true(math.abs(server_us - tonumber(conn:hget(stored, "ts"))) < 5e6)
  end)

  it("keeps the long-run rate within 5 % of its setting", function()
    local rate, burst, window = 100, 25, 3
    local rl = ratelimit.new{ rate = rate, burst = burst, redis = REDIS_URL, key = key() }
    assert_within(rate * window + burst, count_grants(rl, window, 3), 0.05)
    rl:close()
  end)

  it("raises timeout at once without reserving, and gives tokens back on cancel", function()
    local k = key()
    local rl = ratelimit.new{ rate = 2, burst = 1, redis = conn, key = k }
    rl:take()
    local ok, err = pcall(rl.take, rl, 1, { timeout = 0.1 })
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    local stored = ratelimit.KEY_PREFIX .. k
    assert.is_true(tonumber(conn:hget(stored, "tokens")) > -0.5)        -- nothing reserved
    -- a URL limiter: its own connection, so the cancel leaves `conn` alone
    local rl2 = ratelimit.new{ rate = 2, burst = 1, redis = REDIS_URL, key = k }
    local f = fibril.schedule(function() rl2:take() end)
    fibril.sleep(0.05)
    assert.is_true(tonumber(conn:hget(stored, "tokens")) < -0.5)        -- reserved while waiting
    f:cancel()
    assert.is_false(pcall(fibril.await, f))
    fibril.sleep(0.02)
    assert.is_true(tonumber(conn:hget(stored, "tokens")) > -0.5)        -- given back
    rl2:close()
  end)

  it("runs the script with EVAL when the server lost it (NOSCRIPT), and caches it again", function()
    local rl = ratelimit.new{ rate = 100, burst = 5, redis = conn, key = key() }
    assert.is_true(rl:try())
    conn:script("flush")
    assert.is_true(rl:try())
    local sha = conn:script("load", ratelimit.SCRIPT)
    assert.are.same({ 1 }, conn:script("exists", sha))
    assert.are.equal(0, rl:take())
  end)

  it("shares one limit between two processes: the sum of their grants keeps the rate", function()
    local rate, burst, window = 100, 25, 3
    local k = key()
    local script = support.write("ratelimit_taker.lua", [[
local fibril = require "fibril"
local ratelimit = require "fibril.ratelimit"
local walltime = require("fibril.core.fiber").walltime
local url, k, start_at, window = ...
start_at, window = tonumber(start_at), tonumber(window)
local rl = ratelimit.new{ rate = 100, burst = 25, redis = url, key = k }
rl:try(0.001)                                 -- connect and load the script before the window
fibril.sleep(math.max(0, start_at - walltime()))
local deadline = start_at + window
local granted = 0
while true do
  rl:take()
  if walltime() > deadline then break end
  granted = granted + 1
end
print(granted)
]])
    -- the probe above takes 0.001 of a token in each process: part of the count's noise
    local start_at = require("fibril.core.fiber").walltime() + 1
    local args = ("'%s' '%s' %.3f %d"):format(REDIS_URL, k, start_at, window)
    local dir = support.tmpdir()
    local p = io.popen(("%s '%s' %s >%s/taker1.out 2>&1 & %s '%s' %s >%s/taker2.out 2>&1 & wait")
                       :format(support.fibril, script, args, dir, support.fibril, script, args, dir))
    p:read("*a")
    p:close()
    local function result(i)
      local f = assert(io.open(dir .. "/taker" .. i .. ".out"))
      local out = f:read("*a")
      f:close()
      return assert(tonumber(out:match("^(%d+)\n$")), out)
    end
    local a, b = result(1), result(2)
    assert.is_true(a > 0 and b > 0, ("each process was granted some: %d and %d"):format(a, b))
    assert_within(rate * window + burst, a + b, 0.05)
  end)
end)
