-- fibril.events and fibril.subscriber: event classes validate and freeze, round-trip through
-- JSON, reach inline subscribers as units of their own with errors isolated, reach deferred
-- ones as durable tasks; `fibril events APP` prints the graph. The journal, retries, crashes
-- and --workers are in spec/deferred_spec.lua.
local events = require "fibril.events"
local Subscriber = require "fibril.subscriber"
local deferred = require "fibril.deferred"
local executor = require "fibril.executor"
local log = require "fibril.log"
local json = require "fibril.json"
local support = require "spec.support"

local function capture_log()
  local lines = {}
  log.output(function(line) lines[#lines + 1] = line end)
  return lines
end

local eventually = support.wait_for

local n = 0
local function unique(prefix)
  n = n + 1
  return (prefix or "Spec") .. ".E" .. n
end

describe("fibril.events", function()
  local saved
  before_each(function() saved = events.reset_subscriptions() end)
  after_each(function()
    events.restore_subscriptions(saved)
    log.output(nil)
  end)

  describe("event classes", function()
    it("builds events whose fields read directly, with a class name and a unique id", function()
      local E = events.define(unique(), { "order_id", "total", optional = { "note" } })
      local a, b = E{ order_id = 1, total = 9.5 }, E{ order_id = 2, total = 0 }
      assert.are.equal(1, a.order_id)
      assert.are.equal(9.5, a.total)
      assert.is_nil(a.note)
      assert.are.equal(E.name, events.name(a))
      assert.is_string(events.id(a))
      assert.are_not.equal(events.id(a), events.id(b))
      assert.is_true(events.is_event(a))
      assert.is_false(events.is_event({ order_id = 1 }))
    end)

    it("raises an error naming a missing required field", function()
      local E = events.define(unique(), { "pipeline_id", "partition_id" })
      assert.has_error(function() E{ pipeline_id = 1 } end,
                       E.name .. ": missing required field 'partition_id'")
    end)

    it("raises an error naming an unknown field and listing the known ones", function()
      local E = events.define(unique(), { "a", optional = { "b" } })
      local ok, err = pcall(E, { a = 1, c = 2 })
      assert.is_false(ok)
      assert.truthy(err:find(E.name .. ": unknown field 'c' (fields: a, b)", 1, true), err)
    end)

    it("rejects values JSON cannot carry", function()
      local E = events.define(unique(), { "a" })
      assert.has_error(function() E{ a = print } end)
      assert.has_error(function() E{ a = 0 / 0 } end)
      assert.has_error(function() E{ a = { [true] = 1 } } end)
    end)

    it("freezes the event: assigning a field raises, and later changes to the input do not show", function()
      local E = events.define(unique(), { "items" })
      local items = { 1, 2 }
      local ev = E{ items = items }
      assert.has_error(function() ev.items = {} end, "events: an event is read-only (field 'items')")
      assert.has_error(function() ev.other = 1 end)
      items[1] = 99
      assert.are.equal(1, ev.items[1])
      assert.are.equal(2, #ev.items)
    end)

    it("keeps the payload unchanged when a holder changes a nested table it read", function()
      local E = events.define(unique(), { "order" })
      local ev = E{ order = { lines = { { sku = "a", qty = 1 } }, tags = json.array{} } }
      local lines = ev.order.lines
      assert.are.equal(lines, ev.order.lines)           -- one copy per holder, kept
      lines[1].qty = 50
      lines[2] = { sku = "b" }
      assert.are.equal(50, ev.order.lines[1].qty)        -- the holder sees its own change
      assert.are.same({ { sku = "a", qty = 1 } }, events.fields(ev).order.lines)
      local back = events.decode(events.encode(ev))
      assert.are.same({ { sku = "a", qty = 1 } }, back.order.lines)
      assert.are.equal("[]", json.encode(back.order.tags))
    end)

    it("rejects bad definitions with the reason", function()
      assert.has_error(function() events.define("bad name", {}) end)
      assert.has_error(function() events.define(unique(), { "a", "a" }) end)
      assert.has_error(function() events.define(unique(), { "a", typo = true }) end)
    end)

    it("refuses a second definition of a name from another file", function()
      local name = unique()
      events.define(name, { "a" })
      local chunk = assert(loadstring("return require('fibril.events').define(...)", "=other.lua"))
      local ok, err = pcall(chunk, name, { "a" })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("already defined", 1, true))
    end)

    it("round-trips through JSON with the same name, id and fields", function()
      local E = events.define(unique(), { "n", "s", "nested", "flag" })
      local ev = E{ n = 2 ^ 40 + 1, s = "caf\xc3\xa9 \"q\"\n", nested = { list = { 1, 2, 3 }, k = { x = false } },
                    flag = true }
      local back = events.decode(events.encode(ev))
      assert.are.equal(events.id(ev), events.id(back))
      assert.are.equal(events.name(ev), events.name(back))
      assert.are.same(events.fields(ev), events.fields(back))
      assert.are.equal(2 ^ 40 + 1, back.n)
      assert.are.equal(ev.s, back.s)
      assert.are.same(json.decode(events.encode(ev)).fields, events.fields(ev))
    end)
  end)

  describe("publish", function()
    it("runs inline subscribers in subscription order, each with a fresh instance", function()
      local E = events.define(unique(), { "id" })
      local seen = {}
      local A = Subscriber:extend("A")
      A:subscribe_to(E)
      function A:call(ev) seen[#seen + 1] = "A" .. ev.id; self.mark = true end
      local B = Subscriber:extend("B")
      B:subscribe_to(E)
      function B:call(ev) seen[#seen + 1] = "B" .. ev.id .. tostring(self.mark) end
      assert.are.equal(2, events.publish(E{ id = 7 }))
      assert.are.same({ "A7", "B7nil" }, seen)
    end)

    it("gives each subscriber and filter nested tables of its own: one's changes never reach the next", function()
      local E = events.define(unique(), { "id", "items" })
      local seen = {}
      local F = Subscriber:extend("Filter")
      F:subscribe_to(E, { ["if"] = function(ev) ev.items[1] = "filter"; return true end })
      function F.call(_, ev) seen[#seen + 1] = ev.items[1]; ev.items[1] = "F"; ev.items[3] = "x" end
      local G = Subscriber:extend("G")
      G:subscribe_to(E)
      function G.call(_, ev) seen[#seen + 1] = ev.items[1] .. #ev.items .. ev.id; table.remove(ev.items) end
      local ev = E{ id = 3, items = { "a", "b" } }
      assert.are.equal(2, events.publish(ev))
      assert.are.same({ "a", "a23" }, seen)
      assert.are.same({ "a", "b" }, ev.items)
      assert.are.equal(2, events.publish(ev))            -- the same event again: same payload
      assert.are.same({ "a", "a23", "a", "a23" }, seen)
    end)

    it("passes a flat event itself to its subscribers", function()
      local E = events.define(unique(), { "id" })
      local got
      local S = Subscriber:extend("Same")
      S:subscribe_to(E)
      function S.call(_, ev) got = ev end
      local ev = E{ id = 1 }
      events.publish(ev)
      assert.are.equal(ev, got)
    end)

    it("logs a failing subscriber with the event and goes on with the others", function()
      local lines = capture_log()
      local E = events.define(unique(), { "id" })
      local Bad = Subscriber:extend("Bad")
      Bad:subscribe_to(E)
      function Bad.call() error("kaput") end
      local ran = false
      local Good = Subscriber:extend("Good")
      Good:subscribe_to(E)
      function Good.call() ran = true end
      local ev = E{ id = 1 }
      assert.has_no_error(function() events.publish(ev) end)
      assert.is_true(ran)
      local line = lines[1]
      assert.truthy(line:find('msg="subscriber failed"', 1, true), line)
      assert.truthy(line:find("subscriber=Bad", 1, true), line)
      assert.truthy(line:find("event=" .. E.name, 1, true), line)
      assert.truthy(line:find("event_id=" .. events.id(ev), 1, true), line)
      assert.truthy(line:find("kaput", 1, true), line)
    end)

    it("re-raises the first inline error with raise = true", function()
      capture_log()
      local E = events.define(unique(), { "id" })
      local Bad = Subscriber:extend("Bad")
      Bad:subscribe_to(E)
      function Bad.call() error("kaput") end
      local ok, err = pcall(events.publish, E{ id = 1 }, { raise = true })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("kaput", 1, true))
    end)

    it("runs each inline subscriber as a unit of its own, with the publisher's tags", function()
      local E = events.define(unique(), { "id" })
      local runs, completes, seen = 0, 0, {}
      local r = executor.to_run(function() runs = runs + 1 end)
      local c = executor.to_complete(function() completes = completes + 1 end)
      local S = Subscriber:extend("Unit")
      S:subscribe_to(E)
      function S.call() executor.locals().mine = true; seen[#seen + 1] = log.tags() end
      executor.wrap(function()
        log.tag("req", "r-1")
        executor.locals().outer = true
        events.publish(E{ id = 1 })
        assert.is_true(executor.locals().outer)          -- the publisher's unit is back
        assert.is_nil(executor.locals().mine)
      end)
      executor.remove(r)
      executor.remove(c)
      assert.are.equal(2, runs)                          -- the publisher's unit, the subscriber's
      assert.are.equal(2, completes)
      assert.are.equal("r-1", seen[1].req)
      assert.are.equal("Unit", seen[1].subscriber)
    end)

    it("skips a subscriber whose if filter says no", function()
      local E = events.define(unique(), { "total" })
      local got = {}
      local S = Subscriber:extend("Big")
      S:subscribe_to(E, { ["if"] = function(ev) return ev.total > 100 end })
      function S.call(_, ev) got[#got + 1] = ev.total end
      assert.are.equal(0, events.publish(E{ total = 5 }))
      assert.are.equal(1, events.publish(E{ total = 500 }))
      assert.are.same({ 500 }, got)
    end)

    it("delivers to \"*\" and to name prefixes", function()
      local A = events.define("Billing.Paid", { "id" })
      local B = events.define("Billing.Refund.Issued", { "id" })
      local C = events.define("Shipping.Sent", { "id" })
      local all, billing = {}, {}
      local All = Subscriber:extend("All")
      All:subscribe_to("*")
      function All.call(_, ev) all[#all + 1] = events.name(ev) end
      local Bill = Subscriber:extend("Bill")
      Bill:subscribe_to("Billing.*")
      function Bill.call(_, ev) billing[#billing + 1] = events.name(ev) end
      events.publish(A{ id = 1 })
      events.publish(B{ id = 2 })
      events.publish(C{ id = 3 })
      assert.are.same({ "Billing.Paid", "Billing.Refund.Issued", "Shipping.Sent" }, all)
      assert.are.same({ "Billing.Paid", "Billing.Refund.Issued" }, billing)
    end)

    it("rejects what is not an event, and bad subscription options", function()
      assert.has_error(function() events.publish({ id = 1 }) end)
      local E = events.define(unique(), { "id" })
      local S = Subscriber:extend("Opts")
      assert.has_error(function() S:subscribe_to(E, { deferrd = true }) end, "subscribe_to: unknown option 'deferrd'")
      assert.has_error(function() S:subscribe_to(E, { retries = 3 }) end)
      assert.has_error(function() S:subscribe_to(E, { deferred = true, retries = -1 }) end)
      assert.has_error(function() S:subscribe_to(42) end)
    end)

    it("says how to start deferred tasks when none run in this process", function()
      local E = events.define(unique(), { "id" })
      local S = Subscriber:extend("Later")
      S:subscribe_to(E, { deferred = true })
      function S.call() end
      local ok, err = pcall(events.publish, E{ id = 1 })
      assert.is_false(ok)
      assert.truthy(tostring(err):find("deferred tasks are not running in this process", 1, true), err)
    end)

    it("runs deferred subscribers after publish returns, with the event's id and the task id", function()
      local dir = support.tmpdir() .. "/events-deferred-" .. math.random(1e9)
      deferred.start{ dir = dir, concurrency = 2 }
      local E = events.define(unique(), { "id" })
      local got = {}
      local S = Subscriber:extend("LaterOk")
      S:subscribe_to(E, { deferred = true })
      function S:call(ev)
        got[#got + 1] = { id = ev.id, event_id = events.id(ev), task = self.task_id, tags = log.tags() }
      end
      local ev
      executor.wrap(function()
        log.tag("req", "req-42")
        ev = E{ id = 3 }
        events.publish(ev)
        assert.are.equal(0, #got)               -- not in the publisher's flow
      end)
      eventually(function() return #got == 1 end, 5, "the deferred subscriber")
      deferred.stop(5)
      assert.are.equal(3, got[1].id)
      assert.are.equal(events.id(ev), got[1].event_id)
      assert.are.equal(events.id(ev) .. "/LaterOk", got[1].task)
      assert.are.equal("req-42", got[1].tags.req)   -- the request's context travelled
      assert.are.equal(got[1].task, got[1].tags.task)
    end)
  end)

  describe("code reload", function()
    it("re-reads subscribers/: the new code is what the next publish reaches", function()
      local App = require "fibril.app"
      local reloader = require "fibril.reloader"
      local name = "reload-subs-" .. math.random(1e9)
      local dir = support.tmpdir() .. "/" .. name
      support.write(name .. "/routes.lua", "return function(r) end")
      support.write(name .. "/events/pinged.lua",
                    'return require("fibril.events").define("Reload.Pinged", { "n" })')
      local function subscriber(version)
        support.write(name .. "/subscribers/pong.lua", ([[
          local S = require("fibril.subscriber"):extend("Pong")
          S:subscribe_to(require "events.pinged")
          function S.call(_, ev) _G.PONGS[#_G.PONGS + 1] = %q .. ev.n end
          return S]]):format(version))
      end
      subscriber("v1")
      rawset(_G, "PONGS", {})
      local app = App.load(dir, "test")
      local Pinged = require "events.pinged"
      events.publish(Pinged{ n = 1 })
      subscriber("v2")
      log.output(function() end)
      assert.is_true(reloader.reload(app))
      events.publish(require("events.pinged"){ n = 2 })
      assert.are.same({ "v11", "v22" }, rawget(_G, "PONGS"))
      -- A subscriber file that no longer loads keeps the old subscriptions.
      support.write(name .. "/subscribers/pong.lua", "return 42")
      assert.is_false(reloader.reload(app))
      events.publish(require("events.pinged"){ n = 3 })
      assert.are.same({ "v11", "v22", "v23" }, rawget(_G, "PONGS"))
      rawset(_G, "PONGS", nil)
      reloader.unload_app_modules(dir)
    end)
  end)

  describe("fibril events APP", function()
    it("prints every event class with its subscribers, deferred ones marked", function()
      local status, out, err = support.run("events spec/fixtures/orders")
      assert.are.equal(0, status, err)
      assert.are.equal(table.concat({
        "Orders.Placed",
        "├── Audit [inline, via *]",
        "├── Flaky [deferred, retries 3, via Orders.*]",
        "├── RecordSale [deferred, if]",
        "└── SendReceipt [inline]",
        "Orders.Shipped",
        "├── Audit [inline, via *]",
        "└── Flaky [deferred, retries 3, via Orders.*]",
        "Users.SignedUp",
        "└── Audit [inline, via *]",
        "" }, "\n"), out)
    end)

    it("fails with the file and reason when a subscriber file does not load", function()
      local dir = support.tmpdir() .. "/broken-subs"
      support.write("broken-subs/routes.lua", "return function(r) end")
      support.write("broken-subs/subscribers/x.lua", "return 42")
      local status, _, err = support.run("events '" .. dir .. "'")
      assert.are.equal(1, status)
      assert.truthy(err:find("subscribers/x.lua: must return a subscriber", 1, true), err)
    end)
  end)
end)
