local fibril = require "fibril"
local executor = require "fibril.executor"
local log = require "fibril.log"

-- Registers callbacks for one spec and removes them after it.
local registered = {}
local function on(kind, cb)
  registered[#registered + 1] = executor[kind](cb)
end
local function capture_log()
  local lines = {}
  log.output(function(line) lines[#lines + 1] = line end)
  return lines
end

describe("fibril.executor", function()
  after_each(function()
    for _, cb in ipairs(registered) do executor.remove(cb) end
    registered = {}
    log.output(nil)
  end)

  it("runs to_run in order before the unit and to_complete in reverse after it", function()
    local order = {}
    on("to_run", function() order[#order + 1] = "run1" end)
    on("to_run", function() order[#order + 1] = "run2" end)
    on("to_complete", function(ok) order[#order + 1] = "complete1 " .. tostring(ok) end)
    on("to_complete", function(ok) order[#order + 1] = "complete2 " .. tostring(ok) end)
    local a, b = executor.wrap(function(x) order[#order + 1] = "unit"; return x, x + 1 end, nil, 1)
    assert.are.same({ 1, 2 }, { a, b })
    assert.are.same({ "run1", "run2", "unit", "complete2 true", "complete1 true" }, order)
  end)

  it("runs to_complete when the unit raises, then re-raises with the traceback", function()
    local seen
    on("to_complete", function(ok, err) seen = { ok, err } end)
    local ok, err = pcall(executor.wrap, function() error("unit failed") end)
    assert.is_false(ok)
    assert.matches("unit failed", err.message)
    assert.is_string(err.traceback)
    assert.is_false(seen[1])
    assert.are.equal(err, seen[2])
  end)

  it("runs the callbacks once for nested units, in the fiber and in the fibers it schedules", function()
    local runs, completes = 0, 0
    on("to_run", function() runs = runs + 1 end)
    on("to_complete", function() completes = completes + 1 end)
    executor.wrap(function()
      executor.wrap(function() end)
      fibril.await(fibril.schedule(function() executor.wrap(function() end) end))
    end)
    assert.are.equal(1, runs)
    assert.are.equal(1, completes)
  end)

  it("keeps unit-local state per unit, shared with its fibers and dropped after it", function()
    local function unit(name)
      return executor.wrap(function()
        executor.locals().name = name
        fibril.sleep(0.01)                     -- the other unit runs meanwhile
        local from_child = fibril.await(fibril.schedule(function() return fibril.locals().name end))
        return executor.locals().name .. "/" .. from_child
      end)
    end
    local a = fibril.schedule(unit, "a")
    local b = fibril.schedule(unit, "b")
    assert.are.same({ "a/a", "b/b" }, { fibril.await(a, b) })
    assert.is_nil(executor.locals())           -- outside any unit
    executor.wrap(function() assert.is_nil(executor.locals().name) end)
  end)

  it("logs a failing to_run with its origin, skips the unit, and still completes", function()
    local lines = capture_log()
    local ran, completed = false, false
    on("to_run", function() error("setup broke") end)
    on("to_complete", function() completed = true end)
    local ok, err = pcall(executor.wrap, function() ran = true end)
    assert.is_false(ok)
    assert.matches("setup broke", tostring(err))
    assert.is_false(ran)
    assert.is_true(completed)
    assert.matches('msg="executor callback failed" callback=to_run err=.*setup broke.* '
                   .. 'origin=spec/executor_spec.lua:%d+', lines[1])
  end)

  it("logs a failing to_complete and still runs the others and returns the result", function()
    local lines = capture_log()
    local other = false
    on("to_complete", function() other = true end)
    on("to_complete", function() error("cleanup broke") end)
    assert.are.equal(42, executor.wrap(function() return 42 end))
    assert.is_true(other)
    assert.matches("callback=to_complete", lines[1])
  end)

  it("tags log lines with the unit's tags, in the fibers it schedules too", function()
    local lines = capture_log()
    executor.wrap(function()
      log.tag("account", 7)
      log.info("in the unit")
      fibril.await(fibril.schedule(function() log.info("in a child fiber") end))
    end, { tags = { req = "r-1" } })
    log.info("after the unit")
    assert.matches('msg="in the unit" req=r%-1 account=7$', lines[1])
    assert.matches('msg="in a child fiber" req=r%-1 account=7$', lines[2])
    assert.matches('msg="after the unit"$', lines[3])
  end)

  it("tags log lines with req=id when call is given a request id, and log.tag adds to it", function()
    local lines = capture_log()
    assert.is_true((executor.call(function()
      log.info("first")
      assert.are.same({ req = "r-2" }, log.tags())
      log.tag("account", 8)
      fibril.await(fibril.schedule(function() log.info("in a child fiber") end))
    end, "r-2")))
    assert.matches('msg=first req=r%-2$', lines[1])
    assert.matches('msg="in a child fiber" req=r%-2 account=8$', lines[2])
  end)

  it("runs a unit in a new fiber with call_new_fiber, as call does", function()
    local order, lines = {}, capture_log()
    on("to_run", function() order[#order + 1] = "run" end)
    on("to_complete", function(ok, err) order[#order + 1] = { ok, err and err.message } end)
    local child_active
    local f = fibril.schedule(function()
      return executor.call_new_fiber(function(a, b)
        log.info("inside")
        fibril.await(fibril.schedule(function() child_active = executor.active() end))
        return a + b
      end, "r-3", 2, 3)
    end)
    local ok, result = fibril.await(f)
    assert.is_true(ok)
    assert.are.equal(5, result)
    assert.is_true(child_active)
    assert.matches("msg=inside req=r%-3$", lines[1])
    f = fibril.schedule(function()
      return executor.call_new_fiber(function() error("broke") end, "r-4")
    end)
    local ok2, err = fibril.await(f)
    assert.is_false(ok2)
    assert.matches("broke", err.message)
    assert.is_string(err.traceback)
    assert.are.same({ "run", { true }, "run", { false, err.message } }, order)
  end)

  it("takes a generated id's counter for call_new_fiber: its string is made only to log", function()
    local lines = capture_log()
    local id_string = require("fibril.core.http").id_string
    local id = id_string(6)
    assert.matches("^%x+00000006$", id)
    assert.is_true(fibril.await(fibril.schedule(function()
      return executor.call_new_fiber(function()
        log.info("one")
        -- an inline subscriber's unit (call_nested) keeps the request's tag
        executor.call_nested(function() log.info("nested") end, { sub = "s" })
        -- a fiber the unit starts, logging after the unit ended: the id, not the request
        fibril.schedule(function() fibril.sleep(0.01); log.info("later") end)
      end, 6)
    end)))
    fibril.sleep(0.05)
    assert.matches("msg=one req=" .. id .. "$", lines[1])
    assert.matches("msg=nested req=" .. id .. " sub=s$", lines[2])
    assert.matches("msg=later req=" .. id .. "$", lines[3])
    assert.has_error(function() id_string(0) end)
  end)

  it("is call inside a running unit: the callbacks run once and the unit's context stays", function()
    local runs, core = 0, require "fibril.core.fiber"
    on("to_run", function() runs = runs + 1 end)
    executor.wrap(function()
      local outer = core.context()
      local ok, result = executor.call_new_fiber(function(a) return a * 2 end, "r-5", 21)
      assert.is_true(ok)
      assert.are.equal(42, result)
      assert.are.equal(outer, core.context())
      assert.is_true(executor.active())
    end)
    assert.are.equal(1, runs)
  end)

  it("leaves the calling fiber without a context after the unit", function()
    local core = require "fibril.core.fiber"
    assert.is_nil(core.context())
    executor.wrap(function() assert.is_not_nil(core.context()) end)
    pcall(executor.wrap, function() error("x") end)
    assert.is_nil(core.context())
    assert.is_nil(fibril.await(fibril.schedule(function() return core.context() end)))
  end)

  it("calls to_prepare callbacks when asked (after a reload)", function()
    local prepared = 0
    on("to_prepare", function() prepared = prepared + 1 end)
    executor.prepare()
    assert.are.equal(1, prepared)
  end)
end)

describe("fibril.log", function()
  after_each(function() log.output(nil); log.configure{ level = "info", format = "text" } end)

  it("writes key=value lines, quoting what needs it", function()
    local lines = capture_log()
    log.warn("two words", { path = "/a b", n = 3, nl = "x\ny", plain = "ok" })
    assert.matches('^ts=%d+%-%d+%-%d+T%d+:%d+:%d+%.%d+Z level=warn msg="two words" '
                   .. 'n=3 nl="x\\ny" path="/a b" plain=ok$', lines[1])
  end)

  it("filters by level and writes JSON when asked", function()
    local lines = capture_log()
    log.debug("hidden")
    log.configure{ level = "debug", format = "json" }
    log.debug("shown", { k = "v" })
    assert.are.equal(1, #lines)
    local obj = require("fibril.json").decode(lines[1])
    assert.are.equal("shown", obj.msg)
    assert.are.equal("debug", obj.level)
    assert.are.equal("v", obj.k)
    assert.has_error(function() log.configure{ level = "loud" } end)
  end)
end)

describe("HTTP requests as units of work", function()
  local App = require "fibril.app"
  local server = require "fibril.server"
  local support = require "spec.support"
  local srv, port
  setup(function()
    srv = server.listen(App.load("spec/fixtures/shop", "test"))
    port = srv:port()
  end)
  teardown(function() srv:close() end)
  after_each(function()
    for _, cb in ipairs(registered) do executor.remove(cb) end
    registered = {}
  end)

  it("runs to_complete after a failing action, with the error", function()
    local seen
    on("to_complete", function(ok, err) seen = { ok = ok, err = err and err.message } end)
    local res = support.raw(port, "GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal(500, res.status)
    assert.is_false(seen.ok)
    assert.matches("kaboom", seen.err)
  end)

  it("does not let unit-local state leak between concurrent requests", function()
    local results = fibril.map({ "a", "b", "c", "d" }, function(v)
      return support.raw(port, "GET /locals/" .. v .. " HTTP/1.1\r\nHost: t\r\n\r\n").body
    end)
    assert.are.same({ "nil->a", "nil->b", "nil->c", "nil->d" }, results)
  end)
end)
