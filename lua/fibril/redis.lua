--- fibril.redis: Redis for fibers. The module is itself the app's default pool, configured
--- from config/app.lua (`redis = { url, pool, timeout, connect_timeout }`) or REDIS_URL:
---   local redis = require "fibril.redis"
---   redis:set("k", "v"); redis:get("k"); redis:blpop("jobs", 5)
---   redis:subscribe("chan", function(message, channel) ... end)
--- redis.connect(url) gives one connection, redis.pool(url, { size = 10 }) another pool; both
--- have the same methods. docs/redis.md is the guide.
local conn = require "fibril.redis.conn"
local pool = require "fibril.redis.pool"

local type, error, rawget, rawset, setmetatable, getenv = type, error, rawget, rawset,
      setmetatable, os.getenv

local M = {
  connect = conn.connect,
  null = conn.null,
  is_error = conn.is_error,
  live = conn.live,
  blocking = conn.blocking,
  MAX_ELEMENTS = conn.MAX_ELEMENTS,
}

--- A new pool of connections to url (see fibril.redis.pool for opts: size, blocking_size,
--- timeout, connect_timeout, checkout_timeout).
---@param url string
---@param opts table|nil
---@return table pool
function M.pool(url, opts) return pool.new(url, opts) end

--- The URL the default pool uses when the app's config does not name one.
M.DEFAULT_URL = "redis://127.0.0.1:6379/0"

local default                    -- the default pool, made at first use

-- The settings of the default pool: the loaded app's `redis` section, else the environment.
local function settings()
  local cfg = require("fibril.config").current()
  local r = cfg and cfg.redis or {}
  return r.url or getenv("REDIS_URL") or M.DEFAULT_URL, {
    size = r.pool, timeout = r.timeout, connect_timeout = r.connect_timeout,
  }
end

--- The default pool (created on first use from the app config or REDIS_URL).
---@return table pool
function M.default()
  if not default or default.closed then
    local url, opts = settings()
    default = pool.new(url, opts)
  end
  return default
end

--- Closes the default pool (the next use makes a new one, re-reading the settings).
function M.reset()
  if default then default:close() end
  default = nil
end

-- redis:get(...), redis:call(...), redis:pipeline(...), redis:with(...), redis:subscribe(...):
-- the module forwards every method to the default pool.
local forward = {}
setmetatable(M, { __index = function(_, k)
  if type(k) ~= "string" then return nil end
  local f = rawget(forward, k)
  if f then return f end
  if pool.Pool[k] == nil then return nil end   -- pool methods and command names only
  f = function(self, ...)
    if self ~= M then error("redis: use redis:" .. k .. "(...), not redis." .. k .. "(...)", 2) end
    local p = M.default()
    return p[k](p, ...)
  end
  rawset(forward, k, f)
  return f
end })

return M
