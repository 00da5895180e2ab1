-- The HTTP/1.1 server (runtime/http.c, runtime/http_write.c) against real sockets on
-- 127.0.0.1: a server in this process, raw clients through fibril.tcp.
local fibril = require "fibril"
local support = require "spec.support"

local function echo(req, res)
  res:send(200, { ["Content-Type"] = "text/plain", ["X-Method"] = req.method },
           req.method .. " " .. req.target .. " " .. #req.body .. ":" .. req.body)
end

describe("the HTTP server", function()
  local srv, port
  before_each(function() srv, port = support.http_server(echo) end)
  after_each(function() srv:close() end)

  it("answers a request and keeps the connection alive for the next", function()
    local res, sock = support.raw(port, "GET /a?x=1 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal(200, res.status)
    assert.are.equal("GET /a?x=1 0:", res.body)
    assert.are.equal("13", res.headers["content-length"])
    assert.is_not_nil(res.headers["date"])
    assert.is_nil(res.headers["connection"])
    sock:write("GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("GET /b 0:", support.read_response(sock).body)
    sock:close()
  end)

  it("answers 100 pipelined requests in order", function()
    local paths, want = {}, {}
    for i = 1, 100 do paths[i], want[i] = "/" .. i, ("GET /%d 0:"):format(i) end
    assert.are.same(want, support.pipeline(port, paths))
  end)

  it("reads Content-Length and chunked request bodies", function()
    local res = support.raw(port, "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
    assert.are.equal("POST /p 5:hello", res.body)
    res = support.raw(port, "POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                            .. "3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    assert.are.equal("POST /c 7:abcdefg", res.body)
  end)

  it("sends 100 Continue before reading a body the client holds back", function()
    local sock = support.connect(port)
    sock:write("PUT /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert.are.equal("HTTP/1.1 100 Continue", sock:read_line({ timeout = 2 }))
    assert.are.equal("", sock:read_line({ timeout = 2 }))
    sock:write("data")
    assert.are.equal("PUT /e 4:data", support.read_response(sock).body)
    sock:close()
  end)

  it("answers HEAD with the headers of GET and no body", function()
    local res, sock = support.raw(port, "HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n", true)
    assert.are.equal(200, res.status)
    assert.are.equal("HEAD", res.headers["x-method"])
    assert.are.equal(tostring(#"HEAD /h 0:"), res.headers["content-length"])
    sock:write("GET /next HTTP/1.1\r\nHost: t\r\n\r\n")   -- no stray body bytes in between
    assert.are.equal("GET /next 0:", support.read_response(sock).body)
    sock:close()
  end)

  it("closes after the response when the client asks with Connection: close", function()
    local res, sock = support.raw(port, "GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert.are.equal("close", res.headers["connection"])
    assert.is_nil(sock:read({ timeout = 2 }))
    sock:close()
  end)

  it("serves HTTP/1.0 clients, closing unless they ask for keep-alive", function()
    local res, sock = support.raw(port, "GET /old HTTP/1.0\r\n\r\n")
    assert.are.equal(200, res.status)
    assert.are.equal("close", res.headers["connection"])
    assert.is_nil(sock:read({ timeout = 2 }))
    sock:close()
    res, sock = support.raw(port, "GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert.are.equal("keep-alive", res.headers["connection"])
    sock:write("GET /ka2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert.are.equal("GET /ka2 0:", support.read_response(sock).body)
    sock:close()
  end)

  it("honours X-Request-Id when it is plain, and makes one up otherwise", function()
    local res = support.raw(port, "GET / HTTP/1.1\r\nHost: t\r\nX-Request-Id: abc-123\r\n\r\n")
    assert.are.equal("abc-123", res.headers["x-request-id"])
    res = support.raw(port, "GET / HTTP/1.1\r\nHost: t\r\nX-Request-Id: a b<c>\r\n\r\n")
    assert.matches("^%x+$", res.headers["x-request-id"])
    local other = support.raw(port, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are_not.equal(res.headers["x-request-id"], other.headers["x-request-id"])
  end)
end)

describe("the HTTP server's limits", function()
  local function server(opts, handler)
    return support.http_server(handler or echo, opts)
  end

  it("answers 431 to a head larger than max_header_bytes, and closes", function()
    local srv, port = server({ max_header_bytes = 1024 })
    local big = "GET / HTTP/1.1\r\nHost: t\r\nX-Big: " .. ("a"):rep(2000) .. "\r\n\r\n"
    local res, sock = support.raw(port, big)
    assert.are.equal(431, res.status)
    assert.is_nil(sock:read({ timeout = 2 }))
    res = support.raw(port, "GET / HTTP/1.1\r\nHost: t\r\nX-Ok: " .. ("a"):rep(500) .. "\r\n\r\n")
    assert.are.equal(200, res.status)
    srv:close()
  end)

  it("answers 431 to more than 100 header fields", function()
    local srv, port = server()
    local h = {}
    for i = 1, 101 do h[i] = "X-H" .. i .. ": v\r\n" end
    assert.are.equal(431, support.raw(port, "GET / HTTP/1.1\r\n" .. table.concat(h) .. "\r\n").status)
    srv:close()
  end)

  it("answers 414 to a URL longer than max_url_bytes", function()
    local srv, port = server({ max_url_bytes = 100 })
    local function get(len) return "GET /" .. ("u"):rep(len) .. " HTTP/1.1\r\nHost: t\r\n\r\n" end
    assert.are.equal(414, support.raw(port, get(200)).status)
    assert.are.equal(200, support.raw(port, get(50)).status)
    srv:close()
  end)

  it("answers 413 to a body over max_body_bytes, declared or chunked", function()
    local srv, port = server({ max_body_bytes = 10 })
    local post = "POST / HTTP/1.1\r\nHost: t\r\n"
    assert.are.equal(413, support.raw(port, post .. "Content-Length: 11\r\n\r\n").status)
    local res = support.raw(port, "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  .. "8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
    assert.are.equal(413, res.status)
    assert.are.equal(200, support.raw(port, post .. "Content-Length: 10\r\n\r\n0123456789").status)
    srv:close()
  end)

  it("answers 408 and closes when the head does not arrive in time (slowloris)", function()
    local srv, port = server({ header_timeout = 0.2 })
    local sock = support.connect(port)
    local t0 = fibril.now()
    sock:write("GET / HTTP/1.1\r\nHost: t\r\n")             -- never finishes the head
    fibril.sleep(0.05)
    sock:write("X-Drip: 1\r\n")
    local res = support.read_response(sock)
    assert.are.equal(408, res.status)
    assert.is_true(fibril.now() - t0 < 1)
    assert.is_nil(sock:read({ timeout = 2 }))
    sock:close()
    srv:close()
  end)

  it("answers 408 when a body stalls longer than body_timeout", function()
    local srv, port = server({ body_timeout = 0.2 })
    local sock = support.connect(port)
    sock:write("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    assert.are.equal(408, support.read_response(sock).status)
    sock:close()
    srv:close()
  end)

  it("answers 408 to a body trickled in past body_deadline, though it never stalls", function()
    local srv, port = server({ body_timeout = 0.3, body_deadline = 0.5 })
    local sock = support.connect(port)
    sock:write("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
    local res
    fibril.schedule(function() res = support.read_response(sock) end)
    for _ = 1, 100 do                        -- a byte every 0.05 s: never idle for body_timeout
      if res then break end
      pcall(sock.write, sock, "x")          -- the server may have closed by now
      fibril.sleep(0.05)
    end
    assert.are.equal(408, res and res.status)
    sock:close()
    srv:close()
  end)

  it("takes a body that keeps coming and ends within body_deadline", function()
    local srv, port = server({ body_timeout = 0.3, body_deadline = 5 })
    local sock = support.connect(port)
    sock:write("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\n")
    for _ = 1, 4 do
      fibril.sleep(0.05)
      sock:write("y")
    end
    local res = support.read_response(sock)
    assert.are.equal(200, res.status)
    assert.are.equal("POST / 4:yyyy", res.body)
    sock:close()
    srv:close()
  end)

  it("closes a keep-alive connection idle for keepalive_timeout", function()
    local srv, port = server({ keepalive_timeout = 0.2 })
    local res, sock = support.raw(port, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal(200, res.status)
    local t0 = fibril.now()
    assert.is_nil(sock:read({ timeout = 2 }))
    assert.is_true(fibril.now() - t0 < 1)
    sock:close()
    srv:close()
  end)

  it("answers 503 past max_connections and keeps serving the others", function()
    local srv, port = server({ max_connections = 2 })
    local a, b = support.connect(port), support.connect(port)
    fibril.sleep(0.02)
    local res = support.raw(port, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal(503, res.status)
    a:write("GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal(200, support.read_response(a).status)
    a:close(); b:close()
    srv:close()
  end)

  local smuggling = {
    ["both Content-Length and Transfer-Encoding"] =
      "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ["two different Content-Length headers"] =
      "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    ["a bad chunk size"] =
      "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    ["an obs-fold header continuation"] =
      "GET / HTTP/1.1\r\nHost: t\r\nX-A: one\r\n two\r\n\r\n",
    ["a space before the header colon"] =
      "GET / HTTP/1.1\r\nHost : t\r\n\r\n",
    ["Transfer-Encoding that is not chunked last"] =
      "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    ["a bare LF in the request line"] =
      "GET / HTTP/1.1\nHost: t\r\n\r\n",
  }
  for name, bytes in pairs(smuggling) do
    it("answers 400 and closes on " .. name, function()
      local srv, port = server()
      local res, sock = support.raw(port, bytes)
      assert.are.equal(400, res.status)
      assert.is_nil(sock:read({ timeout = 2 }))
      sock:close()
      srv:close()
    end)
  end
end)

describe("the HTTP server with fibers", function()
  it("does not let a slow handler delay another connection", function()
    local srv, port = support.http_server(function(req, res)
      if req.path == "/slow" then fibril.sleep(0.5) end
      res:send(200, nil, req.path)
    end)
    local slow = fibril.schedule(function()
      return support.raw(port, "GET /slow HTTP/1.1\r\nHost: t\r\n\r\n").body
    end)
    fibril.sleep(0.02)
    local t0 = fibril.now()
    assert.are.equal("/fast", support.raw(port, "GET /fast HTTP/1.1\r\nHost: t\r\n\r\n").body)
    assert.is_true(fibril.now() - t0 < 0.3)
    assert.are.equal("/slow", fibril.await(slow))
    srv:close()
  end)

  it("streams a chunked response, and a close-delimited one to HTTP/1.0", function()
    local srv, port = support.http_server(function(_, res)
      res:start(200, { ["Content-Type"] = "text/plain" })
      for i = 1, 3 do res:write("part" .. i .. ";") fibril.sleep(0.01) end
      res:finish()
    end)
    local res = support.raw(port, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("chunked", res.headers["transfer-encoding"])
    assert.are.equal("part1;part2;part3;", res.body)
    res = support.raw(port, "GET / HTTP/1.0\r\n\r\n")
    assert.is_nil(res.headers["transfer-encoding"])
    assert.are.equal("part1;part2;part3;", res.body)
    srv:close()
  end)

  it("suspends a handler that writes faster than the client reads", function()
    local written, finished = 0, false
    local chunk = ("x"):rep(65536)
    local srv, port = support.http_server(function(_, res)
      res:start(200, {})
      for _ = 1, 256 do                               -- 16 MiB in all
        assert(res:write(chunk))
        written = written + #chunk
      end
      res:finish()
      finished = true
    end, { write_high_water = 262144 })
    local sock = support.connect(port)
    sock:write("GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    fibril.sleep(0.3)                                 -- the client reads nothing meanwhile
    -- kernel socket buffers take some MiB; without backpressure all 16 would be queued
    assert.is_true(written < 12 * 1048576, "wrote " .. written .. " bytes to a client that reads nothing")
    assert.is_false(finished)
    local res = support.read_response(sock)
    assert.are.equal(16 * 1048576, #res.body)
    assert.is_true(finished)
    sock:close()
    srv:close()
  end)

  it("serves 1,000 concurrent keep-alive connections", function()
    local srv, port = support.http_server(function(req, res) res:send(200, nil, req.path) end)
    local socks = {}
    for i = 1, 1000 do socks[i] = support.connect(port) end
    local results = fibril.map(socks, function(sock, i)
      sock:write(("GET /%d HTTP/1.1\r\nHost: t\r\n\r\n"):format(i))
      local first = support.read_response(sock).body
      sock:write(("GET /again%d HTTP/1.1\r\nHost: t\r\n\r\n"):format(i))
      return first .. " " .. support.read_response(sock).body
    end)
    for i = 1, 1000 do assert.are.equal(("/%d /again%d"):format(i, i), results[i]) end
    assert.are.equal(1000, srv:connections())
    for i = 1, 1000 do socks[i]:close() end
    srv:close()
  end)

  it("rejects response headers that would split the response", function()
    local srv, port = support.http_server(function(_, res)
      local ok, err = pcall(res.send, res, 200, { ["X-Evil"] = "a\r\nSet-Cookie: x=1" }, "")
      res:send(500, nil, tostring(ok) .. " " .. tostring(err))
    end)
    local res = support.raw(port, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal(500, res.status)
    assert.matches("false .*contains CR, LF or NUL", res.body)
    srv:close()
  end)
end)

  it("answers 403 on the head to a request without required_header's value", function()
    local http = require "fibril.core.http"
    local bodies = 0
    local srv = assert(http.listen{ host = "127.0.0.1", port = 0, access_log = false,
      required_header = "X-Secret", required_value = "s3cret",
      handler = function(req, res) bodies = bodies + #req.body; res:send(200, {}, "in") end })
    local port = srv:port()
    local head = "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
    assert.are.equal("in", support.raw(port, head .. "x-secret: s3cret\r\n\r\nbody").body)
    assert.are.equal(4, bodies)
    for _, bad in ipairs({ "", "X-Secret: s3cre\r\n", "X-Secret: s3cret!\r\n", "X-Secret: S3CRET\r\n",
                           "X-Other: s3cret\r\n" }) do
      local res = support.raw(port, head .. bad .. "\r\nbody")
      assert.are.equal(403, res.status)
      assert.are.equal("close", res.headers["connection"])
    end
    assert.are.equal(5, srv:refused())
    assert.are.equal(4, bodies)                               -- no refused request reached it
    srv:close()
    assert.has_error(function()
      http.listen{ port = 0, handler = function() end, required_header = "X-Secret" }
    end, "http: required_header and required_value: two non-empty strings (a header name and its "
         .. "value), or neither")
    assert.has_error(function()
      http.listen{ port = 0, handler = function() end, required_header = "X", required_value = "" }
    end)
  end)

  it("sends head lines rendered once by head_lines, checked as a table is", function()
    local http = require "fibril.core.http"
    local lines = http.head_lines({ ["Content-Type"] = "text/plain", ["X-Shared"] = "yes",
                                    ["Content-Length"] = "99" })       -- framing stays the server's
    local closing = http.head_lines({ Connection = "close" })
    assert.has_error(function() http.head_lines({ ["X-Evil"] = "a\r\nSet-Cookie: x=1" }) end,
                     "http: response header 'X-Evil' contains CR, LF or NUL")
    local srv, port = support.http_server(function(req, res)
      if req.path == "/bad" then
        local ok, err = pcall(res.send, res, 200, io.stdout, "")     -- some other userdata
        return res:send(500, nil, tostring(ok) .. " " .. tostring(err))
      end
      res:send(200, req.path == "/close" and closing or lines, "shared")
    end)
    local res, sock = support.raw(port, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("text/plain", res.headers["content-type"])
    assert.are.equal("yes", res.headers["x-shared"])
    assert.are.equal("6", res.headers["content-length"])
    sock:write("GET /again HTTP/1.1\r\nHost: t\r\n\r\n")        -- the same lines, once more
    assert.are.equal("yes", support.read_response(sock).headers["x-shared"])
    sock:close()
    res, sock = support.raw(port, "GET /close HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("close", res.headers["connection"])
    assert.is_nil(sock:read({ timeout = 2 }))                  -- and it did close
    sock:close()
    res = support.raw(port, "GET /bad HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.matches("false .*response headers must be a table", res.body)
    srv:close()
  end)

describe("the app server's guard rails", function()
  it("answers 500 when a function route returns without responding, and ends a stream left open", function()
    local App = require "fibril.app"
    local server = require "fibril.server"
    local dir = support.tmpdir() .. "/guard"
    support.write("guard/routes.lua", [[
      return function(r)
        r:get("/silent", function() end)
        r:get("/open", function(_, res) res:start(200, {}) res:write("partial") end)
      end]])
    local srv, port = support.http_server(server.handler(App.load(dir, "test")))
    local res = support.raw(port, "GET /silent HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal(500, res.status)
    res = support.raw(port, "GET /open HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("partial", res.body)
    srv:close()
  end)
end)

describe("a streamed response with a declared length", function()
  it("carries Content-Length, refuses to write past it, and closes when it ends short", function()
    local srv, port = support.http_server(function(req, res)
      res:start(200, {}, 10)
      res:write("12345")
      if req.path == "/short" then return res:finish() end
      local ok, err = pcall(res.write, res, "6789012")
      res:write(ok and "!!!!!" or "67890")
      assert(not ok and err:match("past the Content%-Length"))
      res:finish()
    end)
    local res, sock = support.raw(port, "GET /full HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("10", res.headers["content-length"])
    assert.are.equal("1234567890", res.body)
    sock:write("GET /short HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("HTTP/1.1 200 OK", sock:read_line({ timeout = 2 }))
    local rest = sock:read_all({ timeout = 2 })     -- ends at the close, five bytes short
    assert.matches("\r\n\r\n12345$", rest)
    sock:close()
    srv:close()
  end)
end)

describe("the HTTP server under hostile or broken clients", function()
  it("keeps a big response whole for a client that reads late (no keep-alive cut)", function()
    local body = ("z"):rep(8 * 1048576)
    local srv, port = support.http_server(function(_, res) res:send(200, nil, body) end,
                                          { keepalive_timeout = 0.2 })
    local sock = support.connect(port)
    sock:write("GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    fibril.sleep(0.6)                       -- three keep-alive timeouts without reading
    local res = support.read_response(sock)
    assert.are.equal(#body, #res.body)
    sock:close()
    srv:close()
  end)

  it("closes a connection whose client stops reading its response (send_timeout)", function()
    local body = ("z"):rep(16 * 1048576)
    local srv, port = support.http_server(function(_, res) res:send(200, nil, body) end,
                                          { send_timeout = 0.3 })
    local sock = support.connect(port)
    sock:write("GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    local t0 = fibril.now()
    while srv:connections() > 0 and fibril.now() - t0 < 3 do fibril.sleep(0.05) end
    assert.are.equal(0, srv:connections())
    sock:close()
    srv:close()
  end)

  it("drops the connection when a handler fails after starting its response", function()
    local srv, port = support.http_server(function(req, res)
      if req.path == "/ok" then return res:send(200, nil, "fine") end
      res:start(200, {}, 100)
      res:write("partial")
      res:abort()
    end)
    local sock = support.connect(port)
    sock:write("GET /bad HTTP/1.1\r\nHost: t\r\n\r\n")
    local got = sock:read_all({ timeout = 2 })
    assert.matches("partial$", got)
    assert.are.equal("fine", support.raw(port, "GET /ok HTTP/1.1\r\nHost: t\r\n\r\n").body)
    sock:close()
    srv:close()
  end)

  it("lets one fiber at a time wait in res:write", function()
    local err
    local srv, port = support.http_server(function(_, res)
      res:start(200, {})
      local chunk = ("w"):rep(1048576)
      local a = fibril.schedule(function() for _ = 1, 4 do res:write(chunk) end end)
      fibril.sleep(0.05)                    -- a is suspended: the client reads nothing yet
      local ok, e = pcall(res.write, res, chunk)
      err = e
      fibril.await(a)
      if ok then res:write(chunk) end
      res:finish()
    end, { write_high_water = 65536 })
    local sock = support.connect(port)
    sock:write("GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    fibril.sleep(0.2)
    support.read_response(sock)
    assert.matches("another fiber is already waiting in res:write", tostring(err))
    sock:close()
    srv:close()
  end)

  it("answers an upgrade request as plain HTTP and then closes, with nothing extra", function()
    local srv, port = support.http_server(function(req, res) res:send(200, nil, req.path) end)
    local sock = support.connect(port)
    sock:write("GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
               .. "GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
    local res = support.read_response(sock)
    assert.are.equal("/ws", res.body)
    assert.is_nil(sock:read({ timeout = 2 }))      -- closed: no second, fake response
    sock:close()
    srv:close()
  end)

  it("survives a client that resets the connection right after Expect: 100-continue", function()
    local script = support.write("rst_server.lua", [[
      local fibril = require "fibril"
      local http = require "fibril.core.http"
      local srv = assert(http.listen{ host = "127.0.0.1", port = 0, access_log = false,
        handler = function(req, res) fibril.sleep(0.2) res:send(200, {}, "ok " .. req.path) end })
      local f = io.open(arg[1], "w") f:write(srv:port()) f:close()
      fibril.sleep(1.5)
      srv:close()
    ]])
    local portfile = support.tmpdir() .. "/rst.port"
    os.remove(portfile)
    local status_file = support.tmpdir() .. "/rst.status"
    os.execute(("(%s '%s' '%s' >/dev/null 2>&1; echo $? > '%s') &")
               :format(support.fibril, script, portfile, status_file))
    local port
    for _ = 1, 100 do
      local f = io.open(portfile)
      if f then port = tonumber(f:read("*a")) f:close() end
      if port then break end
      fibril.sleep(0.02)
    end
    assert.is_not_nil(port)
    local py = ([[python3 -c '
import socket, struct
for _ in range(20):
    s = socket.create_connection(("127.0.0.1", %d))
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
']]):format(port)
    os.execute(py)
    local res = support.raw(port, "GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("ok /after", res.body)
    local status
    for _ = 1, 200 do
      local f = io.open(status_file)
      if f then status = tonumber(f:read("*a")) f:close() end
      if status then break end
      fibril.sleep(0.02)
    end
    assert.are.equal(0, status)                    -- no crash, no sanitizer report
  end)
end)
