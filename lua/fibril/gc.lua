--- fibril.gc: a floor under the garbage collector's threshold, for serving processes.
---
--- LuaJIT starts a collection cycle once the heap reaches `pause`% of what the last cycle
--- kept (200: when it has doubled). A served app often keeps well under 1 MiB alive while
--- each request allocates about 1 KiB, so a cycle would start every few hundred requests,
--- each one marking the whole live heap again for little garbage. As Go's collector does
--- with its 4 MiB minimum heap, the pause is set again at the end of every cycle so that
--- the next one starts no sooner than at gc.min_heap bytes (config; 4 MiB); a heap past half
--- of that keeps the default pause, so a large app's memory grows as it would without this.
--- docs/http.md ("Garbage collection") gives the figures.
local collectgarbage, newproxy, getmetatable, floor, max =
      collectgarbage, newproxy, getmetatable, math.floor, math.max

local M = { min_kb = 4096, pause = 200 }   -- min_kb: config gc.min_heap / 1024

local installed = false
local generation = 0      -- a sentinel of an earlier install stops instead of re-arming

local function set_pause()
  collectgarbage("setpause", max(M.pause, floor(100 * M.min_kb / max(collectgarbage("count"), 1))))
end

-- An unreachable userdata whose finalizer runs once per cycle and makes the next one.
local function arm(gen)
  local sentinel = newproxy(true)
  getmetatable(sentinel).__gc = function()
    if gen ~= generation then return end
    set_pause()
    arm(gen)
  end
end

---@return boolean whether install is in effect
function M.installed() return installed end

--- Keeps the collector's threshold at min_bytes or more (default 4 MiB; 0: LuaJIT's own
--- policy); pause is the pause for heaps above it (default 200, LuaJIT's). Idempotent.
---@param min_bytes number|nil
---@param pause number|nil
function M.install(min_bytes, pause)
  if min_bytes ~= nil then
    assert(type(min_bytes) == "number" and min_bytes >= 0, "fibril.gc.install: min_bytes must be >= 0")
    M.min_kb = min_bytes / 1024
  end
  if pause ~= nil then
    assert(type(pause) == "number" and pause >= 100, "fibril.gc.install: pause must be >= 100")
    M.pause = pause
  end
  set_pause()
  if not installed then
    installed = true
    generation = generation + 1
    arm(generation)
  end
end

--- Back to LuaJIT's own policy (the pause given to install, or 200).
function M.uninstall()
  installed = false
  generation = generation + 1
  collectgarbage("setpause", M.pause)
end

return M
