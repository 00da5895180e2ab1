-- examples/gc_pace.lua: the collector's pace that `fibril run` sets (docs/gc.md), in a script.
-- Makes request-sized garbage as a server would and shows how far apart the cycles come, with
-- LuaJIT's own pace and with fibril.gc's least growth and gentle steps.
local gc = require "fibril.gc"

-- ~0.5 KiB and a few objects of garbage, like one small request; `live` holds the last 64.
local live = {}
local function request(i)
  live[i % 64 + 1] = { method = "GET", path = "/hello", headers = { host = "example" },
                       params = {}, id = tostring(i) }
end

local function run(label, n)
  collectgarbage("collect")
  local before = gc.stats().cycles
  local peak = 0
  for i = 1, n do
    request(i)
    if i % 1000 == 0 then peak = math.max(peak, collectgarbage("count")) end
  end
  local cycles = gc.stats().cycles - before
  print(("%-34s %4d cycles for %d requests (one per %5d), heap peak %6.0f KiB"):format(
    label, cycles, n, math.floor(n / math.max(cycles, 1)), peak))
  return cycles
end

local N = 200000
-- gc.stats() counts cycles only while pacing: pace with LuaJIT's own numbers first (a
-- pause of 200% and stepmul 200 with no least growth leave LuaJIT's pace as it is).
gc.pace{ pause = 200, stepmul = 200, min_growth = 0 }
local luajit = run("LuaJIT's pace (200/200):", N)
gc.pace{ pause = 200, stepmul = 25, min_growth = 8 * 1024 * 1024 }   -- fibril run's defaults
local paced = run("fibril.gc (200, 25, 8 MiB):", N)
gc.stop()
print(("cycles %.0fx further apart; the last plan: %s"):format(luajit / math.max(paced, 1),
  ("pause %d%%, stepmul %d"):format(gc.stats().pause, gc.stats().stepmul)))
assert(paced < luajit, "the least growth spaces cycles out")
assert(#live == 64)
