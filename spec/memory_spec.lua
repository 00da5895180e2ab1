local fibril = require "fibril"

local function settle()
  fibril.sleep(0)      -- let close callbacks of finished fibers' timers run
  collectgarbage()
  collectgarbage()
  return collectgarbage("count"), fibril.debug.live()
end

describe("finished fibers", function()
  it("are garbage-collectable: memory returns to where it started after 1,000,000", function()
    local kb0, live0 = settle()
    for i = 1, 1000000 do
      local f = fibril.schedule(function(x) return x end, i)
      assert(fibril.await(f) == i)
    end
    local kb1, live1 = settle()
    assert.are.equal(live0.fibers, live1.fibers)
    assert.are.equal(live0.refs, live1.refs)
    assert.are.equal(live0.handles, live1.handles)
    assert.is_true(kb1 - kb0 < 256, ("grew by %.0f KiB"):format(kb1 - kb0))
  end)

  it("release their timers, refs and results, sleeping, failing or cancelled", function()
    local kb0, live0 = settle()
    for _ = 1, 2000 do
      local a = fibril.schedule(function() fibril.sleep(0.001) return {} end)
      local b = fibril.schedule(function() error({}) end)
      local c = fibril.schedule(function() fibril.sleep(5) end)
      fibril.await(a)
      pcall(fibril.await, b)
      c:cancel()
      pcall(fibril.await, c)
    end
    local kb1, live1 = settle()
    assert.are.same(live0, live1)
    assert.is_true(kb1 - kb0 < 256, ("grew by %.0f KiB"):format(kb1 - kb0))
  end)
end)
