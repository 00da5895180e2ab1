-- bench/fibers.lua: the fiber core's speed and memory, printed, never asserted.
--   1. schedule+await of an empty fiber, against plain coroutine.create/resume in the same run
--      (targets: >= 1,000,000 fibers/s, within 3x of the coroutine baseline)
--   2. 100,000 fibers sleeping at once: RSS per sleeping fiber (target <= 2 KiB) and the worst
--      lateness of a wake-up (target < 50 ms)
-- Usage: fibril bench/fibers.lua [rounds]
local fibril = require "fibril"

local rounds = tonumber(arg and arg[1]) or 5
local N = 1000000
local now = fibril.now

local function median(t)
  table.sort(t)
  return t[math.ceil(#t / 2)]
end

local function rss_bytes()
  local f = assert(io.open("/proc/self/statm"))
  local _, resident = f:read("*n", "*n")
  f:close()
  return resident * 4096
end

local function empty() end

local function fibers_per_second()
  local t0 = now()
  for _ = 1, N do fibril.await(fibril.schedule(empty)) end
  return N / (now() - t0)
end

local function coroutines_per_second()
  local create, resume = coroutine.create, coroutine.resume
  local t0 = now()
  for _ = 1, N do resume(create(empty)) end
  return N / (now() - t0)
end

-- Rounds alternate fiber, coroutine, fiber, ... so machine noise hits both alike.
local fib, cor = {}, {}
for r = 1, rounds do
  collectgarbage()
  fib[r] = fibers_per_second()
  collectgarbage()
  cor[r] = coroutines_per_second()
end
local f_med, c_med = median(fib), median(cor)
print(("schedule+await (empty fiber): %.0f fibers/s (median of %d rounds of %d)"):format(f_med, rounds, N))
print(("coroutine.create+resume baseline: %.0f /s"):format(c_med))
print(("ratio coroutine/fiber: %.2fx  (target: fibers >= 1000000/s and ratio <= 3.00)"):format(c_med / f_med))

-- 100,000 sleeping fibers
local SLEEPERS = 100000
local worst, woken = 0, 0
local function sleeper(seconds)
  local due = now() + seconds
  fibril.sleep(seconds)
  local late = now() - due
  if late > worst then worst = late end
  woken = woken + 1
end

collectgarbage(); collectgarbage()
fibril.sleep(0.01)
local rss0 = rss_bytes()
local fibers = {}
math.randomseed(42)
for i = 1, SLEEPERS do
  local s = 1 + math.random() * 1.0          -- wake-ups spread over one second
  fibers[i] = fibril.schedule(sleeper, s)
end
fibril.sleep(0.5)                            -- every fiber has started and is asleep
local rss1 = rss_bytes()
local live = fibril.debug.live()
fibril.await_all(fibers)
print(("%d sleeping fibers: %.0f bytes of RSS each (target <= 2048); %d fibers, %d timers live"):format(
      SLEEPERS, (rss1 - rss0) / SLEEPERS, live.fibers, live.handles))
print(("worst wake-up lateness: %.1f ms over %d wake-ups (target < 50 ms)"):format(worst * 1000, woken))
