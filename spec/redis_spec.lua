-- spec/redis_spec.lua: fibril.redis against real redis-server processes on loopback. The main
-- tests use REDIS_URL when scripts/test-services exports it; the spec always starts its own
-- servers too, for what needs DEBUG, a password, a unix socket or a server to kill.
local fibril = require "fibril"
local redis = require "fibril.redis"

local support = require "spec.support"

local function start_server(extra) return support.redis_server(extra) end
local function stop_server(s) s:stop() end
local dir = support.tmpdir()

local function live()
  local conns, requests = redis.live()
  return conns + requests
end

-- Close callbacks run on the next loop turn; give them a few.
local function settle() fibril.sleep(0.02) end

local own, url, own_url, baseline

local function connect(opts) return redis.connect(url, opts) end

describe("fibril.redis", function()
  setup(function()
    math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
    own = start_server()
    own_url = "redis://127.0.0.1:" .. own.port
    url = os.getenv("REDIS_URL") or own_url
    settle()
    baseline = live()
  end)

  teardown(function() support.stop_redis_servers() end)

  it("sets and gets a value", function()
    local conn = connect()
    assert.are.equal("OK", conn:call("SET", "spec:k", "hello"))
    assert.are.equal("hello", conn:call("GET", "spec:k"))
    conn:close()
  end)

  it("keeps values and keys with NUL and every other byte intact", function()
    local conn = connect()
    local bytes = {}
    for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
    local value = table.concat(bytes) .. "\0\r\n$3\r\n\0"
    conn:set("spec:bin\0key", value)
    assert.are.equal(value, conn:get("spec:bin\0key"))
    assert.are.equal(#value, conn:strlen("spec:bin\0key"))
    assert.is_nil(conn:get("spec:bin"))        -- the key is not cut at the NUL
    conn:close()
  end)

  it("converts integer, nil, status, nested array and big integer replies", function()
    local conn = connect()
    conn:del("spec:n", "spec:missing")
    assert.are.equal(5, conn:incrby("spec:n", 5))
    assert.is_nil(conn:get("spec:missing"))
    assert.are.equal("PONG", conn:ping())
    conn:set("spec:a", "1")
    local r = conn:mget("spec:a", "spec:missing", "spec:a")
    assert.are.equal(3, #r)
    assert.are.same({ "1", redis.null, "1" }, r)
    local nested = conn:call("EVAL", "return {1, {2, {'x', false}}, 'y'}", 0)
    assert.are.same({ 1, { 2, { "x", redis.null } }, "y" }, nested)
    conn:set("spec:big", "9007199254740993")
    assert.are.equal("9007199254740994", conn:incr("spec:big"))   -- past 2^53: a string
    assert.are.equal(9007199254740992, conn:decrby("spec:big", 2))
    assert.are.equal(-1, conn:ttl("spec:a"))
    conn:close()
  end)

  it("raises an error reply with the server's message and code redis_error", function()
    local conn = connect()
    conn:del("spec:list")
    conn:rpush("spec:list", "x")
    local ok, err = pcall(conn.incr, conn, "spec:list")
    assert.is_false(ok)
    assert.are.equal("redis_error", err.code)
    assert.matches("^redis: WRONGTYPE", err.message)
    local ok2, err2 = pcall(conn.call, conn, "NOSUCHCOMMAND")
    assert.is_false(ok2)
    assert.matches("^redis: ERR unknown command", err2.message)
    assert.are.equal("1", conn:lindex("spec:list", 0) == "x" and "1")   -- still usable
    conn:close()
  end)

  it("sends a pipeline of 100 commands and returns 100 replies in order, errors in their slot",
     function()
    local conn = connect()
    conn:del("spec:p", "spec:plist")
    conn:rpush("spec:plist", "x")
    local replies = conn:pipeline(function(p)
      for i = 1, 99 do
        if i == 50 then p:incr("spec:plist") else p:call("INCR", "spec:p") end
      end
      p:get("spec:nothing-here")
    end)
    assert.are.equal(100, #replies)
    for i = 1, 49 do assert.are.equal(i, replies[i]) end
    assert.is_true(redis.is_error(replies[50]))
    assert.are.equal("redis_error", replies[50].code)
    assert.matches("WRONGTYPE", replies[50].message)
    assert.are.equal(50, replies[51])
    assert.are.equal(98, replies[99])
    assert.are.equal(redis.null, replies[100])
    assert.are.same({}, conn:pipeline(function() end))
    conn:close()
  end)

  it("generates a method for any command name on first use", function()
    local conn = connect()
    conn:del("spec:h", "spec:l")
    assert.are.equal(1, conn:hset("spec:h", "f", "v"))
    assert.are.equal("v", conn:hget("spec:h", "f"))
    assert.are.equal(2, conn:lpush("spec:l", "b", "a"))
    assert.are.equal(3, conn:rpush("spec:l", "c"))
    assert.are.same({ "a", "b", "c" }, conn:lrange("spec:l", 0, -1))
    assert.are.equal(1, conn:expire("spec:l", 100))
    assert.are.equal(2, conn:del("spec:h", "spec:l"))
    local ok, err = pcall(conn.set, conn, "spec:x", {})
    assert.is_false(ok)
    assert.matches("argument 2 must be a string or a number", err)
    assert.has_error(function() conn:subscribe("chan") end)
    conn:close()
  end)

  it("matches replies to 200 fibers sharing one connection", function()
    local conn = connect()
    conn:del("spec:ctr")
    local fibers = {}
    for i = 1, 200 do fibers[i] = fibril.schedule(function() return conn:incr("spec:ctr") end) end
    local got, seen = fibril.await_all(fibers), {}
    for i = 1, 200 do
      assert.is_nil(seen[got[i]])
      seen[got[i]] = true
    end
    for v = 1, 200 do assert.is_true(seen[v]) end
    conn:close()
  end)

  it("times out a command, then closes the connection and fails the other waiters", function()
    local conn = redis.connect(own_url, { timeout = 0.1 })
    local other = fibril.schedule(function() return pcall(conn.ping, conn) end)
    local t0 = fibril.now()
    local ok, err = pcall(conn.call, conn, "DEBUG", "SLEEP", "0.5")
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    assert.matches("redis: DEBUG timed out after 0.1 s %(127.0.0.1:%d+%)", err.message)
    assert.is_true(fibril.now() - t0 < 0.4)
    assert.is_true(conn:is_closed())
    local ok2, err2 = fibril.await(other)
    assert.is_false(ok2)
    assert.are.equal("closed", err2.code)
    local ok3, err3 = pcall(conn.get, conn, "spec:k")
    assert.is_false(ok3)
    assert.matches("redis: connection closed: a command on it timed out", err3.message)
    conn:close()
    conn:close()                              -- idempotent
  end)

  it("detaches and closes the connection when a fiber waiting in call is cancelled", function()
    local conn = redis.connect(own_url)
    local f = fibril.schedule(function() return conn:call("DEBUG", "SLEEP", "0.3") end)
    fibril.sleep(0.05)
    fibril.cancel(f)
    local ok, err = pcall(fibril.await, f)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.code)
    assert.is_true(conn:is_closed())
    conn:close()
  end)

  it("raises an error naming the address when nothing listens", function()
    local port
    repeat port = math.random(20000, 50000) until not support.redis_answers(port)
    local ok, err = pcall(redis.connect, "redis://127.0.0.1:" .. port)
    assert.is_false(ok)
    assert.are.equal("ECONNREFUSED", err.code)
    assert.are.equal("redis: connection refused (127.0.0.1:" .. port .. ")", err.message)
    local ok2, err2 = pcall(redis.connect, "unix://" .. dir .. "/none.sock")
    assert.is_false(ok2)
    assert.matches("redis: no such file or directory %(.*none.sock%)", err2.message)
    local ok3, err3 = pcall(redis.connect, "http://x")
    assert.is_false(ok3)
    assert.matches("redis:// or unix://", err3)
  end)

  it("times out a connect whose setup gets no answer, within connect_timeout", function()
    local busy = redis.connect(own_url, { timeout = false })
    local f = fibril.schedule(function() return busy:call("DEBUG", "SLEEP", "0.4") end)
    fibril.sleep(0.02)
    local t0 = fibril.now()
    local ok, err = pcall(redis.connect, own_url .. "/1", { connect_timeout = 0.1 })
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    assert.are.equal("redis: connect timed out after 0.1 s (127.0.0.1:" .. own.port .. ")", err.message)
    assert.is_true(fibril.now() - t0 < 0.3)
    assert.are.equal("OK", fibril.await(f))
    busy:close()
  end)

  it("authenticates with a password or an ACL user, and rejects a wrong one", function()
    local s = start_server("--requirepass secret")
    local base = "127.0.0.1:" .. s.port
    local conn = redis.connect("redis://:secret@" .. base)
    assert.are.equal("PONG", conn:ping())
    conn:call("ACL", "SETUSER", "alice", "on", ">pw", "~*", "+@all")
    conn:close()
    local alice = redis.connect("redis://alice:pw@" .. base)
    assert.are.equal("alice", alice:call("ACL", "WHOAMI"))
    alice:close()
    local ok, err = pcall(redis.connect, "redis://:wrong@" .. base)
    assert.is_false(ok)
    assert.are.equal("auth", err.code)
    assert.matches("redis: AUTH failed: WRONGPASS", err.message)
    assert.matches(base, err.message, 1, true)
    local anon = redis.connect("redis://" .. base)
    local ok2, err2 = pcall(anon.get, anon, "k")
    assert.is_false(ok2)
    assert.matches("NOAUTH", err2.message)
    anon:close()
  end)

  it("selects the database from the URL, and connects over a unix socket", function()
    local db1 = redis.connect(own_url .. "/1")
    local db0 = redis.connect(own_url .. "/0")
    db1:set("spec:db", "one")
    db0:del("spec:db")
    assert.is_nil(db0:get("spec:db"))
    assert.are.equal("one", db1:get("spec:db"))
    local unix = redis.connect("unix://" .. own.sock .. "?db=1")
    assert.are.equal("one", unix:get("spec:db"))
    assert.are.equal(own.sock, unix:where())
    local ok, err = pcall(redis.connect, own_url .. "/100000")
    assert.is_false(ok)
    assert.matches("SELECT failed", err.message)
    db1:close(); db0:close(); unix:close()
  end)

  it("bounds the elements of a reply and drops the connection past the bound", function()
    local conn = redis.connect(own_url, { max_elements = 10 })
    conn:del("spec:many")
    for i = 1, 20 do conn:rpush("spec:many", i) end
    assert.are.equal(10, #conn:lrange("spec:many", 0, 9))
    local ok, err = pcall(conn.lrange, conn, "spec:many", 0, -1)
    assert.is_false(ok)
    assert.are.equal("limit", err.code)
    assert.matches("20 elements exceeds max_elements %(10%)", err.message)
    assert.is_true(conn:is_closed())
    conn:close()
  end)

  it("fails a command in flight with 'connection lost' when the server dies", function()
    local s = start_server()
    local conn = redis.connect("redis://127.0.0.1:" .. s.port)
    local f = fibril.schedule(function() return pcall(conn.call, conn, "DEBUG", "SLEEP", "2") end)
    fibril.sleep(0.1)
    stop_server(s)
    local ok, err = fibril.await(f, { timeout = 1.5 })
    assert.is_false(ok)
    assert.are.equal("connection_lost", err.code)
    assert.matches("redis: connection lost %(127.0.0.1:" .. s.port, err.message)
    local ok2, err2 = pcall(conn.ping, conn)
    assert.is_false(ok2)
    assert.matches("connection lost", err2.message)
    conn:close()
  end)

  it("raises on a closed connection and frees everything it held", function()
    local conn = connect()
    conn:close()
    local ok, err = pcall(conn.get, conn, "k")
    assert.is_false(ok)
    assert.are.equal("closed", err.code)
    assert.matches("redis: connection is closed", err.message)
    settle()
    assert.are.equal(baseline, live())
  end)
end)
