-- bench/request_path.lua: the Lua side of one HTTP request, without sockets: fibril.server's
-- handler for apps/hello on a request table shaped as runtime/http.c builds it and a stand-in
-- response object, each in a new fiber, 64 at a time (as the server runs a loop turn's
-- requests). Prints nanoseconds per request (median of the rounds) for /hello and /json,
-- garbage collection and the fibers included; never asserts. It isolates what the
-- framework's Lua costs (executor unit, routing, controller, render, JSON) from parsing and
-- the kernel, which bench/http.sh measures together.
-- Usage: fibril bench/request_path.lua [rounds] [requests per round]
local fibril = require "fibril"
local App = require "fibril.app"
local server = require "fibril.server"

local rounds = tonumber(arg and arg[1]) or 5
local n = tonumber(arg and arg[2]) or 300000
local clock = os.clock

local app = App.load("apps/hello", "production")
local handler = server.handler(app)

-- The stand-in for runtime/http_write.c's response object: send answers, the rest report it.
local response = {}
response.__index = response
function response:started() return self.done end
function response:closed() return self.done end
function response.finish() end

local schedule, sleep = fibril.schedule, fibril.sleep
local answered = 0
function response:send() self.done = true; answered = answered + 1; return true end

local function round(path, count)
  answered = 0
  local t0 = clock()
  for i = 1, count do
    local res = setmetatable({}, response)
    local req = { method = "GET", path = path, target = path, version = "1.1",
                  _id = i, headers = { host = "127.0.0.1:3000" }, body = "",
                  _res = res }
    schedule(handler, req, res)
    if i % 64 == 0 then sleep(0) end       -- the scheduler runs the 64 fibers
  end
  sleep(0)
  local ns = (clock() - t0) / count * 1e9
  assert(answered == count, "a request was not answered")
  return ns
end

for _, path in ipairs({ "/hello", "/json" }) do
  round(path, math.max(1, math.floor(n / 10)))   -- warm up the JIT
  local t = {}
  for r = 1, rounds do t[r] = round(path, n) end
  table.sort(t)
  print(("%-7s %6.0f ns per request (median of %d rounds of %d)"):format(path, t[math.ceil(rounds / 2)],
                                                                      rounds, n))
end
