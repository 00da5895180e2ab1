-- bench/http_client.lua: fibril.http's throughput and fan-out latency. Prints figures only.
--   fibril bench/http_client.lua rps URL [FIBERS=64] [SECONDS=5]
--     FIBERS fibers each send GET URL in a loop for SECONDS on keep-alive connections (one
--     per fiber); prints "fibril client: N requests per second".
--   fibril bench/http_client.lua fanout [CALLS=100] [DELAY_MS=50] [ROUNDS=5]
--     CALLS concurrent calls to a local fibril upstream (in this process) that answers after
--     DELAY_MS; prints the round trip of one call without delay and the fan-out time, cold
--     (new connections) and warm (pooled), against the target 1.3 x DELAY + one round trip.
local fibril = require "fibril"
local http = require "fibril.http"

local mode = arg[1]

local function median(t)
  table.sort(t)
  return t[math.floor((#t + 1) / 2)]
end

if mode == "rps" then
  local url, fibers, seconds = arg[2], tonumber(arg[3] or 64), tonumber(arg[4] or 5)
  http.configure({ per_origin = fibers })
  local function run(duration)
    local stop, count, errors = fibril.now() + duration, 0, 0
    local items = {}
    for i = 1, fibers do items[i] = i end
    local t0 = fibril.now()
    fibril.map(items, function()
      while fibril.now() < stop do
        local ok, res = pcall(http.get, url, { timeout = 10 })
        if ok and res.status == 200 then count = count + 1 else errors = errors + 1 end
      end
    end)
    return count / (fibril.now() - t0), errors
  end
  run(1)                                             -- warm-up: connections, JIT
  local rps, errors = run(seconds)
  print(("fibril client: %.0f requests per second (%d fibers, %d s, %d errors)")
        :format(rps, fibers, seconds, errors))
elseif mode == "fanout" then
  local calls, delay, rounds = tonumber(arg[2] or 100), tonumber(arg[3] or 50) / 1000,
                               tonumber(arg[4] or 5)
  local server = assert(require("fibril.core.http").listen({ host = "127.0.0.1", port = 0,
    access_log = false, handler = function(req, res)
      if req.path == "/slow" then fibril.sleep(delay) end
      res:send(200, nil, "ok")
    end }))
  local base = "http://127.0.0.1:" .. server:port()
  http.configure({ per_origin = calls })
  local items = {}
  for i = 1, calls do items[i] = i end
  local function fan()
    local t0 = fibril.now()
    fibril.map(items, function() return http.get(base .. "/slow").status end)
    return fibril.now() - t0
  end
  local rtts = {}
  for i = 1, 50 do
    local t0 = fibril.now()
    http.get(base .. "/fast")
    rtts[i] = fibril.now() - t0
  end
  local rtt = median(rtts)
  local cold, warm = {}, {}
  for r = 1, rounds do
    http.reset()
    cold[r] = fan()
    warm[r] = fan()
  end
  local target = 1.3 * delay + rtt
  print(("fan-out: %d concurrent calls of %d ms; one round trip %.3f ms; target <= %.1f ms")
        :format(calls, delay * 1000, rtt * 1000, target * 1000))
  print(("fan-out cold (new connections): median %.1f ms (%.2fx of the delay)")
        :format(median(cold) * 1000, median(cold) / delay))
  print(("fan-out warm (pooled):          median %.1f ms (%.2fx of the delay) %s")
        :format(median(warm) * 1000, median(warm) / delay,
                median(warm) <= target and "within target" or "OVER target"))
  server:close()
  http.reset()
else
  io.stderr:write("usage: fibril bench/http_client.lua rps URL [FIBERS] [SECONDS]\n"
                  .. "       fibril bench/http_client.lua fanout [CALLS] [DELAY_MS] [ROUNDS]\n")
  os.exit(2)
end
