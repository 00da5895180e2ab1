-- Drains the queue: BLPOP a job, wait for a token of the shared rate limit, POST the job to
-- the delivery endpoint. A backlog goes out at the limited rate, not as fast as Redis pops.
local Daemon = require "fibril.daemon"
local ratelimit = require "fibril.ratelimit"
local redis = require "fibril.redis"
local log = require "fibril.log"
local queue = require "queue"

local Consumer = Daemon:extend("QueueConsumer")
Consumer.scope = "node"          -- one per machine; "worker" would also keep the limit (Redis)

function Consumer:perform()
  local url = queue.redis_url(self.app.config)
  -- BLPOP holds its connection for up to POP_TIMEOUT: its own connection, a longer timeout.
  self.conn = redis.connect(url, { timeout = queue.POP_TIMEOUT + 5 })
  -- One limit for every consumer on every machine: the bucket lives in Redis.
  self.limiter = ratelimit.new{ rate = queue.RATE, burst = queue.BURST, redis = url,
                                key = queue.KEY .. ":deliveries" }
  local endpoint = os.getenv("DELIVER_URL") or ("http://127.0.0.1:%d/deliver"):format(self.app.port)
  while not self:stopping() do
    local popped = self.conn:blpop(queue.KEY, queue.POP_TIMEOUT)   -- nil on timeout
    if popped then
      self.job = popped[2]       -- in hand: cleanup puts it back if it is not delivered
      self.limiter:take()
      local status = queue.post(endpoint, self.job)
      if status >= 500 then
        -- The endpoint is in trouble: raise; cleanup re-queues the job, and the restart
        -- backoff gives the endpoint room.
        error(("queue: %s answered %d"):format(endpoint, status), 0)
      elseif status >= 400 then
        -- Retrying cannot help a job the endpoint refuses: set it aside.
        self.conn:rpush(queue.DEAD, self.job)
        log.warn("job refused: dead-lettered", { status = status, list = queue.DEAD })
      end
      self.job = nil
    end
  end
end

function Consumer:cleanup()
  if self.job then
    -- Stopped or failed between BLPOP and delivery: back to the head of the queue.
    local conn = self.conn
    if not conn or conn:is_closed() then conn = redis.connect(queue.redis_url(self.app.config)) end
    conn:lpush(queue.KEY, self.job)
    if conn ~= self.conn then conn:close() end
  end
  if self.conn then self.conn:close() end
  if self.limiter then self.limiter:close() end
end

return Consumer
