-- spec/pubsub_spec.lua: fibril.pubsub with the local adapter, and with the redis adapter
-- against real redis-server processes, across processes and across a server restart.
local fibril = require "fibril"
local pubsub = require "fibril.pubsub"
local redis = require "fibril.redis"
local executor = require "fibril.executor"
local support = require "spec.support"

local eventually = support.eventually

describe("fibril.pubsub", function()
  teardown(function()
    pubsub.use(nil)
    support.stop_redis_servers()
  end)

  it("names channels canonically and refuses bad channels and messages", function()
    assert.are.equal("timeline:7", pubsub.channel({ "timeline", 7 }))
    assert.are.equal("plain", pubsub.channel("plain"))
    pubsub.use{ adapter = "local" }
    assert.has_error(function() pubsub.publish("", "x") end, "pubsub: a channel name cannot be empty")
    assert.has_error(function() pubsub.publish({}, "x") end,
                     "pubsub: a channel is a string or a non-empty list, got table")
    assert.has_error(function() pubsub.publish("c", { a = 1 }) end,
                     "pubsub: a message is a string, got table (encode tables with fibril.json)")
    assert.has_error(function() pubsub.use{ adapter = "carrier-pigeon" } end,
                     "pubsub: unknown adapter 'carrier-pigeon' (local or redis)")
  end)

  describe("local adapter", function()
    before_each(function() pubsub.use{ adapter = "local" } end)

    it("delivers in publish order, outside the publisher, each call a unit of work", function()
      local got, publisher_fiber, other_fiber, units = {}, fibril.current(), 0, 0
      local sub = pubsub.subscribe({ "room", 1 }, function(message, channel)
        got[#got + 1] = channel .. "=" .. message
        if fibril.current() ~= publisher_fiber then other_fiber = other_fiber + 1 end
        if executor.active() then units = units + 1 end
      end)
      for i = 1, 100 do pubsub.publish("room:1", tostring(i)) end
      assert.are.equal(0, #got)                   -- publish only queued them
      assert.is_true(eventually(function() return #got == 100 end))
      for i = 1, 100 do assert.are.equal("room:1=" .. i, got[i]) end
      assert.are.equal(100, other_fiber)
      assert.are.equal(100, units)
      sub:unsubscribe()
      pubsub.publish("room:1", "after")
      fibril.sleep(0.01)
      assert.are.equal(100, #got)
    end)

    it("keeps delivering to the others when a handler raises", function()
      local got = {}
      local bad = pubsub.subscribe("c", function() error("nope") end)
      local good = pubsub.subscribe("c", function(m) got[#got + 1] = m end)
      assert.has_no.errors(function() pubsub.publish("c", "1") end)
      assert.is_true(eventually(function() return #got == 1 end))
      bad:unsubscribe()
      good:unsubscribe()
    end)
  end)

  describe("the workers' relay", function()
    local relay = require "fibril.pubsub.relay"

    it("refuses a connection without the master's token, and relays for links that have it", function()
      local lines = {}
      require("fibril.log").output(function(line) lines[#lines + 1] = line end)
      local server, port, token = relay.serve_master()
      assert.matches("^%x+$", token)
      assert.are.equal(64, #token)
      assert.are_not.equal(token, select(3, relay.serve_master()))   -- one per master
      local got2, got3 = {}, {}
      local w2 = relay.link(port, 2, function(ch, _, m) got2[#got2 + 1] = ch .. "=" .. m end, token)
      local w3 = relay.link(port, 3, function(ch, _, m) got3[#got3 + 1] = ch .. "=" .. m end, token)
      assert.is_true(w2:wait_ready(5))
      assert.is_true(w3:wait_ready(5))
      -- A local process that found the port: no token, then a wrong one of the right length.
      local body = relay.encode("room", "x-1", "forged")
      local forged = "POST /publish?worker=9 HTTP/1.1\r\nHost: relay\r\nContent-Length: " .. #body
                     .. "\r\n%s\r\n" .. body
      local res = support.raw(port, forged:format(""))
      assert.are.equal(403, res.status)
      assert.are.equal("close", res.headers["connection"])
      res = support.raw(port, forged:format("X-Relay-Token: " .. ("0"):rep(64) .. "\r\n"))
      assert.are.equal(403, res.status)
      res = support.raw(port, forged:format("X-Relay-Token: " .. token:sub(1, 63) .. "\r\n"))
      assert.are.equal(403, res.status)                      -- a prefix of the right one
      res = support.raw(port, forged:format("X-Relay-Token: " .. token .. "0\r\n"))
      assert.are.equal(403, res.status)                      -- the right one and more
      res = support.raw(port, "GET /relay?worker=9 HTTP/1.1\r\nHost: relay\r\n\r\n")
      assert.are.equal(403, res.status)                      -- nor read what workers publish
      -- Refused on the head: a body declared at the limit is never waited for.
      local t0 = fibril.now()
      res = support.raw(port, "POST /publish?worker=9 HTTP/1.1\r\nHost: relay\r\nContent-Length: "
                              .. relay.MAX_MESSAGE .. "\r\n\r\n")
      assert.are.equal(403, res.status)
      assert.is_true(fibril.now() - t0 < 5, "answered without waiting for the body")
      w2:send("room", "2-1", "hello")
      assert.is_true(eventually(function() return #got3 == 1 end))
      fibril.sleep(0.05)
      assert.are.same({ "room=hello" }, got3)                 -- the forged ones never arrived
      assert.are.same({}, got2)                               -- nor its own message
      assert.are.equal(6, server:refused())
      for _, l in ipairs(lines) do
        assert.is_nil(l:find(token, 1, true))                 -- never logged
      end
      require("fibril.log").output(nil)
      w2:close(); w3:close(); server:close()
      assert.has_error(function() relay.link(port, 4, function() end, "not hex!") end)
    end)

  end)

  describe("redis adapter", function()
    local url
    setup(function() url = os.getenv("REDIS_URL") or support.redis_server().url end)

    it("delivers to subscribers of the channel only, in order", function()
      pubsub.use{ adapter = "redis", url = url, stream = "spec:pubsub:1" }
      local got = {}
      local sub = pubsub.subscribe({ "timeline", 7 }, function(m, c) got[#got + 1] = c .. "=" .. m end)
      for i = 1, 20 do pubsub.publish("timeline:7", "m" .. i) end
      pubsub.publish("timeline:8", "not ours")
      pubsub.publish("timeline:7", "bin\0ary")
      assert.is_true(eventually(function() return #got == 21 end))
      for i = 1, 20 do assert.are.equal("timeline:7=m" .. i, got[i]) end
      assert.are.equal("timeline:7=bin\0ary", got[21])
      sub:unsubscribe()
    end)

    it("reaches subscribers in another process", function()
      pubsub.use{ adapter = "redis", url = url, stream = "spec:pubsub:2" }
      local got = {}
      local sub = pubsub.subscribe("cross", function(m) got[#got + 1] = m end)
      local status, out, err = support.run_script(([[
        local pubsub = require "fibril.pubsub"
        pubsub.use{ adapter = "redis", url = %q, stream = "spec:pubsub:2" }
        for i = 1, 10 do pubsub.publish("cross", "from child " .. i) end
        pubsub.use(nil)
        print("published")
      ]]):format(url))
      assert.are.equal(0, status, err)
      assert.matches("published", out)
      assert.is_true(eventually(function() return #got == 10 end))
      assert.are.equal("from child 10", got[10])
      sub:unsubscribe()
    end)

    it("loses nothing across a server restart: the reader resumes from its last id", function()
      local s = support.redis_server()
      pubsub.use{ adapter = "redis", url = s.url, stream = "spec:pubsub:3", connect_timeout = 1,
                  timeout = 1 }
      local got, seen = {}, {}
      local sub = pubsub.subscribe("feed", function(m)
        got[#got + 1] = m
        seen[m] = (seen[m] or 0) + 1
      end)
      for i = 1, 50 do pubsub.publish("feed", tostring(i)) end
      assert.is_true(eventually(function() return #got == 50 end))
      s:stop()
      fibril.sleep(1)                             -- the reader fails and retries meanwhile
      s:start()
      -- Another process publishes once the server is back: the reader, still reconnecting or
      -- back in XREAD from the id it saw last, gets every one of them.
      local status, _, err = support.run_script(([[
        local pubsub = require "fibril.pubsub"
        pubsub.use{ adapter = "redis", url = %q, stream = "spec:pubsub:3" }
        for i = 51, 100 do pubsub.publish("feed", tostring(i)) end
        pubsub.use(nil)
      ]]):format(s.url))
      assert.are.equal(0, status, err)
      assert.is_true(eventually(function() return #got == 100 end, 10), "got " .. #got)
      for i = 1, 100 do
        assert.are.equal(tostring(i), got[i])
        assert.are.equal(1, seen[tostring(i)])
      end
      sub:unsubscribe()
    end)

    it("trims the stream to the retention window", function()
      pubsub.use{ adapter = "redis", url = url, stream = "spec:pubsub:4", retention = 0.2 }
      local conn = redis.connect(url)
      conn:del("spec:pubsub:4")
      for i = 1, 300 do pubsub.publish("t", tostring(i)) end
      fibril.sleep(0.3)
      pubsub.publish("t", "last")
      assert.is_true(conn:xlen("spec:pubsub:4") < 300)
      conn:close()
    end)
  end)
end)
