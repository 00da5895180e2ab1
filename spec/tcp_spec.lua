-- spec/tcp_spec.lua: fibril.tcp against a real peer: a python3 child process that listens on
-- 127.0.0.1 port 0, prints its port, serves one connection by a script of steps, then exits.
local fibril = require "fibril"
local tcp = require "fibril.tcp"
local core = require "fibril.core.tcp"

local PEER = [[
import socket, sys, time, signal
signal.alarm(20)                      # never outlive a spec that went wrong
steps = sys.argv[1:]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if steps and steps[0].startswith("rcvbuf:"):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(steps.pop(0)[7:]))
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
if steps == ["closed"]:               # a port where nothing listens any more
    s.close(); print(port, flush=True); sys.exit(0)
if steps and steps[0].startswith("backlog:"):   # accepts nothing: the queue fills, SYNs drop
    s.listen(0); print(port, flush=True); time.sleep(float(steps[0][8:])); sys.exit(0)
s.listen(8)
print(port, flush=True)
c, _ = s.accept()
def unescape(t): return t.encode("latin-1").decode("unicode_escape").encode("latin-1")
def run(step):
    op, _, arg = step.partition(":")
    if op == "send": c.sendall(unescape(arg))
    elif op == "sendn": c.sendall(b"x" * int(arg))
    elif op == "sleep": time.sleep(float(arg))
    elif op == "echo":
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(d)
    elif op == "count":               # count:CHUNK:DELAY reads slowly until EOF, replies the total
        chunk, delay = arg.split(":") if arg else ("65536", "0")
        total = 0
        while True:
            d = c.recv(int(chunk))
            if not d: break
            total += len(d)
            time.sleep(float(delay))
        c.sendall(str(total).encode())
    elif op == "eof":
        while c.recv(65536): pass
    elif op == "reset":
        import struct
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
try:
    for step in steps: run(step)
except OSError:                       # the client reset the connection: a spec's choice
    pass
c.close()
]]

local script = os.tmpname()
do
  local f = assert(io.open(script, "w"))
  f:write(PEER)
  f:close()
end

-- Starts a peer running the given steps; returns its port and a function that waits for it
-- to exit (call it once the socket is closed: the peer exits after its connection ends).
local function peer(...)
  local args = {}
  for i, a in ipairs({ ... }) do args[i] = "'" .. a .. "'" end
  local p = assert(io.popen("python3 '" .. script .. "' " .. table.concat(args, " ")))
  local port = tonumber(p:read("*l"))
  assert(port, "the python peer did not start")
  return port, function() p:close() end
end

local function connect(port, opts) return tcp.connect("127.0.0.1", port, opts) end

local function live()
  local handles, requests = core.live()
  return handles + requests
end

-- Close callbacks run on the next loop turn; give them a few.
local function settle() fibril.sleep(0.02) end

local baseline

