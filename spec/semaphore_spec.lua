local fibril = require "fibril"

describe("fibril.semaphore", function()
  it("lets at most n fibers hold it at once", function()
    local sem = fibril.semaphore(2)
    local holding, most = 0, 0
    local fibers = {}
    for i = 1, 8 do
      fibers[i] = fibril.schedule(function()
        sem:with(function()
          holding = holding + 1
          most = math.max(most, holding)
          fibril.sleep(0.01)
          holding = holding - 1
        end)
      end)
    end
    fibril.await_all(fibers)
    assert.are.equal(2, most)
    assert.are.equal(2, sem.available)
  end)

  it("hands permits over in FIFO order", function()
    local sem = fibril.semaphore(1)
    sem:acquire()
    local order = {}
    local fibers = {}
    for i = 1, 3 do
      fibers[i] = fibril.schedule(function() sem:acquire(); order[#order + 1] = i; sem:release() end)
    end
    fibril.sleep(0.01)
    sem:release()
    fibril.await_all(fibers)
    assert.are.same({ 1, 2, 3 }, order)
  end)

  it("releases the permit when the function given to with raises", function()
    local sem = fibril.semaphore(1)
    local ok, err = pcall(sem.with, sem, function() error("inside") end)
    assert.is_false(ok)
    assert.matches("inside", tostring(err))
    assert.are.equal(1, sem.available)
    assert.are.same({ "a", "b" }, { sem:with(function() return "a", "b" end) })
  end)

  it("raises 'timeout' from acquire without consuming a permit", function()
    local sem = fibril.semaphore(1)
    sem:acquire()
    local ok, err = pcall(sem.acquire, sem, { timeout = 0.02 })
    assert.are.equal("timeout", err.code)
    sem:release()
    assert.are.equal(1, sem.available)
  end)

  it("frees a cancelled waiter's place so the permit goes to the next one", function()
    local sem = fibril.semaphore(1)
    sem:acquire()
    local a = fibril.schedule(function() sem:acquire(); return "a" end)
    local b = fibril.schedule(function() sem:acquire(); return "b" end)
    fibril.sleep(0.01)
    a:cancel()
    sem:release()
    assert.are.equal("b", fibril.await(b))
    local ok, err = pcall(fibril.await, a)
    assert.are.equal("cancelled", err.code)
  end)

  it("refuses more releases than acquires", function()
    local sem = fibril.semaphore(1)
    assert.has_error(function() sem:release() end, "semaphore:release: more releases than acquires")
    assert.has_error(function() fibril.semaphore(0) end)
  end)
end)
