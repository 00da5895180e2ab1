-- spec/redis_pool_spec.lua: the pool behind `require "fibril.redis"`, against real
-- redis-server processes: REDIS_URL's (scripts/with-services) and the spec's own ones, which
-- it kills and restarts.
local fibril = require "fibril"
local redis = require "fibril.redis"
local executor = require "fibril.executor"
local support = require "spec.support"

local url

local function live()
  local conns, requests = redis.live()
  return conns .. "/" .. requests
end

describe("fibril.redis pool", function()
  local baseline
  setup(function()
    math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
    url = os.getenv("REDIS_URL") or support.redis_server().url
    baseline = support.settled(live, "0/0")   -- other specs' connections collected first
  end)

  teardown(function()
    redis.reset()
    support.stop_redis_servers()
  end)

  it("is the module itself: redis:set and redis:get through the default pool", function()
    local old = os.getenv("REDIS_URL")
    assert.is_truthy(old or url)
    redis.reset()
    -- REDIS_URL names the default pool's server when no app config does.
    assert.are.equal("OK", redis:set("pool:k", "v1"))
    assert.are.equal("v1", redis:get("pool:k"))
    assert.are.equal("v1", redis:call("GET", "pool:k"))
    local r = redis:pipeline(function(p) p:incr("pool:n"); p:incr("pool:n") end)
    assert.are.equal(r[1] + 1, r[2])
    local ok, err = pcall(redis.get, redis, "x")
    assert.is_true(ok, tostring(err))             -- redis.get(redis, ...) is redis:get(...)
    ok, err = pcall(function() return redis.get("x") end)
    assert.is_false(ok)
    assert.matches("use redis:get", tostring(err))
    redis.reset()
  end)

  it("lets 1,000 fibers share a pool of 10, never two on one connection", function()
    local pool = redis.pool(url, { size = 10 })
    pool:del("pool:count")
    local in_use, overlaps, max_open = {}, 0, 0
    local fs = {}
    for i = 1, 1000 do
      fs[i] = fibril.schedule(function()
        if i % 10 == 0 then
          pool:with(function(c)
            local id = c:call("CLIENT", "ID")
            if in_use[id] then overlaps = overlaps + 1 end
            in_use[id] = true
            c:incr("pool:count")
            in_use[id] = nil
          end)
        else
          pool:incr("pool:count")
        end
        local s = pool:stats()
        if s.open > max_open then max_open = s.open end
      end)
    end
    fibril.await_all(fs)
    assert.are.equal("1000", pool:get("pool:count"))
    assert.are.equal(0, overlaps)
    assert.is_true(max_open <= 10, "open connections: " .. max_open)
    -- The server saw at most 10 connections of this pool (plus none left over after close).
    local s = pool:stats()
    assert.are.equal(s.open, s.idle)
    pool:close()
    assert.are.equal(baseline, support.settled(live, baseline))
  end)

  it("sends a pipeline of 10,000 commands in one round trip", function()
    local pool = redis.pool(url, { size = 2 })
    pool:del("pool:pipe")
    local replies = pool:pipeline(function(p)
      for _ = 1, 10000 do p:incr("pool:pipe") end
    end)
    assert.are.equal(10000, #replies)
    assert.are.equal(10000, replies[10000])
    pool:close()
  end)

  it("runs BLPOP on a connection of its own while others keep using a pool of 1", function()
    local pool = redis.pool(url, { size = 1, timeout = 0.5 })
    pool:del("pool:q")
    local popped
    local waiter = fibril.schedule(function() popped = pool:blpop("pool:q", 3) end)
    fibril.sleep(0.05)
    for i = 1, 50 do assert.are.equal("OK", pool:set("pool:other", i)) end
    assert.is_nil(popped)                         -- still blocked, not holding the pool
    pool:rpush("pool:q", "job")
    fibril.await(waiter)
    assert.are.same({ "pool:q", "job" }, popped)
    -- A blocking command's own time does not count against the command timeout (0.5 s).
    local t0 = fibril.now()
    assert.is_nil(pool:blpop("pool:empty", 0.8))
    assert.is_true(fibril.now() - t0 >= 0.75)
    assert.are.equal(1, pool:stats().blocking_open)
    pool:close()
  end)

  it("makes a fiber wait for a free connection, up to checkout_timeout", function()
    local pool = redis.pool(url, { size = 1, checkout_timeout = 0.1 })
    local holder = fibril.schedule(function()
      pool:with(function() fibril.sleep(0.4) end)
    end)
    fibril.sleep(0.02)
    local t0 = fibril.now()
    local ok, err = pcall(pool.get, pool, "pool:k")
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    assert.matches("no free connection to 127%.0%.0%.1:%d+ within 0%.1 s %(pool of 1 busy%)",
                   err.message)
    assert.is_true(fibril.now() - t0 < 0.35)
    fibril.await(holder)
    assert.is_truthy(pool:ping())                 -- the pool is fine afterwards
    pool:close()
  end)

  it("gives a checked-out connection back at the end of the unit, even when the code forgot",
     function()
    local pool = redis.pool(url, { size = 2 })
    local id
    assert.is_true((executor.call(function()
      local c = pool:checkout()
      id = c:call("CLIENT", "ID")
      c:set("pool:unit", "1")                     -- no release: the unit's end does it
    end)))
    local s = pool:stats()
    assert.are.equal(s.open, s.idle)
    -- A unit that raised: its connection is closed rather than reused (it may be in MULTI).
    local ok = executor.call(function()
      local c = pool:checkout()
      c:multi()
      c:incr("pool:never")
      error("boom")
    end)
    assert.is_false(ok)
    s = pool:stats()
    assert.are.equal(s.open, s.idle)
    assert.is_nil(pool:get("pool:never"))
    assert.is_number(id)
    pool:close()
  end)

  it("closes a with() connection left inside MULTI, so the next user gets a clean one", function()
    local pool = redis.pool(url, { size = 1 })
    pool:del("pool:tx")
    local ok, err = pcall(pool.with, pool, function(c)
      c:multi()
      c:incr("pool:tx")
      error("changed my mind")
    end)
    assert.is_false(ok)
    assert.matches("changed my mind", tostring(err))
    assert.is_nil(pool:get("pool:tx"))
    local r = pool:with(function(c)
      c:watch("pool:tx")
      c:multi()
      c:incr("pool:tx")
      return c:exec()
    end)
    assert.are.same({ 1 }, r)
    pool:close()
  end)

  it("fails fast with backoff while the server is unreachable, and recovers after", function()
    local s = support.redis_server()
    local pool = redis.pool(s.url, { size = 4, timeout = 1, connect_timeout = 1 })
    assert.are.equal("OK", pool:set("k", "1"))
    s:stop()
    local ok, err = pcall(pool.get, pool, "k")
    assert.is_false(ok)
    assert.matches("redis: ", err.message)        -- lost, then refused on reconnect
    ok, err = pcall(pool.get, pool, "k")
    assert.is_false(ok)
    assert.is_truthy(err.code == "unavailable" or err.code == "ECONNREFUSED", err.code)
    assert.truthy(err.message:find("127.0.0.1:" .. s.port, 1, true))
    s:start()
    local t0 = fibril.now()
    repeat
      ok = pcall(pool.set, pool, "k", "2")
      if not ok then fibril.sleep(0.05) end
    until ok or fibril.now() - t0 > 10
    assert.is_true(ok)
    assert.are.equal("2", pool:get("k"))
    pool:close()
  end)

  it("survives a server restart mid-load: in-flight commands fail clearly, later ones work",
     function()
    local s = support.redis_server("--requirepass sesame")
    local u = "redis://:sesame@127.0.0.1:" .. s.port .. "/3"
    local pool = redis.pool(u, { size = 5, timeout = 2, connect_timeout = 1 })
    local done, errors, messages = 0, 0, {}
    local stop = false
    local fs = {}
    for i = 1, 50 do
      fs[i] = fibril.schedule(function()
        while not stop do
          local ok, err = pcall(pool.incr, pool, "load")
          if ok then done = done + 1
          else
            errors = errors + 1
            messages[err.code] = err.message
            fibril.sleep(0.01)
          end
        end
      end)
    end
    fibril.sleep(0.2)
    s:stop()
    fibril.sleep(0.3)
    s:start()
    local before = done
    local t0 = fibril.now()
    while done < before + 500 and fibril.now() - t0 < 10 do fibril.sleep(0.05) end
    stop = true
    fibril.await_all(fs)
    assert.is_true(errors > 0)
    assert.is_true(done >= before + 500, "commands after the restart: " .. (done - before))
    for code, msg in pairs(messages) do
      assert.matches("^redis: ", msg, code)
      assert.truthy(msg:find("127.0.0.1:" .. s.port, 1, true), msg)
    end
    -- AUTH and SELECT were applied again on the new connections.
    local info = pool:call("CLIENT", "INFO")
    assert.matches(" db=3 ", info)
    pool:close()
  end)

  it("reports a wrong password as an AUTH error, and an unreachable host within the timeout",
     function()
    local s = support.redis_server("--requirepass right")
    local pool = redis.pool("redis://:wrong@127.0.0.1:" .. s.port, { size = 1 })
    local ok, err = pcall(pool.ping, pool)
    assert.is_false(ok)
    assert.are.equal("auth", err.code)
    assert.matches("AUTH failed", err.message)
    pool:close()
    -- 192.0.2.1 (TEST-NET-1) is never routed: the connect times out (or fails at once).
    local far = redis.pool("redis://192.0.2.1:6379", { size = 1, connect_timeout = 0.3 })
    local t0 = fibril.now()
    ok, err = pcall(far.ping, far)
    local took = fibril.now() - t0
    assert.is_false(ok)
    -- A sandbox without a route may refuse at once instead; either way a clear error, in time.
    assert.truthy(err.message:find("192.0.2.1:6379", 1, true), err.message)
    assert.is_true(took < 1.5, "took " .. took)
    far:close()
  end)

  it("checks its arguments where the pool is made", function()
    assert.has_error(function() redis.pool("http://x") end)
    assert.has_error(function() redis.pool(url, { size = 0 }) end,
                     "redis.pool: size must be a positive integer")
  end)

  it("leaves nothing behind", function()
    redis.reset()
    assert.are.equal(baseline, support.settled(live, baseline))
  end)
end)
