-- spec/redis_subscribe_spec.lua: redis:subscribe / psubscribe against real redis-server
-- processes: one dedicated connection per pool carries every subscription; handlers run as
-- units of work; a restarted server gets every subscription again.
local fibril = require "fibril"
local redis = require "fibril.redis"
local executor = require "fibril.executor"
local support = require "spec.support"

local url

local function live()
  local conns, requests = redis.live()
  return conns .. "/" .. requests
end

-- Waits until cond() or 5 s.
local eventually = support.eventually

local function pubsub_clients(conn)
  local list = conn:call("CLIENT", "LIST", "TYPE", "pubsub")
  return select(2, list:gsub("\n", "\n"))
end

describe("fibril.redis subscriptions", function()
  local baseline, publisher
  setup(function()
    url = os.getenv("REDIS_URL") or support.redis_server().url
    publisher = redis.connect(url)
    baseline = support.settled(live, "2/0")   -- the publisher; other specs' conns collected
  end)

  teardown(function()
    publisher:close()
    support.stop_redis_servers()
  end)

  it("calls fn(message, channel) for each message, each call a unit of work", function()
    local pool = redis.pool(url)
    local got, units, locals = {}, 0, {}
    local sub = pool:subscribe("sub:a", function(message, channel)
      got[#got + 1] = channel .. "=" .. message
      if executor.active() then units = units + 1 end
      locals[executor.locals()] = true
    end)
    assert.are.equal(1, publisher:publish("sub:a", "one"))
    publisher:publish("sub:a", "two\0with a NUL")
    publisher:publish("sub:other", "not for us")
    assert.is_true(eventually(function() return #got == 2 end))
    assert.are.same({ "sub:a=one", "sub:a=two\0with a NUL" }, got)
    assert.are.equal(2, units)
    local n = 0
    for _ in pairs(locals) do n = n + 1 end
    assert.are.equal(2, n)                        -- fresh unit state for each message
    sub:unsubscribe()
    pool:close()
  end)

  it("matches patterns with psubscribe", function()
    local pool = redis.pool(url)
    local got = {}
    local sub = pool:psubscribe("news.*", function(message, channel, pattern)
      got[#got + 1] = table.concat({ pattern, channel, message }, " ")
    end)
    publisher:publish("news.tech", "a")
    publisher:publish("sports.x", "b")
    publisher:publish("news.art", "c")
    assert.is_true(eventually(function() return #got == 2 end))
    assert.are.same({ "news.* news.tech a", "news.* news.art c" }, got)
    sub:unsubscribe()
    pool:close()
  end)

  it("carries many channels on one connection, and closes it after the last unsubscribe",
     function()
    local pool = redis.pool(url)
    local before = pubsub_clients(publisher)
    local subs, got = {}, 0
    for i = 1, 50 do
      subs[i] = pool:subscribe("many:" .. i, function() got = got + 1 end)
    end
    -- Two handlers on one channel: both called, one server subscription.
    subs[51] = pool:subscribe("many:1", function() got = got + 1 end)
    assert.are.equal(before + 1, pubsub_clients(publisher))
    for i = 1, 50 do publisher:publish("many:" .. i, "x") end
    assert.is_true(eventually(function() return got == 51 end))
    subs[1]:unsubscribe()
    publisher:publish("many:1", "y")
    assert.is_true(eventually(function() return got == 52 end))
    for i = 2, 51 do subs[i]:unsubscribe() end
    assert.are.equal(0, publisher:publish("many:1", "z"))
    assert.is_true(eventually(function() return pubsub_clients(publisher) == before end))
    pool:close()
    assert.are.equal(baseline, support.settled(live, baseline))
  end)

  it("logs a failing handler and keeps delivering", function()
    local pool = redis.pool(url)
    local got = {}
    local bad = pool:subscribe("sub:err", function() error("handler broke") end)
    local good = pool:subscribe("sub:err", function(m) got[#got + 1] = m end)
    publisher:publish("sub:err", "1")
    publisher:publish("sub:err", "2")
    assert.is_true(eventually(function() return #got == 2 end))
    bad:unsubscribe()
    good:unsubscribe()
    pool:close()
  end)

  it("subscribes again after the server restarts", function()
    local s = support.redis_server("--requirepass pw")
    local u = "redis://:pw@127.0.0.1:" .. s.port
    local pool = redis.pool(u, { connect_timeout = 1 })
    local got = {}
    local sub = pool:subscribe("sub:restart", function(m) got[#got + 1] = m end)
    local pub = redis.connect(u)
    pub:publish("sub:restart", "before")
    assert.is_true(eventually(function() return #got == 1 end))
    pub:close()
    s:stop()
    fibril.sleep(0.2)
    s:start()
    pub = redis.connect(u)
    assert.is_true(eventually(function()
      return pub:call("PUBSUB", "NUMSUB", "sub:restart")[2] == 1
    end))
    pub:publish("sub:restart", "after")
    assert.is_true(eventually(function() return #got == 2 end))
    assert.are.same({ "before", "after" }, got)
    sub:unsubscribe()
    pub:close()
    pool:close()
  end)

  it("refuses ordinary commands on a subscribed connection", function()
    local c = redis.connect(url)
    c:send_subscription("subscribe", "sub:raw")
    local kind, name, count = c:next_message(2)
    assert.are.same({ "subscribe", "sub:raw", 1 }, { kind, name, count })
    assert.has_error(function() c:get("x") end,
                     "redis: this connection is subscribed: it carries subscriptions only")
    assert.is_nil(c:next_message(0.05))            -- nothing within the timeout
    c:close()
  end)

  it("raises clear errors for bad arguments", function()
    local pool = redis.pool(url)
    assert.has_error(function() pool:subscribe("", function() end) end,
                     "redis: subscribe expects a non-empty channel name")
    assert.has_error(function() pool:subscribe("x") end,
                     "redis: subscribe expects a handler function")
    pool:close()
  end)

  it("leaves nothing behind", function()
    assert.are.equal(baseline, support.settled(live, baseline))
  end)
end)
