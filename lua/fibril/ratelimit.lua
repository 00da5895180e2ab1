--- fibril.ratelimit: token buckets for fibers. A bucket holds up to `burst` tokens and
--- refills at `rate` tokens a second; `take` reserves tokens and suspends the calling fiber
--- (a timer, never a busy loop) until they are due; `try` takes them only if they are there.
--- In-process by default; with `redis`, the bucket lives in Redis and one atomic script
--- (timed by the server's clock) serves every process and machine. docs/ratelimit.md.
---
---   local ratelimit = require "fibril.ratelimit"
---   local rl = ratelimit.new{ rate = 50, burst = 10 }        -- or redis = url, key = "deliveries"
---   rl:take()          -- waits for a token
---   if rl:try(2) then ... end
local fibril = require "fibril"

local type, error, setmetatable, tostring, tonumber, pcall =
      type, error, setmetatable, tostring, tonumber, pcall
local ceil, min, huge, format, find = math.ceil, math.min, math.huge, string.format, string.find
local now, sleep = fibril.now, fibril.sleep

local M = {}

--- Prefix of the Redis keys buckets live under: key "deliveries" is "fibril:ratelimit:deliveries".
M.KEY_PREFIX = "fibril:ratelimit:"

-- fibril.sleep has millisecond resolution: round up, so a take never returns early.
local function sleep_for(s)
  sleep(ceil(s * 1000) / 1000)
end

local function timeout_error(n, wait, timeout)
  return fibril.error("timeout", format("ratelimit: %s token(s) would take %.3f s, more than the "
                                        .. "timeout of %s s", tostring(n), wait, tostring(timeout)))
end

-- n defaults to 1; it must be positive and at most burst (more could never be granted).
local function check_n(self, n, who)
  if n == nil then return 1 end
  if type(n) ~= "number" or not (n > 0 and n < huge) then
    error("ratelimit: " .. who .. ": n must be a positive number of tokens", 3)
  end
  if n > self.burst then
    error(format("ratelimit: %s: %s tokens is more than the burst (%s): it could never be granted",
                 who, tostring(n), tostring(self.burst)), 3)
  end
  return n
end

local function check_timeout(opts, who)
  local t = opts and opts.timeout
  if t ~= nil and (type(t) ~= "number" or not (t >= 0)) then
    error("ratelimit: " .. who .. ": timeout must be a non-negative number of seconds", 3)
  end
  return t
end

-- ---- in-process ------------------------------------------------------------------------

-- The bucket keeps tokens and the time they were counted; tokens below zero are reserved by
-- fibers still waiting, so takers are served in the order they came (FIFO) and a late
-- wake-up loses nothing: the debt is paid by time, not by who wakes first.
local Local = {}
Local.__index = Local

local function refill(self)
  local t = now()
  local tokens = self._tokens + (t - self._t) * self.rate
  if tokens > self.burst then tokens = self.burst end
  self._tokens, self._t = tokens, t
  return tokens
end

--- Takes n tokens (default 1), suspending the calling fiber until they are due. Tokens are
--- reserved at once: waiting fibers are served in order. A cancel while waiting gives the
--- tokens back.
---@param n number|nil tokens, 0 < n <= burst
---@param opts table|nil { timeout = s }: raise err.code == "timeout" at once, taking nothing,
---   when the tokens would take longer than s to come
---@return number the seconds the call waited for (0 when the tokens were there)
function Local:take(n, opts)
  n = check_n(self, n, "take")
  local timeout = check_timeout(opts, "take")
  local tokens = refill(self) - n
  local wait = tokens < 0 and -tokens / self.rate or 0
  if timeout and wait > timeout then error(timeout_error(n, wait, timeout), 2) end
  self._tokens = tokens
  if wait > 0 then
    local ok, err = pcall(sleep_for, wait)
    if not ok then
      self._tokens = min(refill(self) + n, self.burst)
      error(err, 0)
    end
  end
  return wait
end

--- Takes n tokens (default 1) if they are there now; never waits.
---@return boolean true when taken
function Local:try(n)
  n = check_n(self, n, "try")
  if refill(self) < n then return false end
  self._tokens = self._tokens - n
  return true
end

--- The tokens in the bucket now (below zero while takers wait for reserved ones).
---@return number
function Local:available() return refill(self) end

-- ---- Redis -----------------------------------------------------------------------------

-- One atomic step on the bucket at KEYS[1] (a hash: tokens, ts in microseconds), timed by
-- the server's clock so every client shares it. ARGV: rate, burst, n (negative: give n back),
-- max_wait (seconds a take may wait for; negative: no limit). The wait goes back as a string:
-- Redis truncates Lua numbers in replies to integers.
M.SCRIPT = [[
if redis.replicate_commands then redis.replicate_commands() end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local n, max_wait = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local v = redis.call("HMGET", KEYS[1], "tokens", "ts")
local tokens, ts = tonumber(v[1]), tonumber(v[2])
if not tokens or not ts then tokens, ts = burst, now end
if now > ts then tokens = math.min(burst, tokens + (now - ts) / 1000000 * rate) end
local after = tokens - n
if after > burst then after = burst end
local wait = 0
if after < 0 then wait = -after / rate end
if max_wait >= 0 and wait > max_wait then return { 0, tostring(wait) } end
redis.call("HSET", KEYS[1], "tokens", after, "ts", now)
redis.call("PEXPIRE", KEYS[1], math.ceil((burst - after) / rate * 1000) + 1000)
return { 1, tostring(wait) }
]]

local Remote = {}
Remote.__index = Remote

local sha                          -- the script's SHA1, learned once per process (SCRIPT LOAD)

-- The connection: the one given (used as it is: its calls say why when it is closed), or
-- one made from the URL on first use and again after it was dropped. connect can suspend,
-- so it is never done in new().
local function conn_of(self)
  local c = self._conn
  if not self._url then return c end
  if c and not c:is_closed() then return c end
  local fresh = require("fibril.redis").connect(self._url)
  if self._conn and not self._conn:is_closed() then   -- another fiber connected meanwhile
    fresh:close()
    return self._conn
  end
  self._conn = fresh
  return fresh
end

local function is_noscript(err)
  return type(err) == "table" and err.code == "redis_error" and type(err.message) == "string"
         and find(err.message, "NOSCRIPT", 1, true) ~= nil
end

-- Runs the script: EVALSHA, and on NOSCRIPT (a restarted or flushed server) EVAL, which also
-- caches it on the server again. Returns granted, wait.
local function step(self, n, max_wait)
  local c = conn_of(self)
  local key, args = self._key, { tostring(self.rate), tostring(self.burst), tostring(n),
                                 tostring(max_wait) }
  if not sha then sha = c:call("SCRIPT", "LOAD", M.SCRIPT) end
  local ok, r = pcall(c.call, c, "EVALSHA", sha, 1, key, args[1], args[2], args[3], args[4])
  if not ok then
    if not is_noscript(r) then error(r, 0) end
    r = c:call("EVAL", M.SCRIPT, 1, key, args[1], args[2], args[3], args[4])
  end
  return r[1] == 1, tonumber(r[2])
end

--- As Local:take, with the bucket in Redis: one round trip reserves the tokens; the fiber
--- then sleeps until they are due. A cancel while waiting gives them back.
function Remote:take(n, opts)
  n = check_n(self, n, "take")
  local timeout = check_timeout(opts, "take")
  local granted, wait = step(self, n, timeout or -1)
  if not granted then error(timeout_error(n, wait, timeout), 2) end
  if wait > 0 then
    local ok, err = pcall(sleep_for, wait)
    if not ok then
      pcall(step, self, -n, -1)                  -- best effort: the server may be gone too
      error(err, 0)
    end
  end
  return wait
end

--- As Local:try, with the bucket in Redis (one round trip).
function Remote:try(n)
  n = check_n(self, n, "try")
  return (step(self, n, 0))
end

-- ---- construction ----------------------------------------------------------------------

local function positive(v) return type(v) == "number" and v > 0 and v < huge end

--- Makes a token bucket.
---@param opts table { rate = tokens per second, burst = bucket size (default: max(1, rate)),
---   redis = a connection (fibril.redis) or a URL (connected on first use), key = the
---   bucket's name in Redis (needed with redis; stored as KEY_PREFIX .. key) }
---@return table limiter with take(n, opts), try(n) (and available() in-process)
---@usage local rl = ratelimit.new{ rate = 50, burst = 10, redis = os.getenv("REDIS_URL"), key = "api" }
function M.new(opts)
  if type(opts) ~= "table" then error("ratelimit.new: expected a table of options", 2) end
  local rate, burst = opts.rate, opts.burst
  if not positive(rate) then
    error("ratelimit.new: rate must be a positive number of tokens per second", 2)
  end
  if burst == nil then burst = rate < 1 and 1 or rate end
  if not positive(burst) or burst < 1 then error("ratelimit.new: burst must be a number >= 1", 2) end
  if opts.redis == nil then
    return setmetatable({ rate = rate, burst = burst, _tokens = burst, _t = now() }, Local)
  end
  local key = opts.key
  if type(key) ~= "string" or key == "" then
    error("ratelimit.new: a Redis bucket needs a key (a non-empty string naming it)", 2)
  end
  local self = setmetatable({ rate = rate, burst = burst, _key = M.KEY_PREFIX .. key }, Remote)
  if type(opts.redis) == "string" then
    self._url = opts.redis
  elseif type(opts.redis) == "table" and type(opts.redis.call) == "function" then
    self._conn = opts.redis
  else
    error("ratelimit.new: redis must be a URL or a connection from fibril.redis", 2)
  end
  return self
end

--- Closes the connection a limiter made from a URL (a connection given to new() is the
--- caller's to close). The limiter connects again if used after this.
function Remote:close()
  if self._url and self._conn then self._conn:close() end
  self._conn = nil
end

function Local.close() end

return M
