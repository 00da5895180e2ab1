-- examples/redis_pubsub.lua: fibril.pubsub over a Redis Stream. A subscriber in this process
-- receives what another fiber publishes; the stream would carry it across processes and
-- through a reconnect just the same. Needs a Redis server: REDIS_URL (make test's
-- scripts/with-services sets one), or it says so and exits 0.
--   REDIS_URL=redis://127.0.0.1:6379/0 fibril examples/redis_pubsub.lua
local fibril = require "fibril"
local pubsub = require "fibril.pubsub"
local redis = require "fibril.redis"

local url = os.getenv("REDIS_URL")
if not url then
  print("redis_pubsub: set REDIS_URL to a Redis server to run this example")
  return
end

pubsub.use{ adapter = "redis", url = url, stream = "example:pubsub" }
local done = fibril.cond()
local received = 0
local sub = pubsub.subscribe({ "orders", 42 }, function(message, channel)
  received = received + 1
  print(("%s got %s"):format(channel, message))
  if received == 3 then done:signal() end
end)

fibril.schedule(function()
  for i = 1, 3 do pubsub.publish("orders:42", fibril.json.encode{ item = i }) end
end)
done:wait{ timeout = 5 }
sub:unsubscribe()
pubsub.use(nil)
redis.reset()
assert(received == 3, "expected 3 messages, got " .. received)