describe("fibril.tcp", function()
  setup(function()
    settle()
    baseline = live()
  end)
  teardown(function() os.remove(script) end)

  it("connects, writes and reads back what an echo peer returns", function()
    local port, done = peer("echo")
    local sock = connect(port, { timeout = 5 })
    assert.are.equal("127.0.0.1:" .. port, sock:peer())
    assert.is_true(sock:write("hello"))
    local got = ""
    while #got < 5 do got = got .. sock:read() end
    assert.are.equal("hello", got)
    sock:shutdown()
    assert.is_nil(sock:read())          -- the peer closes after our FIN: end of stream
    sock:close()
    done()
  end)

  it("keeps NUL and other bytes intact both ways", function()
    local port, done = peer("echo")
    local sock = connect(port)
    local bytes = {}
    for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
    local all = table.concat(bytes) .. "\0\r\n\0"
    sock:write(all)
    sock:shutdown()
    assert.are.equal(all, sock:read_all())
    sock:close()
    done()
  end)

  it("connects by name, trying each address the name resolves to", function()
    local port, done = peer("send:hi")
    local sock = tcp.connect("localhost", port, { timeout = 5 })
    assert.are.equal("hi", sock:read_all())
    assert.matches(":" .. port .. "$", sock:peer())
    sock:close()
    done()
  end)

  it("reads lines across chunk boundaries, stripping \\r\\n or \\n", function()
    local port, done = peer("send:GET / HT", "sleep:0.05", "send:TP/1.1\\r", "sleep:0.05",
                            "send:\\nHost: x\\n\\r\\nbody", "sleep:0.05", "send:\\nlast")
    local sock = connect(port)
    assert.are.equal("GET / HTTP/1.1", sock:read_line())
    assert.are.equal("Host: x", sock:read_line())
    assert.are.equal("", sock:read_line())
    assert.are.equal("body", sock:read_line())
    assert.are.equal("last", sock:read_line())   -- no "\n" before end of stream
    assert.is_nil(sock:read_line())
    assert.is_nil(sock:read_line())
    sock:close()
    done()
  end)

  it("reads exactly n bytes, waiting for more chunks when needed", function()
    local port, done = peer("send:abc", "sleep:0.05", "send:defgh", "sleep:0.05", "send:ij")
    local sock = connect(port)
    assert.are.equal("", sock:read_bytes(0))
    assert.are.equal("ab", sock:read_bytes(2))
    assert.are.equal("cdefg", sock:read_bytes(5))
    assert.are.equal("hij", sock:read_bytes(3))
    assert.is_nil(sock:read())
    sock:close()
    done()
  end)

  it("raises 'connection closed after k of n bytes' when the stream ends early", function()
    local port, done = peer("send:12345")
    local sock = connect(port)
    local ok, err = pcall(sock.read_bytes, sock, 10)
    assert.is_false(ok)
    assert.are.equal("closed", err.code)
    assert.matches("tcp: connection closed after 5 of 10 bytes (127.0.0.1:" .. port .. ")",
                   err.message, 1, true)
    assert.are.equal("12345", sock:read())      -- the partial bytes stay readable
    assert.is_nil(sock:read())
    sock:close()
    done()
  end)

  it("reads everything until end of stream with read_all, and nil from read after it", function()
    local port, done = peer("send:one\\n", "sleep:0.03", "sendn:100000", "sleep:0.03", "send:end")
    local sock = connect(port)
    local all = sock:read_all()
    assert.are.equal(4 + 100000 + 3, #all)
    assert.are.equal("one\n", all:sub(1, 4))
    assert.are.equal("end", all:sub(-3))
    assert.is_nil(sock:read())
    assert.are.equal("", sock:read_all())
    sock:close()
    done()
  end)

  it("returns buffered data without suspending", function()
    local port, done = peer("send:a\\nb\\nc\\n", "eof")
    local sock = connect(port)
    fibril.sleep(0.05)                         -- it all arrives while nobody reads
    assert.are.equal(6, sock:stats().buffered)
    -- outside the fiber's own frame: a coroutine fibril does not schedule cannot suspend,
    -- so these succeed only through the fast path
    local co = coroutine.wrap(function() return sock:read_line(), sock:read_line() end)
    local a, b = co()
    assert.are.same({ "a", "b" }, { a, b })
    assert.are.equal("c", sock:read_line())
    sock:close()
    done()
  end)

  it("raises a clear error naming the address when the connection is refused", function()
    local port, done = peer("closed")
    done()
    local ok, err = pcall(connect, port)
    assert.is_false(ok)
    assert.are.equal("ECONNREFUSED", err.code)
    assert.are.equal("tcp: connection refused (127.0.0.1:" .. port .. ")", err.message)
  end)

  it("raises 'cannot resolve' naming the host when the name does not resolve", function()
    local ok, err = pcall(tcp.connect, "nohost.invalid", 80, { timeout = 10 })
    assert.is_false(ok)
    assert.matches("^tcp: cannot resolve 'nohost.invalid': ", err.message)
    assert.matches("^EAI_", err.code)
  end)

  it("raises err.code == 'timeout' when a connect does not complete in time", function()
    local port, done = peer("backlog:1")
    local first = connect(port)                -- fills the backlog of 0; the next SYN drops
    local t0 = fibril.now()
    local ok, err = pcall(connect, port, { timeout = 0.1 })
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    assert.matches("tcp: connect timed out after 0.1 s (127.0.0.1:" .. port .. ")", err.message,
                   1, true)
    assert.is_true(fibril.now() - t0 < 0.5)
    first:close()
    settle()
    assert.are.equal(baseline, live())          -- the abandoned attempt was closed and freed
    done()
  end)

  it("releases a fiber cancelled while connecting, leaving nothing behind", function()
    local port, done = peer("backlog:1")
    local first = connect(port)
    local f = fibril.schedule(function() return connect(port) end)
    fibril.sleep(0.02)
    f:cancel()
    local ok, err = pcall(fibril.await, f)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.code)
    first:close()
    settle()
    assert.are.equal(baseline, live())
    done()
  end)

  it("raises err.code == 'timeout' on a slow read and the socket stays usable", function()
    local port, done = peer("sleep:0.3", "send:late\\n")
    local sock = connect(port)
    local t0 = fibril.now()
    local ok, err = pcall(sock.read, sock, { timeout = 0.05 })
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    assert.matches("tcp: read timed out after 0.05 s (127.0.0.1:" .. port .. ")", err.message,
                   1, true)
    assert.is_true(fibril.now() - t0 < 0.25)
    assert.are.equal("late", sock:read_line({ timeout = 5 }))
    sock:close()
    done()
  end)

  it("applies read_timeout from connect to every read unless a read gives its own", function()
    local port, done = peer("sleep:0.2", "send:x")
    local sock = connect(port, { read_timeout = 0.03 })
    local ok, err = pcall(sock.read_line, sock)
    assert.are.equal("timeout", err.code)
    assert.are.equal("x", sock:read({ timeout = 5 }))
    sock:close()
    done()
  end)

  it("releases a fiber cancelled in read; closing then frees the handle", function()
    local port, done = peer("eof")
    local sock = connect(port)
    local f = fibril.schedule(function() return sock:read() end)
    fibril.sleep(0.02)
    assert.are.equal("suspended", f:status())
    f:cancel()
    local ok, err = pcall(fibril.await, f)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.code)
    sock:close()
    settle()
    assert.are.equal(baseline, live())
    done()
  end)

  it("resumes a fiber waiting in read with 'connection is closed' when another closes it", function()
    local port, done = peer("eof")
    local sock = connect(port)
    local f = fibril.schedule(function() return sock:read() end)
    fibril.sleep(0.02)
    sock:close()
    local ok, err = pcall(fibril.await, f)
    assert.is_false(ok)
    assert.are.equal("closed", err.code)
    assert.matches("tcp: connection is closed", err.message, 1, true)
    done()
  end)

  it("raises when two fibers read one socket at once", function()
    local port, done = peer("eof")
    local sock = connect(port)
    local f = fibril.schedule(function() return sock:read() end)
    fibril.sleep(0.01)
    assert.has_error(function() sock:read() end, "tcp: another fiber is already reading this socket")
    sock:close()
    pcall(fibril.await, f)
    done()
  end)

  it("suspends a writer past the high-water mark: 8 MiB to a slow reader stay bounded", function()
    local port, done = peer("rcvbuf:65536", "count:65536:0.002")
    local sock = connect(port)
    local hwm = sock:stats().high_water
    assert.are.equal(256 * 1024, hwm)
    local chunk = string.rep("x", 64 * 1024)
    local max_queued, waited, stop = 0, 0, false
    local sampler = fibril.schedule(function()
      while not stop do
        local q = sock:stats().queued
        if q > max_queued then max_queued = q end
        fibril.sleep(0.001)
      end
    end)
    for _ = 1, 128 do
      local t0 = fibril.now()
      sock:write(chunk)
      if fibril.now() - t0 > 0.001 then waited = waited + 1 end
      assert.is_true(sock:stats().queued <= hwm)
    end
    stop = true
    fibril.await(sampler)
    assert.is_true(max_queued <= hwm + #chunk, "queued " .. max_queued)
    assert.is_true(max_queued > 0, "never queued: the peer was not slow")
    assert.is_true(waited > 0, "the writer never suspended")
    sock:shutdown()
    assert.are.equal(tostring(8 * 1024 * 1024), sock:read_all({ timeout = 20 }))
    sock:close()
    done()
  end)

  it("returns from one 8 MiB write only once the unsent rest is under the mark", function()
    local port, done = peer("rcvbuf:65536", "count:65536:0.001")
    local sock = connect(port, { write_high_water = 64 * 1024 })
    local t0 = fibril.now()
    sock:write(string.rep("y", 8 * 1024 * 1024))
    assert.is_true(sock:stats().queued <= 64 * 1024)
    assert.is_true(fibril.now() - t0 > 0.01)
    sock:shutdown()
    assert.are.equal(tostring(8 * 1024 * 1024), sock:read_all({ timeout = 20 }))
    sock:close()
    done()
  end)

  it("raises 'connection closed' writing to a peer that reset the connection", function()
    local port, done = peer("reset")
    local connected, sock = pcall(connect, port)
    if not connected then
      -- On a busy machine the reset can arrive before the connect completes: same error.
      assert.matches("^tcp: connection closed %(127%.0%.0%.1:" .. port, sock.message)
      return done()
    end
    fibril.sleep(0.05)                          -- the RST arrives
    local ok, err
    for _ = 1, 100 do
      ok, err = pcall(sock.write, sock, string.rep("z", 65536))
      if not ok then break end
      fibril.sleep(0.005)
    end
    assert.is_false(ok)
    assert.matches("^tcp: connection closed %(127%.0%.0%.1:" .. port, err.message)
    sock:close()
    done()
  end)

  it("holds back a peer that sends while nobody reads, then delivers every byte", function()
    local port, done = peer("sendn:4000000")
    local sock = connect(port)
    fibril.sleep(0.1)
    assert.is_true(sock:stats().buffered <= 128 * 1024, "buffered " .. sock:stats().buffered)
    assert.are.equal(4000000, #sock:read_all())
    sock:close()
    done()
  end)

  it("lets several fibers wait to write past the mark; every byte arrives", function()
    local port, done = peer("rcvbuf:65536", "count:65536:0.001")
    local sock = connect(port, { write_high_water = 32 * 1024 })
    local chunk = string.rep("w", 48 * 1024)
    local writers = {}
    for i = 1, 3 do
      writers[i] = fibril.schedule(function() for _ = 1, 20 do sock:write(chunk) end end)
    end
    fibril.await(writers[1], writers[2], writers[3])
    sock:shutdown()
    assert.are.equal(tostring(3 * 20 * #chunk), sock:read_all({ timeout = 20 }))
    assert.has_error(function() sock:write("more") end, "tcp: cannot write after shutdown")
    sock:close()
    done()
  end)

  it("stops at the read limit: a line or a body past it raises code 'limit'", function()
    local port, done = peer("sendn:100000", "send:\\n", "eof")
    local sock = connect(port, { read_limit = 4096 })
    local ok, err = pcall(sock.read_line, sock)
    assert.is_false(ok)
    assert.are.equal("limit", err.code)
    assert.matches("tcp: read buffer limit of 4096 bytes reached", err.message, 1, true)
    assert.is_true(sock:stats().buffered <= 4096)
    assert.are.equal(4096, #sock:read())        -- draining makes room to read on
    assert.has_error(function() sock:read_bytes(4097) end)
    sock:close()
    done()
  end)

  it("closes idempotently, and every later call raises 'tcp: connection is closed'", function()
    local port, done = peer("eof")
    local sock = connect(port)
    sock:close()
    sock:close()
    assert.is_true(sock:is_closed())
    assert.matches("closed", tostring(sock))
    for _, call in ipairs({
      function() sock:read() end, function() sock:read_line() end,
      function() sock:read_bytes(1) end, function() sock:read_all() end,
      function() sock:write("x") end, function() sock:shutdown() end,
      function() sock:peer() end,
    }) do
      local ok, err = pcall(call)
      assert.is_false(ok)
      assert.matches("tcp_spec%.lua:%d+: tcp: connection is closed$", err)  -- names the caller
    end
    done()
  end)

  it("closes a socket that was never closed when it is collected", function()
    local port, done = peer("eof")
    settle()
    local before = core.live()
    do
      local sock = connect(port)
      sock:write("dropped")
    end
    assert.are.equal(before + 1, (core.live()))
    collectgarbage()
    collectgarbage()
    settle()
    assert.are.equal(before, (core.live()))
    done()                                       -- the peer saw EOF: the fd was closed
  end)

  it("rejects bad arguments before doing any I/O", function()
    assert.has_error(function() tcp.connect(nil, 80) end)
    assert.has_error(function() tcp.connect("127.0.0.1", 0) end)
    assert.has_error(function() tcp.connect("127.0.0.1", 70000) end)
    assert.has_error(function() tcp.connect("127.0.0.1", 80, { timeout = -1 }) end)
    assert.has_error(function() tcp.connect("127.0.0.1", 80, { read_limit = 32 * 1024 * 1024 }) end)
    assert.has_error(function() tcp.connect("a\0b", 80) end)
    local ok, err = coroutine.wrap(function() return pcall(tcp.connect, "127.0.0.1", 9) end)()
    assert.is_false(ok)
    assert.matches("coroutine that fibril does not schedule", err, 1, true)
  end)

  it("leaves no handle or request behind", function()
    settle()
    assert.are.equal(baseline, live())
  end)
end)
