--- fibril.gc: the pace of LuaJIT's collector in a serving process (docs/gc.md says why).
---
--- LuaJIT collects incrementally: a cycle starts when the heap has grown to `pause` percent of
--- what the last cycle kept, then each KiB allocated pays for a step of `stepmul` * 10 units
--- of work (marking costs about a unit per byte marked; sweeping 40 objects, 400). On its own
--- that paces a small heap badly: a served app keeps ~0.5 MiB alive, so a cycle starts every
--- thousand requests or so, marks everything again, and then frees the requests' garbage in
--- bursts at a rate set by stepmul (the requests of a burst take ~20-30% longer: that is the
--- latency tail). pace() adds what Go's collector has and LuaJIT lacks:
--- - a least growth in bytes (min_growth): a cycle starts after the heap has grown by
---   max(min_growth, pause - 100 percent of what was kept), so a small heap is marked rarely;
--- - gentle steps: stepmul is the least work per step, raised only as far as a large heap
---   needs to be marked within one cycle's growth (memory stays near kept + 2 x growth).
--- Both are worked out again at the end of every cycle, by a finalizer.
local collectgarbage, newproxy, getmetatable, type, error =
      collectgarbage, newproxy, getmetatable, type, error
local max, min, ceil, floor, huge = math.max, math.min, math.ceil, math.floor, math.huge

local M = {}

local settings               -- { pause, stepmul, min_growth } while pacing, else nil
local stats = { cycles = 0 }
local armed = false          -- a sentinel exists (at most one: stop then pace must not make two)

--- The pause and stepmul for a heap that kept `kept` bytes after its last cycle.
---@return number pause, number stepmul
function M.plan(kept, s)
  kept = max(kept, 1)
  local growth = max(s.min_growth, kept * (s.pause - 100) / 100)
  local pause = min(10000, max(s.pause, ceil(100 * (kept + growth) / kept)))
  -- Marking `kept` bytes while `growth` bytes are allocated: 1024 bytes buy stepmul * 10
  -- units, so stepmul = 102.4 * kept / growth (or more: it is the least).
  local stepmul = min(10000, max(s.stepmul, ceil(102.4 * kept / growth)))
  return pause, stepmul
end

local function apply()
  local kept = collectgarbage("count") * 1024   -- after the sweep: what the cycle kept
  local pause, stepmul = M.plan(kept, settings)
  collectgarbage("setpause", pause)
  collectgarbage("setstepmul", stepmul)
  stats.kept, stats.pause, stats.stepmul = floor(kept), pause, stepmul
end

-- The finalizer of a garbage userdata runs once per cycle, after the sweep (LuaJIT's
-- finalize phase, before it sets the next cycle's threshold from pause): each one makes the
-- next. It only reads the heap size and sets two numbers; it never yields.
local sentinel_proto = newproxy(true)
local function arm()
  armed = true
  newproxy(sentinel_proto)                   -- garbage at once: collected by the next cycle
end
getmetatable(sentinel_proto).__gc = function(u)
  if u == sentinel_proto then                -- lua_close finalizes every userdata: no new ones
    settings = nil
    return
  end
  armed = false
  if not settings then return end            -- stop() was called: the chain ends here
  stats.cycles = stats.cycles + 1
  apply()
  arm()
end

local function whole(v, lo, hi) return type(v) == "number" and v == floor(v) and v >= lo and v <= hi end

--- Paces the collector: opts.pause (percent, 100..10000), opts.stepmul (the least,
--- 10..10000), opts.min_growth (bytes, 0 for none). `fibril run` calls it with config's gc
--- section; a script may too. Takes effect at once and after every cycle.
function M.pace(opts)
  if type(opts) ~= "table" then error("gc.pace: expected { pause, stepmul, min_growth }", 2) end
  if not whole(opts.pause, 100, 10000) then
    error("gc.pace: pause must be a whole number from 100 to 10000", 2)
  end
  if not whole(opts.stepmul, 10, 10000) then
    error("gc.pace: stepmul must be a whole number from 10 to 10000", 2)
  end
  if not whole(opts.min_growth, 0, huge) then
    error("gc.pace: min_growth must be a whole number of bytes", 2)
  end
  settings = { pause = opts.pause, stepmul = opts.stepmul, min_growth = opts.min_growth }
  apply()                                    -- from the heap as it is now, until the first cycle ends
  if not armed then arm() end
end

--- Stops pacing: LuaJIT's own pace (200, 200) from now on.
function M.stop()
  settings = nil
  collectgarbage("setpause", 200)
  collectgarbage("setstepmul", 200)
end

--- { cycles, kept, pause, stepmul }: cycles ended while pacing, and the last plan.
function M.stats()
  return { cycles = stats.cycles, kept = stats.kept, pause = stats.pause, stepmul = stats.stepmul,
           pacing = settings ~= nil }
end

return M
