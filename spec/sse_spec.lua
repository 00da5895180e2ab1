-- spec/sse_spec.lua: fibril.sse: message framing, and streams served by a real app over real
-- sockets (channels, broadcast, Last-Event-ID replay, heartbeats, slow clients, cleanup,
-- shutdown), plus long polling with fibril.pubsub.next.
local fibril = require "fibril"
local sse = require "fibril.sse"
local pubsub = require "fibril.pubsub"
local support = require "spec.support"

-- A small app: GET /rooms/:id streams the room; POST /rooms/:id/say broadcasts the body;
-- GET /count says how many streams are open; GET /ticks is a handler-driven stream.
local function write_app(config)
  local dir = support.tmpdir() .. "/sse-app-" .. math.random(1e9)
  support.write(dir:sub(#support.tmpdir() + 2) .. "/config/app.lua", config or "return {}")
  support.write(dir:sub(#support.tmpdir() + 2) .. "/routes.lua", [[
return function(r)
  r:get("/rooms/:id", "rooms#stream")
  r:post("/rooms/:id/say", "rooms#say")
  r:get("/count", "rooms#count")
  r:get("/ticks", "rooms#ticks")
  r:get("/wait", "rooms#wait")
end]])
  support.write(dir:sub(#support.tmpdir() + 2) .. "/controllers/rooms.lua", [[
local Controller = require "fibril.controller"
local sse = require "fibril.sse"
local fibril = require "fibril"
local C = Controller:extend()
function C:stream() self:render{ sse = sse.stream({ "room", self.params.id }) } end
function C:say()
  sse.broadcast({ "room", self.params.id }, sse.message(self.request.body, { event = "say" }))
  self:render{ text = "ok" }
end
function C:count() self:render{ text = tostring(sse.count()) } end
function C:ticks()
  self:render{ sse = sse.stream(function(stream)
    for i = 1, 3 do
      stream:send({ tick = i }, { id = i })
      fibril.sleep(0.01)
    end
  end) }
end
function C:wait()
  self:render{ sse = sse.stream(function() fibril.cond():wait() end) }   -- waits for nothing
end
return C]])
  return dir
end

-- Opens a stream and reads its head and opening comment; returns the socket.
local function open_stream(port, path, extra)
  local sock = support.connect(port)
  sock:write("GET " .. path .. " HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
             .. (extra or "") .. "\r\n")
  local res = support.read_response(sock, true)
  assert.are.equal(200, res.status)
  assert.are.equal("text/event-stream", res.headers["content-type"])
  assert.are.equal("no-store", res.headers["cache-control"])
  return sock
end

