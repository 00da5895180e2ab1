-- The producer: pushes COUNT JSON jobs onto the queue with RPUSH (one pipeline).
--   fibril examples/redis_queue_worker/produce.lua COUNT [QUEUE_KEY]
-- REDIS_URL picks the server (default redis://127.0.0.1:6379/0).
local redis = require "fibril.redis"
local json = require "fibril.json"

local count, key = ...
count = tonumber(count) or 100
key = key or os.getenv("QUEUE_KEY") or "queue:jobs"

local conn = redis.connect(os.getenv("REDIS_URL") or "redis://127.0.0.1:6379/0")
local replies = conn:pipeline(function(p)
  for i = 1, count do
    p:rpush(key, json.encode({ id = i, payload = { n = i, text = "job " .. i } }))
  end
end)
print(("queued %d jobs on %s (%d waiting)"):format(count, key, replies[#replies] or 0))
conn:close()
