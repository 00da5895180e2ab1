-- examples/fanout_http.lua: "the issue text plus its comments": two calls to another service,
-- made one after the other and then concurrently with schedule/await. The upstream is a
-- local fibril HTTP server that answers each call after 100 ms, so sequentially the pair
-- takes about 200 ms and concurrently about 100 ms.
local fibril = require "fibril"
local http = require "fibril.http"
local listen = require("fibril.core.http").listen

-- The "issue tracker": /issues/7 and /issues/7/comments, each answering after 100 ms.
local server = assert(listen({ host = "127.0.0.1", port = 0, access_log = false,
  handler = function(req, res)
    fibril.sleep(0.1)
    if req.path == "/issues/7" then
      res:send(200, { ["Content-Type"] = "application/json" },
               '{"id":7,"title":"Login fails on Safari"}')
    else
      res:send(200, { ["Content-Type"] = "application/json" },
               '[{"author":"ana","body":"same here"},{"author":"bo","body":"fixed in 2.3"}]')
    end
  end }))
local base = "http://127.0.0.1:" .. server:port()

local function show(issue, comments, elapsed, how)
  print(("%-12s #%d %q with %d comments in %.0f ms"):format(how, issue.id, issue.title,
                                                          #comments, elapsed * 1000))
end

-- One after the other: the second call waits for the first.
local t0 = fibril.now()
local issue = http.get(base .. "/issues/7", { timeout = 5 }):json()
local comments = http.get(base .. "/issues/7/comments", { timeout = 5 }):json()
local sequential = fibril.now() - t0
show(issue, comments, sequential, "sequential")

-- Concurrently: both calls are in flight at once; await gives both results.
t0 = fibril.now()
local a = fibril.schedule(function() return http.get(base .. "/issues/7", { timeout = 5 }):json() end)
local b = fibril.schedule(function()
  return http.get(base .. "/issues/7/comments", { timeout = 5 }):json()
end)
issue, comments = fibril.await(a, b)
local concurrent = fibril.now() - t0
show(issue, comments, concurrent, "concurrent")

server:close()
http.reset()
assert(sequential >= 0.2, "two 100 ms calls in a row cannot take less than 200 ms")
assert(concurrent < sequential * 0.8, ("the concurrent calls took %.3f s"):format(concurrent))
