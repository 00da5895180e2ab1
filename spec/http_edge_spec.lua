-- Edge-triggered reads (runtime/http_edge.c): a connection registered edge-triggered must
-- never be left with bytes the server did not read, whatever way libuv stopped reading it:
-- reads that fill the buffer, writes that libuv queues (it registers the socket anew),
-- reading paused for pipelined requests. Real sockets on 127.0.0.1.
local fibril = require "fibril"
local support = require "spec.support"

local function sizes(req, res)
  if req.path == "/big" then return res:send(200, nil, ("b"):rep(8 * 1048576)) end
  res:send(200, nil, req.method .. " " .. req.path .. " " .. #req.body)
end

describe("edge-triggered reads", function()
  local srv, port
  before_each(function() srv, port = support.http_server(sizes, { max_body_bytes = 16 * 1048576 }) end)
  after_each(function() srv:close() end)

  it("take a body of many full reads written at once, and the request pipelined behind it", function()
    local body = ("x"):rep(12 * 1048576 + 17)
    local sock = support.connect(port)
    sock:write("POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body
               .. "GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("POST /up " .. #body, support.read_response(sock).body)
    assert.are.equal("GET /after 0", support.read_response(sock).body)
    sock:close()
  end)

  it("answer the next request after a response libuv had to queue", function()
    local sock = support.connect(port)
    for i = 1, 3 do
      sock:write("GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
      fibril.sleep(0.1)                  -- the response waits in libuv's write queue
      assert.are.equal(8 * 1048576, #support.read_response(sock).body)
      sock:write("GET /small" .. i .. " HTTP/1.1\r\nHost: t\r\n\r\n")
      assert.are.equal("GET /small" .. i .. " 0", support.read_response(sock).body)
    end
    sock:close()
  end)

  it("answer pipelined requests that arrive while reading is paused", function()
    -- Far more than max_header_bytes of pipelined requests: reading stops and starts again.
    local paths, want = {}, {}
    for i = 1, 2000 do paths[i], want[i] = "/p" .. i, ("GET /p%d 0"):format(i) end
    assert.are.same(want, support.pipeline(port, paths))
  end)

  it("serve many connections that send at once, each answered", function()
    local socks, answered = {}, 0
    for i = 1, 50 do socks[i] = support.connect(port) end
    for round = 1, 20 do
      for i = 1, 50 do socks[i]:write(("GET /c%d/%d HTTP/1.1\r\nHost: t\r\n\r\n"):format(i, round)) end
      for i = 1, 50 do
        if support.read_response(socks[i]).body == ("GET /c%d/%d 0"):format(i, round) then
          answered = answered + 1
        end
      end
    end
    for i = 1, 50 do socks[i]:close() end
    assert.are.equal(1000, answered)
  end)
end)