-- Reads chunked body data until it holds n events (blank-line separated) or times out.
local function read_events(sock, n, timeout)
  local buf, events = "", {}
  local deadline = fibril.now() + (timeout or 5)
  while #events < n and fibril.now() < deadline do
    local size = sock:read_line({ timeout = deadline - fibril.now() })
    if not size then break end
    local len = tonumber(size, 16)
    if not len or len == 0 then break end
    buf = buf .. sock:read_bytes(len, { timeout = 5 })
    sock:read_line({ timeout = 5 })
    while true do
      local s, e = buf:find("\n\n", 1, true)
      if not s then break end
      events[#events + 1] = buf:sub(1, s - 1)
      buf = buf:sub(e + 1)
    end
  end
  return events
end

local function get(port, path) return support.curl(("http://127.0.0.1:%d%s"):format(port, path)) end
local function post(port, path, body)
  return support.curl(("-X POST --data-binary %q http://127.0.0.1:%d%s"):format(body, port, path))
end

local eventually = support.eventually

describe("fibril.sse", function()
  describe("sse.message", function()
    it("frames data lines, fields, and JSON tables", function()
      assert.are.equal("data: hello\n\n", tostring(sse.message("hello")))
      assert.are.equal("data: a\ndata: b\ndata: c\ndata: d\n\n", tostring(sse.message("a\nb\r\nc\rd")))
      assert.are.equal("id: 7\nevent: update\nretry: 3000\ndata: {\"x\":1}\n\n",
                       tostring(sse.message({ x = 1 }, { id = 7, event = "update", retry = 3000 })))
      assert.are.equal("data: \n\n", tostring(sse.message("")))
    end)

    it("refuses field injection", function()
      assert.has_error(function() sse.message("x", { event = "a\ndata: evil" }) end,
                       "sse.message: event must not contain CR, LF")
      assert.has_error(function() sse.message("x", { id = "1\r" }) end,
                       "sse.message: id must not contain CR, LF or NUL")
      assert.has_error(function() sse.message("x", { id = "1\0" }) end,
                       "sse.message: id must not contain CR, LF or NUL")
      assert.has_error(function() sse.message("x", { retry = -1 }) end,
                       "sse.message: retry must be a whole number of milliseconds")
      assert.has_error(function() sse.comment("a\nb") end, "sse.comment: text must not contain CR or LF")
    end)
  end)

  describe("streams in an app", function()
    local app
    setup(function()
      app = support.start_app(write_app([[return { development = { sse = { heartbeat = 0.3,
        replay = 10, max_buffer = 65536 }, log = { access = false } } }]]))
    end)
    teardown(function() if app then app.stop("KILL") end end)

    it("delivers broadcasts to every stream of the channel, and only those", function()
      local a = open_stream(app.port, "/rooms/1")
      local b = open_stream(app.port, "/rooms/1")
      local other = open_stream(app.port, "/rooms/2")
      assert.are.same({ ": ok" }, read_events(a, 1))
      assert.are.same({ ": ok" }, read_events(b, 1))
      assert.are.same({ ": ok" }, read_events(other, 1))
      assert.are.equal("ok", post(app.port, "/rooms/1/say", "hi there"))
      local ea, eb = read_events(a, 1), read_events(b, 1)
      assert.matches("^id: %d+\nevent: say\ndata: hi there$", ea[1])
      assert.are.equal(ea[1], eb[1])
      local heard = read_events(other, 1, 0.5)       -- heartbeats only, never room 1's event
      for _, e in ipairs(heard) do assert.are.equal(": ", e) end
      a:close(); b:close(); other:close()
      assert.is_true(eventually(function() return get(app.port, "/count") == "0" end))
    end)

    it("sends heartbeat comments", function()
      local s = open_stream(app.port, "/rooms/hb")
      local events = read_events(s, 3, 3)
      assert.are.same({ ": ok", ": ", ": " }, events)
      s:close()
    end)

    it("replays what a reconnecting client missed after its Last-Event-ID", function()
      local s = open_stream(app.port, "/rooms/replay")
      read_events(s, 1)
      for i = 1, 4 do post(app.port, "/rooms/replay/say", "m" .. i) end
      local seen = read_events(s, 4)
      s:close()
      local second_id = seen[2]:match("^id: (%d+)")
      local again = open_stream(app.port, "/rooms/replay", "Last-Event-ID: " .. second_id .. "\r\n")
      local events = read_events(again, 3)
      assert.are.equal(": ok", events[1])
      assert.matches("data: m3$", events[2])
      assert.matches("data: m4$", events[3])
      post(app.port, "/rooms/replay/say", "live")
      assert.matches("data: live$", read_events(again, 1)[1])
      again:close()
    end)

    it("disconnects a client that does not read, and keeps serving the others", function()
      local slow = open_stream(app.port, "/rooms/slow")
      local fast = open_stream(app.port, "/rooms/slow")
      read_events(fast, 1)
      local big = string.rep("x", 60000)
      local got = 0
      for _ = 1, 80 do                              -- ~4.8 MB: beyond any socket buffers
        post(app.port, "/rooms/slow/say", big)
        got = got + #read_events(fast, 1)
      end
      assert.are.equal(80, got)
      assert.is_true(eventually(function() return get(app.port, "/count") == "1" end))
      assert.matches("sse client too slow: disconnected", app.log())
      slow:close(); fast:close()
    end)

    it("ends a handler-driven stream when its client leaves, whatever the handler waits on",
       function()
      -- Streams closed by earlier tests are dropped by the next heartbeat (0.3 s here).
      assert.is_true(eventually(function() return get(app.port, "/count") == "0" end))
      local s = open_stream(app.port, "/wait")
      assert.are.same({ ": ok" }, read_events(s, 1))
      assert.are.equal("1", get(app.port, "/count"))
      s:close()
      assert.is_true(eventually(function() return get(app.port, "/count") == "0" end))
      assert.not_matches("request failed", app.log())
    end)

    it("runs a handler-driven stream until its function returns", function()
      local out = support.curl(("-N http://127.0.0.1:%d/ticks"):format(app.port))
      assert.are.equal(': ok\n\nid: 1\ndata: {"tick":1}\n\nid: 2\ndata: {"tick":2}\n\n'
                       .. 'id: 3\ndata: {"tick":3}\n\n', out)
    end)
  end)

  it("ends open streams cleanly when the server drains", function()
    local app = support.start_app_status(write_app([[return { development = {
      log = { access = false } } }]]))
    local s = open_stream(app.port, "/rooms/bye")
    read_events(s, 1)
    app.stop("TERM")
    assert.are.equal("0", s:read_line({ timeout = 5 }))   -- the last chunk: a clean end
    assert.is_true(app.wait_exit(10))
    assert.are.equal(0, app.status())
    s:close()
  end)

  it("reaches the streams of every worker with --workers 2 (the master relays)", function()
    local app = support.start_app("spec/fixtures/sse_browser", "--env test --workers 2")
    finally(function() app.stop("KILL") end)    -- also when an assertion fails
    -- The master says it listens once one worker does: wait for both (slow under ASan).
    assert.is_true(eventually(function()
      local log = app.log()
      return (log:find('msg="listening"[^\n]*pid="1"') and log:find('msg="listening"[^\n]*pid="2"')) ~= nil
    end, 20), app.log())
    local socks, seen = {}, {}
    for _ = 1, 40 do                             -- the kernel spreads connections over workers
      local sock = support.connect(app.port)
      sock:write("GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
      local res = support.read_response(sock, true)
      assert.are.equal(200, res.status)
      socks[#socks + 1] = sock
      seen[res.headers["x-worker"]] = true
      if seen["1"] and seen["2"] then break end
    end
    assert.is_true(seen["1"] and seen["2"], "every stream landed on one worker")
    for _, sock in ipairs(socks) do read_events(sock, 1) end   -- ": ok"
    for i = 1, 3 do
      assert.are.equal("ok", post(app.port, "/say", "relayed " .. i))
    end
    for _, sock in ipairs(socks) do
      local events = read_events(sock, 3)
      assert.are.equal(3, #events)
      for i = 1, 3 do assert.matches("data: relayed " .. i .. "$", events[i]) end
      sock:close()
    end
    app.stop("TERM")
    assert.is_true(app.wait_exit(15))
  end)

  describe("pubsub.next (long polling)", function()
    after_each(function() pubsub.use(nil) end)

    it("returns what the replay buffer holds after an id, else waits for the next", function()
      pubsub.use{ adapter = "local", replay = 5 }
      local _, id1 = pubsub.publish("lp", "one")
      pubsub.publish("lp", "two")
      local got = pubsub.next("lp", { after = id1, timeout = 1 })
      assert.are.equal(1, #got)
      assert.are.equal("two", got[1].message)
      local waiter = fibril.schedule(function() return pubsub.next("lp", { after = got[1].id, timeout = 2 }) end)
      fibril.sleep(0.05)
      pubsub.publish("lp", "three")
      local later = fibril.await(waiter)
      assert.are.equal("three", later[1].message)
      assert.is_nil(pubsub.next("lp", { after = later[1].id, timeout = 0.05 }))
    end)
  end)
end)
