-- The queue's settings (from the environment: config/app.lua takes framework keys only),
-- a shared Redis connection for request handlers, and the one HTTP call the consumer makes.
local json = require "fibril.json"
local redis = require "fibril.redis"
local tcp = require "fibril.tcp"

local getenv, tonumber, format = os.getenv, tonumber, string.format

local M = {}

M.KEY = getenv("QUEUE_KEY") or "queue:jobs"           -- the list producers RPUSH onto
M.DELIVERED = M.KEY .. ":delivered"                   -- what /deliver received, in order
M.DEAD = M.KEY .. ":dead"                             -- jobs the endpoint refused (4xx)
M.RATE = tonumber(getenv("QUEUE_RATE") or "") or 20   -- deliveries per second, all consumers
M.BURST = tonumber(getenv("QUEUE_BURST") or "") or 5
M.POP_TIMEOUT = 2                                     -- seconds a BLPOP waits for a job

--- The Redis URL: REDIS_URL, else the app's redis.url setting.
function M.redis_url(config)
  return getenv("REDIS_URL") or (config and config.redis.url) or "redis://127.0.0.1:6379/0"
end

-- One connection shared by the request handlers (fibers may share one: replies are
-- matched in order), made on first use and again after it was dropped.
local shared
function M.conn(config)
  if not shared or shared:is_closed() then shared = redis.connect(M.redis_url(config)) end
  return shared
end

--- Makes a job: a JSON object with an id and a payload.
function M.job(id, payload) return json.encode({ id = id, payload = payload }) end

--- POSTs body to url (http://host:port/path) as JSON with a minimal HTTP/1.1 request;
--- returns the status code. Raises when the endpoint cannot be reached or answers no HTTP.
function M.post(url, body)
  local host, port, path = url:match("^http://([^:/]+):?(%d*)(/.*)$")
  if not host then error("queue: not an http:// URL: " .. tostring(url), 2) end
  port = tonumber(port) or 80
  local sock = tcp.connect(host, port, { timeout = 5 })
  local ok, status = pcall(function()
    sock:write(format("POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                      .. "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
                      path, host, port, #body, body))
    local line = sock:read_line({ timeout = 10 }) or ""
    local code = tonumber(line:match("^HTTP/1%.%d (%d%d%d)"))
    if not code then error(format("queue: POST %s answered %q", url, line), 0) end
    return code
  end)
  sock:close()
  if not ok then error(status, 0) end
  return status
end

return M
