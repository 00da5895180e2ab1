-- bench/redis.lua URL [N] [CLIENTS]: fibril's Redis client against a redis-server, in the
-- shape of `redis-benchmark -t set,get -c CLIENTS -n N`: CLIENTS fibers share a pool of
-- CLIENTS connections, each doing SET then GET; then the same with pipelines of 100 commands.
-- Prints requests per second for each; bench/redis.sh compares them with redis-benchmark.
local fibril = require "fibril"
local redis = require "fibril.redis"

local url = arg[1] or os.getenv("REDIS_URL") or "redis://127.0.0.1:6379/0"
local N = tonumber(arg[2]) or 200000
local CLIENTS = tonumber(arg[3]) or 50
local PIPE = 100
-- redis-benchmark's workload: a 3-byte value, and one key ("key:__rand_int__" without -r).
local value = string.rep("x", 3)
local KEY = "key:__rand_int__"

local pool = redis.pool(url, { size = CLIENTS })

-- Runs body() N / per_call times spread over CLIENTS fibers; returns requests per second.
local function run(body, per_call)
  local calls = math.floor(N / per_call)
  local next_i = 0
  local fs = {}
  local t0 = fibril.now()
  for c = 1, CLIENTS do
    fs[c] = fibril.schedule(function()
      while next_i < calls do
        next_i = next_i + 1
        body()
      end
    end)
  end
  fibril.await_all(fs)
  return calls * per_call / (fibril.now() - t0)
end

-- Warm up the pool (connections) and the JIT.
run(function() pool:set(KEY, value) end, 1)

local set = run(function() pool:set(KEY, value) end, 1)
local get = run(function() pool:get(KEY) end, 1)
local pset = run(function()
  pool:pipeline(function(p)
    for _ = 1, PIPE do p:set(KEY, value) end
  end)
end, PIPE)
local pget = run(function()
  pool:pipeline(function(p)
    for _ = 1, PIPE do p:get(KEY) end
  end)
end, PIPE)
print(("fibril SET: %.0f requests per second"):format(set))
print(("fibril GET: %.0f requests per second"):format(get))
print(("fibril SET -P %d: %.0f requests per second"):format(PIPE, pset))
print(("fibril GET -P %d: %.0f requests per second"):format(PIPE, pget))
pool:close()
