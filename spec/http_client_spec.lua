-- spec/http_client_spec.lua: fibril.http against real servers on loopback: fibril's own HTTP
-- server in this process (delay, chunked, large, redirect, error and never-answering
-- endpoints), and for TLS `openssl s_server` with certificates made here by the openssl
-- command line (a test CA, a good certificate, an expired one, one for another host).
local fibril = require "fibril"
local http = require "fibril.http"
local json = require "fibril.json"
local url = require "fibril.url"
local support = require "spec.support"

local function sh(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

local function live()
  local handles, requests = http.live()
  return handles .. "/" .. requests
end

-- ---- the upstream ---------------------------------------------------------------------------

local remotes = {}         -- client address:port (one per connection) -> requests seen
local GZ                   -- "hello gzip " x 1000, gzip-compressed by the gzip command

local function upstream(req, res)
  local p, q = req.path, url.parse_query(req.query or "")
  local ip, rport = res:remote()
  local remote = ip .. ":" .. rport
  remotes[remote] = (remotes[remote] or 0) + 1
  if p == "/hello" then
    res:send(200, { ["Content-Type"] = "text/plain", ["X-Thing"] = "yes" }, "hello")
  elseif p == "/delay" then
    fibril.sleep(tonumber(q.ms) / 1000)
    res:send(200, nil, "slept " .. q.ms)
  elseif p == "/echo" then
    res:send(200, { ["Content-Type"] = "application/json" }, json.encode({
      method = req.method, target = req.target, body = req.body, headers = req.headers }))
  elseif p == "/chunked" then
    res:start(200, {})
    for i = 1, 5 do res:write("c" .. i .. ";") fibril.sleep(0.005) end
    res:finish()
  elseif p == "/large" then
    res:send(200, nil, string.rep("x", tonumber(q.n)))
  elseif p == "/large_chunked" then
    res:start(200, {})
    for _ = 1, tonumber(q.k) do res:write(string.rep("y", 65536)) end
    res:finish()
  elseif p == "/redirect" then
    local n = tonumber(q.n)
    if n > 0 then res:send(302, { Location = "/redirect?n=" .. (n - 1) }, "")
    else res:send(200, nil, "landed") end
  elseif p == "/bad_redirect" then
    res:send(302, { Location = "gopher://x/" }, "")
  elseif p == "/see_other" then
    res:send(303, { Location = "/echo" }, "")
  elseif p == "/status" then
    res:send(tonumber(q.code), nil, "status " .. q.code)
  elseif p == "/never" then
    fibril.sleep(tonumber(q.s) or 3)
    res:send(200, nil, "late")
  elseif p == "/stall" then            -- the head at once, then a body that stops half way
    res:start(200, {}, 10)
    res:write("12345")
    fibril.sleep(tonumber(q.s) or 3)
    res:write("67890")
    res:finish()
  elseif p == "/abort" then
    res:start(200, {}, 100)
    res:write("partial")
    res:abort()
  elseif p == "/big_header" then
    res:send(200, { ["X-Big"] = string.rep("a", 70000) }, "")
  elseif p == "/gzip" then
    res:send(200, { ["Content-Encoding"] = "gzip" }, GZ)
  else
    res:send(404, nil, "no such path")
  end
end

local srv, port, base

setup(function()
  GZ = sh("printf 'hello gzip %.0s' $(seq 1000) | gzip -c")
  srv, port = support.http_server(upstream, { keepalive_timeout = 5 })
  base = "http://127.0.0.1:" .. port
end)

teardown(function()
  http.reset()
  srv:close()
end)

local function connections()
  local n = 0
  for _ in pairs(remotes) do n = n + 1 end
  return n
end

describe("fibril.http", function()
  local baseline
  before_each(function()
    http.configure({ per_origin = 16 })
    baseline = support.settled(live, "0/0")
    remotes = {}
  end)
  after_each(function()
    http.reset()
    assert.are.equal(baseline, support.settled(live, baseline))
  end)

  it("returns status, case-insensitive headers and body", function()
    local res = http.get(base .. "/hello")
    assert.are.equal(200, res.status)
    assert.is_true(res.ok)
    assert.are.equal("hello", res.body)
    assert.are.equal("yes", res.headers["x-thing"])
    assert.are.equal("yes", res.headers["X-Thing"])
    assert.are.equal("text/plain", res:header("CONTENT-TYPE"))
  end)

  it("sends json, form and query parameters, and decodes a json response", function()
    local r = http.post(base .. "/echo", { json = { a = 1 }, query = { q = "a b", n = 2 } }):json()
    assert.are.equal("POST", r.method)
    assert.are.equal("/echo?n=2&q=a%20b", r.target)
    assert.are.equal('{"a":1}', r.body)
    assert.are.equal("application/json", r.headers["content-type"])
    r = http.put(base .. "/echo", { form = { name = "x&y", list = { 1, 2 } } }):json()
    assert.are.equal("PUT", r.method)
    assert.are.equal("list=1&list=2&name=x%26y", r.body)
    assert.are.equal("application/x-www-form-urlencoded", r.headers["content-type"])
    r = http.request({ method = "patch", url = base .. "/echo", body = "raw",
                       headers = { ["X-Custom"] = "v1", Accept = "text/plain" } }):json()
    assert.are.equal("PATCH", r.method)
    assert.are.equal("raw", r.body)
    assert.are.equal("v1", r.headers["x-custom"])
    assert.are.equal("DELETE", http.delete(base .. "/echo"):json().method)
    assert.are.equal("", http.head(base .. "/hello").body)
    assert.are.equal("a=1&b=2&b=3", http.encode_query({ a = 1, b = { 2, 3 } }))
  end)

  it("keeps cached request bytes apart per URL, query and method", function()
    assert.are.equal("/echo?a=1", http.get(base .. "/echo", { query = { a = 1 } }):json().target)
    assert.are.equal("/echo?a=2", http.get(base .. "/echo", { query = { a = 2 } }):json().target)
    assert.are.equal("/echo", http.get(base .. "/echo"):json().target)
    assert.are.equal("DELETE", http.delete(base .. "/echo"):json().method)
    assert.are.equal("GET", http.get(base .. "/echo"):json().method)
    local r = http.get(base .. "/echo", { headers = { ["X-One"] = "1", ["user-agent"] = "me/1" } }):json()
    assert.are.equal("1", r.headers["x-one"])
    assert.are.equal("me/1", r.headers["user-agent"])          -- the caller's, not joined with ours
    assert.is_nil(http.get(base .. "/echo"):json().headers["x-one"])
    assert.are.equal(base .. "/echo?a=3", http.get(base .. "/echo", { query = { a = 3 } }).url)
  end)

  it("refuses headers and URLs that would splice into the request", function()
    local ok, err = pcall(http.get, base .. "/echo", { headers = { ["X-A"] = "v\r\nX-Evil: 1" } })
    assert.is_false(ok)
    assert.matches("contains CR, LF or NUL", tostring(err))
    ok, err = pcall(http.get, base .. "/echo", { headers = { ["Bad Name"] = "v" } })
    assert.matches("invalid header name", tostring(err))
    ok, err = pcall(http.get, base .. "/a b")
    assert.matches("spaces or control characters", tostring(err))
    ok, err = pcall(http.get, "ftp://example.com/")
    assert.matches("must start with http:// or https://", tostring(err))
  end)

  it("reads chunked, large and content-length bodies", function()
    assert.are.equal("c1;c2;c3;c4;c5;", http.get(base .. "/chunked").body)
    assert.are.equal(3000000, #http.get(base .. "/large?n=3000000").body)
    assert.are.equal(20 * 65536, #http.get(base .. "/large_chunked?k=20").body)
  end)

  it("streams a large body in chunks without holding it all", function()
    local res = http.get(base .. "/large_chunked?k=64", { stream = true })
    assert.is_nil(res.body)
    local total, chunks, biggest = 0, 0, 0
    for chunk in res:chunks() do
      total, chunks = total + #chunk, chunks + 1
      if #chunk > biggest then biggest = #chunk end
    end
    assert.are.equal(64 * 65536, total)
    assert.is_true(chunks > 1)
    assert.is_true(biggest <= 512 * 1024)
    assert.is_nil(res:read())
  end)

  it("reuses one keep-alive connection for sequential requests", function()
    for _ = 1, 10 do assert.are.equal("hello", http.get(base .. "/hello").body) end
    assert.are.equal(1, connections())
    local stats = http.pool_stats()
    assert.are.equal(1, stats.opened)
    assert.are.equal(9, stats.reused)
    assert.are.equal(1, stats.idle)
  end)

  it("runs 100 requests delayed 100 ms each concurrently in well under a second", function()
    http.configure({ per_origin = 100 })
    local t0 = fibril.now()
    local items = {}
    for i = 1, 100 do items[i] = i end
    local results = fibril.map(items, function() return http.get(base .. "/delay?ms=100").body end)
    local elapsed = fibril.now() - t0
    assert.are.equal(100, #results)
    assert.are.equal("slept 100", results[100])
    assert.is_true(elapsed < 0.9, "took " .. elapsed .. " s")   -- one after the other: 10 s
    -- a second round reuses the 100 parked connections
    fibril.map(items, function() return http.get(base .. "/delay?ms=1").body end)
    assert.are.equal(100, connections())
  end)

  it("bounds the connections per origin; the others wait their turn", function()
    http.configure({ per_origin = 2 })
    local items = {}
    for i = 1, 8 do items[i] = i end
    fibril.map(items, function() return http.get(base .. "/delay?ms=20").status end)
    assert.are.equal(2, connections())
    assert.are.equal(2, http.pool_stats().opened)
  end)

  it("bounds the connections in total, closing an idle one of another origin for room", function()
    http.configure({ max_connections = 2 })
    local items = {}
    for i = 1, 6 do items[i] = i end
    fibril.map(items, function() return http.get(base .. "/delay?ms=20").status end)
    assert.are.equal(2, connections())
    local other, oport = support.http_server(upstream)
    assert.are.equal("hello", http.get("http://127.0.0.1:" .. oport .. "/hello").body)
    local stats = http.pool_stats()
    assert.are.equal(2, stats.open)                            -- one of each origin now
    assert.are.equal(3, stats.opened)
    http.reset()
    other:close()
  end)

  it("gives the slot of a stream dropped unread back once it is collected", function()
    http.configure({ per_origin = 1 })
    local res = http.get(base .. "/large_chunked?k=64", { stream = true })
    assert.is_truthy(res:read())
    res = nil                                                 -- luacheck: ignore 311
    collectgarbage()
    collectgarbage()
    assert.are.equal("hello", http.get(base .. "/hello", { timeout = 2 }).body)
  end)

  it("follows redirects up to a limit, and can be told not to", function()
    local res = http.get(base .. "/redirect?n=3")
    assert.are.equal("landed", res.body)
    assert.are.equal(3, res.redirects)
    assert.are.equal(base .. "/redirect?n=0", res.url)
    res = http.get(base .. "/redirect?n=1", { follow_redirects = false })
    assert.are.equal(302, res.status)
    assert.are.equal("/redirect?n=0", res.headers.location)
    local ok, err = pcall(http.get, base .. "/redirect?n=9")
    assert.are.equal("too_many_redirects", err.code)
    assert.matches("more than 5 redirects", err.message)
    ok, err = pcall(http.get, base .. "/bad_redirect")
    assert.are.equal("protocol", err.code)
    assert.matches("invalid redirect Location 'gopher://x/'", err.message)
    local r = http.post(base .. "/see_other", { body = "x" }):json()
    assert.are.equal("GET", r.method)
    assert.are.equal("", r.body)
  end)

  it("returns error statuses as responses", function()
    local res = http.get(base .. "/status?code=503")
    assert.are.equal(503, res.status)
    assert.is_false(res.ok)
    assert.are.equal("status 503", res.body)
    assert.are.equal(404, http.get(base .. "/nowhere").status)
  end)

  it("raises a timeout when the server never answers, and discards the connection", function()
    local t0 = fibril.now()
    local ok, err = pcall(http.get, base .. "/never?s=1", { timeout = 0.2 })
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    assert.matches("http: request timed out after 0.2 s %(GET http://127.0.0.1:%d+/never%?s=1%)",
                   err.message)
    assert.is_true(fibril.now() - t0 < 0.6)
    assert.are.equal(0, http.pool_stats().open)
  end)

  it("raises when the body stops arriving for read_timeout", function()
    local ok, err = pcall(http.get, base .. "/stall?s=1", { read_timeout = 0.2 })
    assert.are.equal("timeout", err.code)
    assert.matches("no data for 0.2 s while reading the body", err.message)
  end)

  it("raises clear errors for refused connections and unknown hosts", function()
    local dead = support.http_server(function() end)
    local dead_port = dead:port()
    dead:close()
    local ok, err = pcall(http.get, "http://127.0.0.1:" .. dead_port .. "/")
    assert.are.equal("ECONNREFUSED", err.code)
    assert.matches("http: connection refused %(GET http://127.0.0.1:%d+/%)", err.message)
    ok, err = pcall(http.get, "http://no-such-host.invalid/")
    assert.matches("^EAI_", err.code)
    assert.matches("cannot resolve host", err.message)
  end)

  it("raises when the server cuts the body short", function()
    local ok, err = pcall(http.get, base .. "/abort")
    assert.are.equal("truncated", err.code)
    assert.matches("connection closed before the response was complete", err.message)
    assert.are.equal("hello", http.get(base .. "/hello").body)   -- the pool recovers
  end)

  it("enforces max_header_bytes and max_body, discarding the connection", function()
    local ok, err = pcall(http.get, base .. "/big_header")
    assert.are.equal("header_too_large", err.code)
    ok, err = pcall(http.get, base .. "/large?n=5000", { max_body = 1000 })
    assert.are.equal("body_too_large", err.code)
    assert.matches("over max_body", err.message)
    ok, err = pcall(http.get, base .. "/large_chunked?k=4", { max_body = 100000 })
    assert.are.equal("body_too_large", err.code)
    assert.are.equal(0, http.pool_stats().open)
  end)

  it("decodes gzip bodies when built with zlib", function()
    assert.is_true(http.gzip, "fibril was built without zlib (scripts/install-deps installs zlib1g-dev)")
    local res = http.get(base .. "/gzip")
    assert.are.equal("gzip", res.headers["content-encoding"])
    assert.are.equal(string.rep("hello gzip ", 1000), res.body)
    local ok, err = pcall(http.get, base .. "/gzip", { max_body = 100 })
    assert.are.equal("body_too_large", err.code)
    assert.are.equal(GZ, http.get(base .. "/gzip", { decompress = false }).body)
  end)

  it("aborts the request of a cancelled fiber and frees its connection", function()
    local f = fibril.schedule(function() return http.get(base .. "/never?s=1") end)
    fibril.sleep(0.05)
    assert.are.equal(1, http.pool_stats().open)
    f:cancel()
    local ok, err = pcall(fibril.await, f)
    assert.is_false(ok)
    assert.are.equal("cancelled", err.code)
    assert.are.equal(0, http.pool_stats().open)
    assert.are.equal("hello", http.get(base .. "/hello").body)
  end)

  it("raises a clear error when the server resets the connection", function()
    local py = support.write("reset_peer.py", [[
import socket, struct, signal
signal.alarm(20)
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.recv(65536)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()
]])
    local p = assert(io.popen("python3 '" .. py .. "'"))
    local rport = tonumber(p:read("*l"))
    local ok, err = pcall(http.get, "http://127.0.0.1:" .. rport .. "/")
    p:close()
    assert.are.equal("ECONNRESET", err.code)
    assert.matches("http: connection reset by peer %(GET http://127.0.0.1:%d+/%)", err.message)
  end)

  it("raises when connecting takes longer than connect_timeout", function()
    -- A listener that never accepts, with its backlog full: further SYNs go unanswered.
    local py = support.write("backlog_peer.py", [[
import socket, time, signal, os, sys
signal.alarm(20)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # a quiet exit when the spec is done
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(0)
print(s.getsockname()[1], os.getpid(), flush=True)
fill = []
for _ in range(3):
    c = socket.socket(); c.setblocking(False)
    try: c.connect(s.getsockname())
    except BlockingIOError: pass
    fill.append(c)
print("full", flush=True)
time.sleep(5)
]])
    local p = assert(io.popen("python3 '" .. py .. "'"))
    local bport, pid = p:read("*l"):match("^(%d+) (%d+)$")
    p:read("*l")
    local t0 = fibril.now()
    local ok, err = pcall(http.get, "http://127.0.0.1:" .. bport .. "/", { connect_timeout = 0.2 })
    assert.are.equal("timeout", err.code)
    assert.matches("connect timed out after 0.2 s", err.message)
    assert.is_true(fibril.now() - t0 < 1)
    os.execute("kill " .. pid .. " 2>/dev/null")
    p:close()
  end)

  it("closes a pooled connection left idle for idle_timeout", function()
    http.configure({ idle_timeout = 0.1 })
    http.get(base .. "/hello")
    assert.are.equal(1, http.pool_stats().idle)
    local handles = http.live()
    fibril.sleep(0.3)
    assert.are.equal(handles - 1, (http.live()))
    http.get(base .. "/hello")
    assert.are.equal(2, http.pool_stats().opened)
  end)

  it("streams a gzip body decoded chunk by chunk", function()
    assert.is_true(http.gzip, "fibril was built without zlib (scripts/install-deps installs zlib1g-dev)")
    local res = http.get(base .. "/gzip", { stream = true })
    local parts = {}
    for chunk in res:chunks() do parts[#parts + 1] = chunk end
    assert.are.equal(string.rep("hello gzip ", 1000), table.concat(parts))
  end)

  it("lets a script exit while connections rest in the pool", function()
    local status, out = support.run_script([[
local http = require "fibril.http"
local srv = assert(require("fibril.core.http").listen({ host = "127.0.0.1", port = 0,
  access_log = false, handler = function(_, res) res:send(200, nil, "hi") end }))
print(http.get("http://127.0.0.1:" .. srv:port() .. "/").body)
srv:close()
]])
    assert.are.equal(0, status)
    assert.are.equal("hi\n", out)
  end)

  it("notices a parked connection the server closed, and uses a fresh one", function()
    local quick, qport = support.http_server(upstream, { keepalive_timeout = 0.1 })
    assert.are.equal("hello", http.get("http://127.0.0.1:" .. qport .. "/hello").body)
    fibril.sleep(0.3)
    assert.are.equal("hello", http.get("http://127.0.0.1:" .. qport .. "/hello").body)
    assert.are.equal(2, connections())
    http.reset()
    quick:close()
  end)
end)

-- ---- raw responses: a python peer that answers each request with given bytes --------------

describe("fibril.http against hand-written responses", function()
  local PEER = [=[
import socket, sys, signal
signal.alarm(20)
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
def unescape(t): return t.encode("latin-1").decode("unicode_escape").encode("latin-1")
answers = [unescape(a) for a in sys.argv[1:]]
while answers:
    c, _ = s.accept()
    buf = b""
    try:
        while answers:
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d: raise EOFError
                buf += d
            buf = buf[buf.index(b"\r\n\r\n") + 4:]
            a = answers.pop(0)
            if a == b"CLOSE": break
            c.sendall(a)
    except (EOFError, OSError):
        pass
    c.close()
]=]
  local script = support.write("raw_peer.py", PEER)

  -- Runs the peer with one answer per request ("CLOSE": close the connection instead);
  -- returns the base URL and a function that waits for the peer to finish.
  local function peer(...)
    local args = {}
    for i, a in ipairs({ ... }) do args[i] = "'" .. a .. "'" end
    local p = assert(io.popen("python3 '" .. script .. "' " .. table.concat(args, " ")))
    local rport = tonumber(p:read("*l"))
    return "http://127.0.0.1:" .. rport, function() http.reset() p:close() end
  end

  local baseline
  before_each(function()
    http.configure({ per_origin = 16 })
    baseline = support.settled(live, "0/0")
  end)
  after_each(function()
    http.reset()
    assert.are.equal(baseline, support.settled(live, baseline))
  end)

  it("skips 100 Continue and reads a body delimited by the end of the stream", function()
    local base_url, done = peer([[HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nuntil eof]])
    local res = http.get(base_url .. "/")
    local stats = http.pool_stats()
    done()
    assert.are.equal(200, res.status)
    assert.are.equal("until eof", res.body)
    assert.are.equal(0, stats.idle)                     -- an HTTP/1.0 answer: not kept
  end)

  it("returns 204 and 304 without a body and keeps the connection", function()
    local base_url, done = peer("HTTP/1.1 204 No Content\\r\\n\\r\\n",
                           "HTTP/1.1 304 Not Modified\\r\\nETag: x\\r\\n\\r\\n")
    assert.are.equal(204, http.get(base_url .. "/a").status)
    local res = http.get(base_url .. "/b")
    local stats = http.pool_stats()
    done()
    assert.are.equal(304, res.status)
    assert.are.equal("", res.body)
    assert.are.equal(1, stats.opened)
  end)

  it("raises protocol errors for malformed responses", function()
    local cases = {
      "HTTP/1.1 2OO OK\\r\\n\\r\\n",
      "HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n",
      "HTTP/1.1 200 OK\\r\\nContent-Length: -1\\r\\n\\r\\n",
      "HTTP/1.1 200 OK\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\nzz\\r\\n",
      "HTTP/1.1 200 OK\\r\\nNo colon here\\r\\n\\r\\n",
    }
    for _, answer in ipairs(cases) do
      local base_url, done = peer(answer)
      local ok, err = pcall(http.get, base_url .. "/", { timeout = 2 })
      done()
      assert.is_false(ok, answer)
      assert.are.equal("protocol", err.code, answer)
      assert.matches("^http: invalid response: ", err.message)
    end
  end)

  it("refuses more than 100 header lines", function()
    local base_url, done = peer("HTTP/1.1 200 OK\\r\\n" .. string.rep("X-H: v\\r\\n", 101) .. "\\r\\n")
    local ok, err = pcall(http.get, base_url .. "/")
    done()
    assert.are.equal("header_too_large", err.code)
    assert.matches("more than 100 header lines", err.message)
  end)

  it("does not reuse a connection that sent more than it was asked", function()
    local base_url, done = peer("HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nokEXTRA")
    assert.are.equal("ok", http.get(base_url .. "/").body)
    local stats = http.pool_stats()
    done()
    assert.are.equal(0, stats.idle)
  end)

  it("sends the request once more when a reused connection was closed meanwhile", function()
    -- the first connection answers once, then closes as the second request arrives
    local base_url, done = peer("HTTP/1.1 200 OK\\r\\nContent-Length: 1\\r\\n\\r\\na", "CLOSE",
                           "HTTP/1.1 200 OK\\r\\nContent-Length: 1\\r\\n\\r\\nb")
    assert.are.equal("a", http.get(base_url .. "/").body)
    assert.are.equal("b", http.get(base_url .. "/").body)
    local stats = http.pool_stats()
    done()
    assert.are.equal(2, stats.opened)
    assert.are.equal(1, stats.reused)
  end)

  it("sends a large request body", function()
    local body = string.rep("z", 600000)
    local srv2, p2 = support.http_server(function(req, res) res:send(200, nil, tostring(#req.body)) end)
    assert.are.equal("600000", http.post("http://127.0.0.1:" .. p2 .. "/", { body = body }).body)
    http.reset()
    srv2:close()
  end)
end)

-- ---- TLS ----------------------------------------------------------------------------------

describe("fibril.http over TLS", function()
  local dir, servers = nil, {}

  -- Runs openssl s_server with cert/key on a free port; returns the port.
  -- Runs openssl s_server with cert/key on a port the kernel picks (it prints
  -- "ACCEPT 127.0.0.1:PORT"), so no other process on this shared machine can hold it.
  local function s_server(name, extra)
    local log = ("%s/s_server-%s-%d.log"):format(dir, name, #servers + 1)
    local pid = tonumber(sh(("openssl s_server -accept 127.0.0.1:0 -cert %s/%s.pem -key %s/%s.key "
      .. "%s -www >%s 2>&1 & echo $!"):format(dir, name, dir, name, extra or "", log)))
    servers[#servers + 1] = pid
    for _ = 1, 250 do
      local f = io.open(log)
      local out = f and f:read("*a") or ""
      if f then f:close() end
      local p = tonumber(out:match("ACCEPT 127%.0%.0%.1:(%d+)"))
      if p then return p end
      fibril.sleep(0.02)
    end
    error("openssl s_server did not start: " .. sh("cat " .. log))
  end

  local ports = {}
  setup(function()
    dir = support.tmpdir() .. "/tls"
    -- A CA, and three leaf certificates it signs: good (localhost, 127.0.0.1), expired,
    -- and one for another host; plus a self-signed one that no store trusts.
    local script = ([[
set -e
mkdir -p %s && cd %s
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 3 -subj "/CN=fibril test CA"
leaf() {  # name cn san days
  openssl req -newkey rsa:2048 -nodes -keyout $1.key -out $1.csr -subj "/CN=$2"
  printf 'subjectAltName=%%s\n' "$3" > $1.ext
  openssl x509 -req -in $1.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $1.pem -days $4 -extfile $1.ext
}
leaf good localhost DNS:localhost,IP:127.0.0.1 3
leaf expired localhost DNS:localhost,IP:127.0.0.1 -1
leaf other other.example DNS:other.example 3
openssl req -x509 -newkey rsa:2048 -nodes -keyout self.key -out self.pem -days 3 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost"
]]):format(dir, dir)
    local f = assert(io.open(support.tmpdir() .. "/mkcerts.sh", "w"))
    f:write(script)
    f:close()
    assert(os.execute("sh " .. support.tmpdir() .. "/mkcerts.sh >/dev/null 2>&1") == 0, "cert generation failed")
    for _, name in ipairs({ "good", "expired", "other", "self" }) do ports[name] = s_server(name) end
    -- Serves the good certificate only to a client whose SNI says localhost, else "other".
    ports.sni = s_server("other", ("-servername localhost -cert2 %s/good.pem -key2 %s/good.key")
                                  :format(dir, dir))
  end)

  teardown(function()
    for _, pid in ipairs(servers) do os.execute("kill " .. pid .. " 2>/dev/null") end
  end)

  local baseline
  before_each(function()
    http.configure({ per_origin = 16 })
    baseline = support.settled(live, "0/0")
  end)
  after_each(function()
    http.reset()
    assert.are.equal(baseline, support.settled(live, baseline))
  end)

  it("verifies the server against ca_file, by host name and by IP address", function()
    local res = http.get("https://localhost:" .. ports.good .. "/", { ca_file = dir .. "/ca.pem" })
    assert.are.equal(200, res.status)
    assert.matches("s_server", res.body)
    res = http.get("https://127.0.0.1:" .. ports.good .. "/", { ca_file = dir .. "/ca.pem" })
    assert.are.equal(200, res.status)
  end)

  it("takes ca_file from the client settings too", function()
    http.configure({ ca_file = dir .. "/ca.pem" })
    assert.are.equal(200, http.get("https://localhost:" .. ports.good .. "/").status)
  end)

  it("rejects a certificate the system store does not trust", function()
    local ok, err = pcall(http.get, "https://localhost:" .. ports.good .. "/")
    assert.are.equal("cert_untrusted", err.code)
    assert.matches("certificate verify failed for 'localhost'", err.message)
    ok, err = pcall(http.get, "https://localhost:" .. ports.self .. "/")
    assert.are.equal("cert_self_signed", err.code)
    assert.matches("self.signed certificate", err.message)
  end)

  it("sends the host name as SNI", function()
    local res = http.get("https://localhost:" .. ports.sni .. "/", { ca_file = dir .. "/ca.pem" })
    assert.are.equal(200, res.status)
    -- by IP address no SNI goes out, so the server picks its default certificate
    local ok, err = pcall(http.get, "https://127.0.0.1:" .. ports.sni .. "/", { ca_file = dir .. "/ca.pem" })
    assert.are.equal("cert_hostname", err.code)
  end)

  it("rejects an expired certificate", function()
    local ok, err = pcall(http.get, "https://localhost:" .. ports.expired .. "/", { ca_file = dir .. "/ca.pem" })
    assert.are.equal("cert_expired", err.code)
    assert.matches("certificate has expired", err.message)
  end)

  it("rejects a certificate for another host", function()
    local ok, err = pcall(http.get, "https://localhost:" .. ports.other .. "/", { ca_file = dir .. "/ca.pem" })
    assert.are.equal("cert_hostname", err.code)
    assert.matches("hostname mismatch", err.message)
  end)

  it("skips verification only when a request says verify = false", function()
    assert.are.equal(200, http.get("https://localhost:" .. ports.other .. "/", { verify = false }).status)
    assert.are.equal(200, http.get("https://localhost:" .. ports.self .. "/", { verify = false }).status)
    -- the unverified connection is not handed to a verifying request
    local ok, err = pcall(http.get, "https://localhost:" .. ports.self .. "/")
    assert.are.equal("cert_self_signed", err.code)
  end)

  it("raises a clear error for a CA file that cannot be read", function()
    local ok, err = pcall(http.get, "https://localhost:" .. ports.good .. "/",
                          { ca_file = "/nonexistent/ca.pem" })
    assert.are.equal("ca_file", err.code)
    assert.matches("cannot load CA file '/nonexistent/ca.pem'", err.message)
  end)

  it("refuses a redirect from https to http", function()
    local py = support.write("redirect_tls.py", ([[
import socket, ssl, sys, signal
signal.alarm(20)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("%s/good.pem", "%s/good.key")
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
t = ctx.wrap_socket(c, server_side=True)
t.recv(65536)
t.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n")
t.recv(65536)
]]):format(dir, dir))
    local p = assert(io.popen("python3 '" .. py .. "'"))
    local rport = tonumber(p:read("*l"))
    local ok, err = pcall(http.get, "https://localhost:" .. rport .. "/", { ca_file = dir .. "/ca.pem" })
    http.reset()
    p:close()
    assert.are.equal("redirect_downgrade", err.code)
    assert.matches("refusing a redirect from https to http", err.message)
  end)
end)
