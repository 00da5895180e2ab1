local fibril = require "fibril"

describe("fibril.schedule and await", function()
  it("starts the fiber on the next loop turn, not inside schedule", function()
    local ran = false
    local f = fibril.schedule(function() ran = true end)
    assert.is_false(ran)
    assert.are.equal("scheduled", f:status())
    fibril.await(f)
    assert.is_true(ran)
    assert.are.equal("done", f:status())
  end)

  it("passes arguments and returns every result of one fiber", function()
    local f = fibril.schedule(function(a, b) return a + b, a * b, nil, "x" end, 3, 4)
    local r = { fibril.await(f) }
    assert.are.same({ 7, 12, nil, "x" }, r)
    assert.are.equal(4, select("#", fibril.await(f)))
  end)

  it("returns the first result of each fiber, in order, when awaiting several", function()
    local a = fibril.schedule(function() fibril.sleep(0.03) return "a", "ignored" end)
    local b = fibril.schedule(function() return "b" end)
    local c = fibril.schedule(function() return nil end)
    local ra, rb, rc = fibril.await(a, b, c)
    assert.are.same({ "a", "b" }, { ra, rb })
    assert.is_nil(rc)
    assert.are.same({ "a", "b" }, { fibril.await({ a, b }) })
  end)

  it("runs two 0.2 s sleeps concurrently: both awaited in well under 0.4 s", function()
    local t0 = fibril.now()
    local a = fibril.schedule(function() fibril.sleep(0.2) return 1 end)
    local b = fibril.schedule(function() fibril.sleep(0.2) return 2 end)
    assert.are.same({ 1, 2 }, { fibril.await(a, b) })
    local dt = fibril.now() - t0
    assert.is_true(dt >= 0.195, "slept too little: " .. dt)
    assert.is_true(dt < 0.35, "not concurrent: " .. dt)
  end)

  it("awaits a finished fiber again and again with the same results", function()
    local f = fibril.schedule(function() return {}, 2 end)
    local t1 = fibril.await(f)
    local t2, two = fibril.await(f)
    assert.are.equal(t1, t2)
    assert.are.equal(2, two)
  end)

  it("knows the current fiber", function()
    local f
    f = fibril.schedule(function() return fibril.current() end)
    assert.are.equal(f, fibril.await(f))
    assert.are.equal("number", type(f:id()))
    assert.matches("^fiber %d+ %(done%)$", tostring(f))
  end)

  it("runs nested schedules inside scheduled fibers", function()
    local function tree(depth)
      if depth == 0 then return 1 end
      local l = fibril.schedule(tree, depth - 1)
      local r = fibril.schedule(tree, depth - 1)
      local a, b = fibril.await(l, r)
      return a + b
    end
    assert.are.equal(2 ^ 10, fibril.await(fibril.schedule(tree, 10)))
  end)

  it("resolves a chain of 10,000 fibers each awaiting the previous one", function()
    local prev = fibril.schedule(function() fibril.sleep(0.01) return 0 end)
    for _ = 1, 10000 do
      local p = prev
      prev = fibril.schedule(function() return fibril.await(p) + 1 end)
    end
    assert.are.equal(10000, fibril.await(prev))
  end)

  it("wakes 10,000 fibers in the same loop turn", function()
    local done = 0
    local fibers = {}
    for i = 1, 10000 do
      fibers[i] = fibril.schedule(function() fibril.sleep(0.05); done = done + 1; return i end)
    end
    local results = fibril.await_all(fibers)
    assert.are.equal(10000, done)
    assert.are.equal(10000, #results)
    assert.are.equal(5000, results[5000])
  end)

  it("gives up the CPU on a bare coroutine.yield and carries on", function()
    local order = {}
    local a = fibril.schedule(function()
      order[#order + 1] = "a1"; coroutine.yield(); order[#order + 1] = "a2"
    end)
    local b = fibril.schedule(function() order[#order + 1] = "b" end)
    fibril.await(a, b)
    assert.are.same({ "a1", "b", "a2" }, order)
  end)

  it("rejects what is not a function or a fiber with a clear error", function()
    assert.has_error(function() fibril.schedule(42) end,
                     "fibril.schedule: expected a function, got number")
    local ok, err = pcall(fibril.await, "nope")
    assert.is_false(ok)
    assert.matches("fibril.await: expected a fiber", tostring(err))
    ok, err = pcall(fibril.await, { 1 })
    assert.matches("element 1 is a number, not a fiber", tostring(err))
    local many = {}
    for i = 1, 7001 do many[i] = fibril.schedule(function() return i end) end
    ok, err = pcall(fibril.await, many)
    assert.matches("use fibril.await_all", tostring(err), 1, true)
    assert.are.equal(7001, #fibril.await_all(many))
  end)
end)

describe("errors across await", function()
  it("re-raises a fiber's error in the awaiting fiber with the fiber's traceback", function()
    local function inner_failing_function() error("boom in fiber") end
    local f = fibril.schedule(function() inner_failing_function() end)
    local ok, err = pcall(fibril.await, f)
    assert.is_false(ok)
    assert.is_true(fibril.is_error(err))
    assert.matches("fiber_spec.lua:%d+: boom in fiber", err.message)
    assert.matches("inner_failing_function", err.traceback)
    assert.matches("boom in fiber\nstack traceback:", tostring(err))
    assert.are.equal(f:id(), err.fiber)
    assert.are.equal("failed", f:status())
    assert.matches("boom", err.value)
  end)

  it("keeps an error table raised by the fiber, adding its traceback", function()
    local f = fibril.schedule(function() error({ code = "E_APP", detail = 7 }) end)
    local ok, err = pcall(fibril.await, f)
    assert.is_false(ok)
    assert.are.equal("E_APP", err.code)
    assert.are.equal(7, err.detail)
    assert.is_string(err.traceback)
  end)

  it("raises the error of the first failing fiber when awaiting several", function()
    local a = fibril.schedule(function() return 1 end)
    local b = fibril.schedule(function() error("second fails") end)
    local ok, err = pcall(fibril.await, a, b)
    assert.is_false(ok)
    assert.matches("second fails", err.message)
  end)

  it("carries errors through several levels of await", function()
    local inner = fibril.schedule(function() fibril.sleep(0.01) error("deep") end)
    local outer = fibril.schedule(function() return fibril.await(inner) end)
    local ok, err = pcall(fibril.await, outer)
    assert.is_false(ok)
    assert.matches("deep", err.message)
    assert.are.equal(inner:id(), err.fiber)
  end)

  it("refuses to let a fiber await itself", function()
    local f
    f = fibril.schedule(function() fibril.sleep(0.01) return fibril.await(f) end)
    local ok, err = pcall(fibril.await, f)
    assert.is_false(ok)
    assert.are.equal("deadlock", err.code)
  end)
end)

describe("timeouts", function()
  it("raises err.code == 'timeout' past the deadline and leaves the fibers running", function()
    local slow = fibril.schedule(function() fibril.sleep(0.15) return "late" end)
    local t0 = fibril.now()
    local ok, err = pcall(fibril.await, { slow }, { timeout = 0.05 })
    local dt = fibril.now() - t0
    assert.is_false(ok)
    assert.is_true(fibril.is_error(err, "timeout"))
    assert.matches("fibril.await: timed out after 0.05 s", err.message)
    assert.is_true(dt >= 0.045 and dt < 0.14, "deadline not kept: " .. dt)
    assert.are.equal("suspended", slow:status())
    assert.are.equal("late", fibril.await(slow))
  end)

  it("takes one deadline for a whole list", function()
    local a = fibril.schedule(function() fibril.sleep(0.04) return 1 end)
    local b = fibril.schedule(function() fibril.sleep(0.3) return 2 end)
    local t0 = fibril.now()
    local ok, err = pcall(fibril.await, { a, b }, { timeout = 0.1 })
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    assert.is_true(fibril.now() - t0 < 0.25)
    fibril.cancel(b)
  end)

  it("accepts a deadline for a single fiber and returns all its results in time", function()
    local f = fibril.schedule(function() fibril.sleep(0.01) return 1, 2 end)
    assert.are.same({ 1, 2 }, { fibril.await(f, { timeout = 1 }) })
    local g = fibril.schedule(function() fibril.sleep(1) end)
    local ok, err = pcall(fibril.await, g, { timeout = 0.01 })
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    g:cancel()
  end)

  it("rejects a negative or non-number timeout", function()
    local f = fibril.schedule(function() end)
    assert.has_error(function() fibril.await({ f }, { timeout = -1 }) end)
    assert.has_error(function() fibril.await({ f }, { timeout = "1" }) end)
    fibril.await(f)
  end)
end)

describe("cancel", function()
  it("raises 'cancelled' in a sleeping fiber at once and releases its timer", function()
    fibril.sleep(0.01)   -- let fibers cancelled by earlier specs finish first
    local before = fibril.debug.live()
    local reached_end = false
    local f = fibril.schedule(function() fibril.sleep(10); reached_end = true end)
    fibril.sleep(0.01)
    assert.are.equal("suspended", f:status())
    local t0 = fibril.now()
    assert.is_true(f:cancel())
    local ok, err = pcall(fibril.await, f)
    assert.is_true(fibril.now() - t0 < 1)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.code)
    assert.are.equal("cancelled", f:status())
    assert.is_false(reached_end)
    fibril.sleep(0)   -- the timer's close callback runs on the next turn
    assert.are.equal(before.handles, fibril.debug.live().handles)
    assert.is_false(f:cancel())
  end)

  it("never runs a fiber cancelled before it started", function()
    local ran = false
    local f = fibril.schedule(function() ran = true end)
    f:cancel()
    local ok, err = pcall(fibril.await, f)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.code)
    assert.is_false(ran)
  end)

  it("raises at the next suspension point of a running fiber, which may catch it", function()
    local log = {}
    local f
    f = fibril.schedule(function()
      f:cancel()                 -- cancelling itself: nothing happens until it suspends
      log[#log + 1] = "still running"
      local ok, err = pcall(fibril.sleep, 1)
      log[#log + 1] = err.code
      fibril.sleep(0.01)         -- the cancellation was consumed: this sleep works
      return "recovered"
    end)
    assert.are.equal("recovered", fibril.await(f))
    assert.are.same({ "still running", "cancelled" }, log)
  end)

  it("releases a fiber waiting in await, leaving the awaited one running", function()
    local target = fibril.schedule(function() fibril.sleep(0.05) return "t" end)
    local waiter = fibril.schedule(function() return fibril.await(target) end)
    fibril.sleep(0.01)
    waiter:cancel()
    local ok, err = pcall(fibril.await, waiter)
    assert.are.equal("cancelled", err.code)
    assert.are.equal("t", fibril.await(target))
  end)
end)

describe("suspending where LuaJIT allows it and where it does not", function()
  it("suspends inside pcall and inside a metamethod", function()
    local ok, v = pcall(function() fibril.sleep(0.001) return "in pcall" end)
    assert.are.same({ true, "in pcall" }, { ok, v })
    local lazy = setmetatable({}, { __index = function(_, k) fibril.sleep(0.001) return k .. "!" end })
    assert.are.equal("x!", lazy.x)
  end)

  it("explains that a table.sort callback cannot suspend", function()
    local ok, err = pcall(table.sort, { 3, 1, 2 }, function(a, b) fibril.sleep(0) return a < b end)
    assert.is_false(ok)
    assert.matches("fibril.sleep: cannot suspend inside a callback called by the C function "
                   .. "'table.sort'", err, 1, true)
    ok, err = pcall(string.gsub, "ab", ".", function() fibril.sleep(0) end)
    assert.matches("cannot suspend inside a callback called by the C function 'string.gsub'", err, 1, true)
  end)

  it("explains that a module's main chunk cannot suspend", function()
    local support = require "spec.support"
    local dir = support.tmpdir()
    support.write("sleepy_module_for_spec.lua", "require('fibril').sleep(0.01) return {}")
    local saved = package.path
    package.path = dir .. "/?.lua;" .. package.path
    local ok, err = pcall(require, "sleepy_module_for_spec")
    package.path = saved
    assert.is_false(ok)
    assert.matches("fibril.sleep: cannot suspend while loading module 'sleepy_module_for_spec' "
                   .. "(move I/O into a function", err, 1, true)
  end)

  it("explains that a plain coroutine inside a fiber cannot suspend the fiber", function()
    local co = coroutine.create(function() fibril.sleep(0.01) end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.matches("called from a coroutine that fibril does not schedule", err)
  end)

  it("rejects a bad sleep duration", function()
    assert.has_error(function() fibril.sleep(-1) end,
                     "fibril.sleep: seconds must be a non-negative number")
    assert.has_error(function() fibril.sleep("1") end)
  end)
end)

describe("fiber context (the executor's unit state)", function()
  local core = require "fibril.core.fiber"

  it("is inherited by the fibers a fiber schedules, and by theirs", function()
    local ctx = { tags = { req = "r1" } }
    local seen = fibril.await(fibril.schedule(function()
      assert(core.set_context(ctx))
      local child = fibril.schedule(function()
        return fibril.await(fibril.schedule(function() return core.context() end))
      end)
      return fibril.await(child)
    end))
    assert.are.equal(ctx, seen)
  end)

  it("is not shared with fibers scheduled before it was set, nor with unrelated ones", function()
    local before, other
    local f = fibril.schedule(function()
      local early = fibril.schedule(function() fibril.sleep(0.01) return core.context() end)
      core.set_context({ name = "late" })
      before = fibril.await(early)
    end)
    local g = fibril.schedule(function() fibril.sleep(0.005) other = core.context() end)
    fibril.await(f, g)
    assert.is_nil(before)
    assert.is_nil(other)
  end)

  it("is released with the fiber (no anchor left behind)", function()
    fibril.sleep(0.3)            -- fibers left by earlier specs finish first
    local refs = fibril.debug.live().refs
    for _ = 1, 200 do
      fibril.await(fibril.schedule(function()
        core.set_context({})
        core.set_context({})        -- replacing releases the old one
        fibril.await(fibril.schedule(function() end))
      end))
    end
    -- Other specs' fibers may finish meanwhile (fewer refs); a leak would add 200 or more.
    assert.is_true(fibril.debug.live().refs <= refs, "refs grew from " .. refs)
  end)
end)
