-- fibril.gc: the floor under the collector's threshold that `fibril run` installs.
local gc = require "fibril.gc"

-- The current pause (setpause returns the previous one).
local function pause()
  local p = collectgarbage("setpause", 200)
  collectgarbage("setpause", p)
  return p
end

describe("fibril.gc", function()
  after_each(function() gc.uninstall() end)

  it("keeps the pause such that a cycle starts at min_heap or later, cycle after cycle", function()
    gc.install(8 * 1024 * 1024)
    for _ = 1, 3 do
      collectgarbage("collect")          -- the sentinel's finalizer sets the pause again
      local live = collectgarbage("count")
      local want = math.floor(100 * 8192 / live)
      assert.is_true(want > 200, "a spec process keeps well under 4 MiB alive")
      assert.is_true(math.abs(pause() - want) <= want * 0.2, ("pause %d, want ~%d"):format(pause(), want))
      local junk = {}
      for i = 1, 20000 do junk[i] = { i } end        -- a bigger live heap: a smaller pause
      collectgarbage("collect")
      collectgarbage("collect")
      assert.is_true(pause() < want, "the pause follows the live heap")
      assert.are.equal(20000, #junk)                  -- alive through both collections
    end
  end)

  it("keeps LuaJIT's own pause for a heap past half the floor, and for min_heap 0", function()
    gc.install(64 * 1024)                             -- 64 KiB: any heap is past it
    collectgarbage("collect")
    assert.are.equal(200, pause())
    gc.install(0)
    collectgarbage("collect")
    assert.are.equal(200, pause())
  end)

  it("gives the collector back its own policy on uninstall", function()
    gc.install(8 * 1024 * 1024)
    collectgarbage("collect")
    assert.is_true(pause() > 200)
    gc.uninstall()
    assert.are.equal(200, pause())
    collectgarbage("collect")                         -- a sentinel left over does not re-arm
    collectgarbage("collect")
    assert.are.equal(200, pause())
    assert.is_false(gc.installed())
  end)
end)
