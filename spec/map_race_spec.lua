local fibril = require "fibril"

describe("fibril.map", function()
  it("returns results in item order with at most `concurrency` calls running", function()
    local running, most = 0, 0
    local items = {}
    for i = 1, 20 do items[i] = i end
    local t0 = fibril.now()
    local r = fibril.map(items, function(x, i)
      running = running + 1
      most = math.max(most, running)
      fibril.sleep(0.02 * ((21 - x) % 3))   -- finish out of order
      running = running - 1
      return x * 10 + i
    end, { concurrency = 4 })
    assert.are.equal(4, most)
    for i = 1, 20 do assert.are.equal(i * 11, r[i]) end
    assert.is_true(fibril.now() - t0 < 0.4)
  end)

  it("runs every item at once without a cap, and handles an empty list", function()
    local t0 = fibril.now()
    local r = fibril.map({ 1, 2, 3, 4, 5 }, function(x) fibril.sleep(0.05) return x end)
    assert.are.same({ 1, 2, 3, 4, 5 }, r)
    assert.is_true(fibril.now() - t0 < 0.09)
    assert.are.same({}, fibril.map({}, function() end))
  end)

  it("re-raises the first error and cancels the calls still running", function()
    local finished = 0
    local t0 = fibril.now()
    local ok, err = pcall(fibril.map, { 1, 2, 3, 4 }, function(x)
      if x == 2 then error("item two failed") end
      fibril.sleep(0.5)
      finished = finished + 1
    end, { concurrency = 4 })
    assert.is_false(ok)
    assert.matches("item two failed", tostring(err))
    assert.is_true(fibril.now() - t0 < 0.3, "did not fail fast")
    fibril.sleep(0.01)
    assert.are.equal(0, finished)
  end)

  it("raises 'timeout' past opts.timeout and cancels the calls", function()
    local finished = false
    local ok, err = pcall(fibril.map, { 1 }, function() fibril.sleep(1); finished = true end,
                          { timeout = 0.02 })
    assert.are.equal("timeout", err.code)
    fibril.sleep(0.01)
    assert.is_false(finished)
  end)

  it("cancels its calls when the mapping fiber is cancelled", function()
    local finished = false
    local f = fibril.schedule(function()
      return fibril.map({ 1, 2 }, function() fibril.sleep(1); finished = true end)
    end)
    fibril.sleep(0.01)
    f:cancel()
    local ok, err = pcall(fibril.await, f)
    assert.are.equal("cancelled", err.code)
    fibril.sleep(0.01)
    assert.is_false(finished)
  end)
end)

describe("fibril.race", function()
  it("returns the first fiber to finish and leaves the others running", function()
    local slow = fibril.schedule(function() fibril.sleep(0.1) return "slow" end)
    local fast = fibril.schedule(function() fibril.sleep(0.01) return "fast" end)
    local winner = fibril.race(slow, fast)
    assert.are.equal(fast, winner)
    assert.are.equal("fast", fibril.await(winner))
    assert.are.equal("suspended", slow:status())
    assert.are.equal("slow", fibril.await(slow))
  end)

  it("counts a failure as finishing, and takes a list", function()
    local bad = fibril.schedule(function() error("lost") end)
    local slow = fibril.schedule(function() fibril.sleep(0.1) end)
    local winner = fibril.race({ slow, bad })
    assert.are.equal(bad, winner)
    slow:cancel()
  end)

  it("returns at once when a fiber has already finished", function()
    local done = fibril.schedule(function() return 1 end)
    fibril.await(done)
    local other = fibril.schedule(function() fibril.sleep(1) end)
    assert.are.equal(done, fibril.race(other, done))
    other:cancel()
  end)

  it("raises 'timeout' when none finishes in time", function()
    local a = fibril.schedule(function() fibril.sleep(1) end)
    local ok, err = pcall(fibril.race, a, { timeout = 0.02 })
    assert.are.equal("timeout", err.code)
    a:cancel()
  end)
end)
