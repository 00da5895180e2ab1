-- examples/redis_queue_worker against the real Redis (REDIS_URL, from scripts/with-services):
-- a backlog pushed while no consumer ran drains at the rate limit, not as fast as Redis pops.
local fibril = require "fibril"
local redis = require "fibril.redis"
local support = require "spec.support"

local REDIS_URL = support.service_env("REDIS_URL")
local EXAMPLE = "examples/redis_queue_worker"

describe("the redis_queue_worker example", function()
  local conn, h, key
  before_each(function()
    conn = redis.connect(REDIS_URL)
    key = "spec:jobs:" .. math.random(1e9)
  end)
  after_each(function()
    if h then
      h.stop("TERM")
      if not h.wait_exit(10) then h.stop("KILL") end
      assert.is_nil(h.log():match("Sanitizer"), h.log())
    end
    h = nil
    if conn then
      conn:del(key, key .. ":delivered", key .. ":dead", "fibril:ratelimit:" .. key .. ":deliveries")
      conn:close()
    end
  end)

  it("drains a backlog at the limited rate, delivering every job once, in order", function()
    local rate, burst, jobs = 40, 5, 125
    -- The backlog builds up while the consumer is down: the producer script pushes it.
    local status, out, err = support.run(("'%s/produce.lua' %d '%s'"):format(EXAMPLE, jobs, key))
    assert.are.equal(0, status, err)
    assert.matches("queued 125 jobs", out, 1, true)
    assert.are.equal(jobs, conn:llen(key))

    h = support.start_app(EXAMPLE, "--env test",
                          { QUEUE_KEY = key, QUEUE_RATE = rate, QUEUE_BURST = burst })
    local deadline = fibril.now() + 15
    while conn:llen(key .. ":delivered") < jobs and fibril.now() < deadline do fibril.sleep(0.05) end
    local delivered = conn:lrange(key .. ":delivered", 0, -1)
    assert.are.equal(jobs, #delivered, h.log())
    assert.are.equal(0, conn:llen(key))

    -- Arrival times at the endpoint: the burst at once, then one every 1/rate seconds.
    local times = {}
    for i, line in ipairs(delivered) do
      local id, t = line:match("^(%d+) ([%d.]+)$")
      assert.are.equal(i, tonumber(id))                     -- in queue order, each once
      times[i] = tonumber(t)
    end
    local span = times[jobs] - times[1]
    local expected = (jobs - burst) / rate                  -- 3 s
    local measured = (jobs - burst) / span
    assert.is_true(math.abs(measured - rate) <= rate * 0.1,
                   ("drained at %.1f jobs/s over %.2f s; the limit is %d/s"):format(measured, span, rate))
    assert.is_true(span >= expected * 0.95)
    -- After the burst, no second is ever over the limit (+1 for a boundary).
    local j = 1
    for i = burst + 1, jobs do
      while times[i] - times[j] > 1 do j = j + 1 end
      assert.is_true(i - j + 1 <= rate + burst + 1, "a one-second window held " .. (i - j + 1))
    end
  end)

  it("sets aside a job the endpoint refuses (4xx) and goes on with the next", function()
    conn:rpush(key, "not json{", '{"id":7}')
    h = support.start_app(EXAMPLE, "--env test", { QUEUE_KEY = key })
    local deadline = fibril.now() + 5
    while conn:llen(key .. ":delivered") < 1 and fibril.now() < deadline do fibril.sleep(0.02) end
    assert.are.same({ "not json{" }, conn:lrange(key .. ":dead", 0, -1))
    assert.matches("^7 ", conn:lindex(key .. ":delivered", 0))
  end)

  it("keeps the job queued and backs off while the endpoint cannot be reached", function()
    conn:rpush(key, '{"id":1}')
    h = support.start_app(EXAMPLE, "--env test",
                          { QUEUE_KEY = key, DELIVER_URL = "http://127.0.0.1:1/deliver" })
    local deadline = fibril.now() + 5
    while support.count(h.log(), "daemon failed: restarting") < 3 and fibril.now() < deadline do
      fibril.sleep(0.02)
    end
    assert.is_true(support.count(h.log(), "daemon failed: restarting") >= 3, h.log())
    assert.matches("connection refused", h.log(), 1, true)
    assert.are.same({ '{"id":1}' }, conn:lrange(key, 0, -1))
  end)

  it("puts the job in hand back at the head of the queue when stopped mid-wait", function()
    -- rate 0.5/s: after the first job, the consumer holds the second while it waits 2 s.
    assert.are.equal(0, support.run(("'%s/produce.lua' 3 '%s'"):format(EXAMPLE, key)))
    h = support.start_app(EXAMPLE, "--env test", { QUEUE_KEY = key, QUEUE_RATE = 0.5, QUEUE_BURST = 1 })
    local deadline = fibril.now() + 5
    while conn:llen(key .. ":delivered") < 1 and fibril.now() < deadline do fibril.sleep(0.02) end
    fibril.sleep(0.2)
    assert.are.equal(1, conn:llen(key))                     -- job 2 is in hand, job 3 waits
    h.stop("TERM")
    assert.is_true(h.wait_exit(10))
    h = nil
    assert.are.equal(1, conn:llen(key .. ":delivered"))
    local left = conn:lrange(key, 0, -1)
    assert.are.equal(2, #left)
    assert.matches('"id":2', left[1], 1, true)
    assert.matches('"id":3', left[2], 1, true)
  end)
end)
