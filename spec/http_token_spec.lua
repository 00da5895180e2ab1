-- Request tokens (runtime/http_token.c): a server listening with tokens = true hands each
-- request to its handler with a number instead of a response object. The token answers its own
-- request only, never a later one on the same connection or slot; a response object is made
-- from it on demand; a handler that ends without answering costs the client a 500, not a hang.
-- Real sockets on 127.0.0.1.
local http = require "fibril.core.http"
local support = require "spec.support"

local function get(sock, path)
  sock:write("GET " .. path .. " HTTP/1.1\r\nHost: t\r\n\r\n")
  return support.read_response(sock)
end

describe("request tokens", function()
  local srv, port, seen
  local routes = {}
  local function handler(req, token)
    seen[#seen + 1] = token
    local route = routes[req.path]
    if route then return route(req, token) end
    http.send(token, 200, { ["Content-Type"] = "text/plain" }, "token " .. req.path)
  end
  before_each(function()
    seen = {}
    srv, port = support.http_server(handler, { tokens = true })
  end)
  after_each(function() srv:close() end)

  it("are numbers, also in req._res, and answer their request through core.http.send", function()
    local got
    routes["/t"] = function(req, token)
      got = { type(token), rawget(req, "_res") == token }
      got[3], got[4] = http.send(token, 201, nil, "made")
      got[5], got[6] = http.send(token, 200, nil, "again")   -- answered already: closed
    end
    local sock = support.connect(port)
    local res = get(sock, "/t")
    assert.are.equal(201, tonumber(res.status))
    assert.are.equal("made", res.body)
    assert.are.same({ "number", true, true, nil, nil, "closed" }, got)
    assert.are.equal("token /next", get(sock, "/next").body)   -- the connection goes on
    sock:close()
  end)

  it("differ per request on one connection, and an old one cannot answer a new request", function()
    local old
    routes["/keep"] = function(_, token)
      old = token
      http.send(token, 200, nil, "kept")
    end
    local stale = {}
    routes["/reuse"] = function(_, token)
      stale[1], stale[2] = http.send(old, 200, nil, "from the old token")
      stale[3] = http.response(old):closed()
      http.send(token, 200, nil, "from its own")
    end
    local sock = support.connect(port)
    assert.are.equal("kept", get(sock, "/keep").body)
    assert.are.equal("from its own", get(sock, "/reuse").body)
    sock:close()
    assert.are.same({ nil, "closed", true }, stale)
    assert.are_not.equal(seen[1], seen[2])
  end)

  it("of a closed connection answer closed, also once its slot serves another", function()
    local first, after_abort
    routes["/abort"] = function(_, token)
      first = token
      http.response(token):abort()           -- the connection closes: its token ends
      after_abort = { http.send(token, 200, nil, "too late") }
    end
    local a = support.connect(port)
    a:write("GET /abort HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.is_nil(support.read_response(a))
    a:close()
    assert.are.same({ nil, "closed" }, after_abort)
    -- A slot freed is the next one taken: find the connection that got it (token % 2^20).
    local same_slot, stale
    routes["/second"] = function(_, token)
      same_slot = token % 2 ^ 20 == first % 2 ^ 20
      stale = { http.send(first, 200, nil, "stale") }
      http.send(token, 200, nil, "own")
    end
    for _ = 1, 5 do
      local b = support.connect(port)
      assert.are.equal("own", get(b, "/second").body)
      assert.are.same({ nil, "closed" }, stale)
      b:close()
      if same_slot then break end
    end
    assert.is_true(same_slot)
  end)

  it("make a response object on demand, for streaming", function()
    routes["/stream"] = function(_, token)
      local res = http.response(token)
      res:start(200, { ["Content-Type"] = "text/plain" })
      res:write("one ")
      res:write("two")
      res:finish()
    end
    local sock = support.connect(port)
    assert.are.equal("one two", get(sock, "/stream").body)
    assert.are.equal("token /after", get(sock, "/after").body)
    sock:close()
  end)

  it("detach a first response object when a second is made", function()
    local states
    routes["/twice"] = function(_, token)
      local a = http.response(token)
      local b = http.response(token)
      states = { a:closed(), b:closed() }
      b:send(200, nil, "b answered")
    end
    local sock = support.connect(port)
    assert.are.equal("b answered", get(sock, "/twice").body)
    sock:close()
    assert.are.same({ true, false }, states)
  end)

  it("give the peer's address", function()
    local ip, rport
    routes["/who"] = function(_, token)
      ip, rport = http.remote(token)
      http.send(token, 200, nil, "ok")
    end
    local sock = support.connect(port)
    get(sock, "/who")
    sock:close()
    assert.are.equal("127.0.0.1", ip)
    assert.is_true(rport > 0)
  end)

  it("get a 500 when the handler ends without answering, or fails", function()
    routes["/silent"] = function() end
    routes["/fails"] = function() error("boom in a bare handler") end
    for _, path in ipairs({ "/silent", "/fails" }) do
      local res, sock = support.raw(port, "GET " .. path .. " HTTP/1.1\r\nHost: t\r\n\r\n")
      assert.are.equal(500, tonumber(res.status))
      assert.are.equal("close", res.headers.connection)
      assert.is_nil(sock:read({ timeout = 2 }))       -- and the connection is closed
      sock:close()
    end
  end)

  it("refuse values that are not tokens with a clear error", function()
    for _, bad in ipairs({ "x", -1, 1.5, 2 ^ 60 }) do
      local ok, err = pcall(http.send, bad, 200, nil, "")
      assert.is_false(ok)
      assert.matches("expected a request token", err)
    end
    assert.are.same({ nil, "closed" }, { http.send(0, 200, nil, "") })
    assert.are.same({ nil, "closed" }, { http.send(2 ^ 52 + 5, 200, nil, "") })
  end)
end)
