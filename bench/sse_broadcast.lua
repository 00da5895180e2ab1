-- bench/sse_broadcast.lua CHANNEL INTERVAL_MS SECONDS: broadcasts an event on CHANNEL every
-- INTERVAL_MS through the app's pub/sub adapter settings given by the environment
-- (PUBSUB_URL: the redis adapter), with `data: {"n":n,"t":<epoch ms>}` so sse-hold measures
-- the delivery lag from broadcast to receipt. Used by bench/sse.sh.
local fibril = require "fibril"
local pubsub = require "fibril.pubsub"
local sse = require "fibril.sse"
local walltime = require("fibril.core.fiber").walltime

local channel, interval, seconds = arg[1] or "bench", (tonumber(arg[2]) or 100) / 1000,
                                   tonumber(arg[3]) or 10
pubsub.use{ adapter = "redis", url = assert(os.getenv("PUBSUB_URL"), "PUBSUB_URL") }
local start, n = fibril.now(), 0
while fibril.now() - start < seconds do
  n = n + 1
  local due = start + (n - 1) * interval
  if due > fibril.now() then fibril.sleep(due - fibril.now()) end
  sse.broadcast(channel, sse.message(('{"n":%d,"t":%d}'):format(n, math.floor(walltime() * 1000)),
                                     { id = n }))
end
pubsub.use(nil)
print(("broadcast %d events"):format(n))
