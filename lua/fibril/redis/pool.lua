--- fibril.redis.pool: a bounded set of Redis connections shared by fibers. Each command takes
--- a connection for itself and gives it back when the reply is in, so no two fibers ever
--- interleave on one connection; a fiber finding every connection busy waits (bounded by
--- checkout_timeout). Blocking commands (BLPOP, XREAD BLOCK...) take a connection from a
--- separate set, so a fiber waiting for a list never holds up the others. A broken connection
--- is dropped and replaced on demand, with backoff while the server stays unreachable.
local conn = require "fibril.redis.conn"
local executor = require "fibril.executor"
local fcore = require "fibril.core.fiber"
local waitq = require "fibril.waitq"
local backoff = require "fibril.backoff"

local type, error, setmetatable, pcall, rawset, tostring, pairs =
      type, error, setmetatable, pcall, rawset, tostring, pairs
local upper, find, format = string.upper, string.find, string.format
local now, new_error = fcore.now, fcore.error
local blocking = conn.blocking

local M = {}
local Pool = {}
M.Pool = Pool


-- One side of a pool: the connections for ordinary commands, or those for blocking ones.
local function new_set(size)
  return { size = size, open = 0, idle = {}, waiters = waitq.new(), failures = 0,
           retry_at = 0, last_error = nil }
end

--- A pool of connections to url.
---@param url string as for redis.connect
---@param opts table|nil { size = 10, blocking_size = size, timeout = 5, connect_timeout = 5,
---   checkout_timeout = timeout, max_elements = n, password =, user =, db = }
---@return table pool
function M.new(url, opts)
  if type(url) ~= "string" then error("redis.pool: url must be a string", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("redis.pool: opts must be a table", 2) end
  opts = opts or {}
  local size = opts.size or 10
  if type(size) ~= "number" or size < 1 or size % 1 ~= 0 then
    error("redis.pool: size must be a positive integer", 2)
  end
  local bsize = opts.blocking_size or size
  if type(bsize) ~= "number" or bsize < 1 or bsize % 1 ~= 0 then
    error("redis.pool: blocking_size must be a positive integer", 2)
  end
  local ct = opts.checkout_timeout
  if ct == nil then ct = opts.timeout == false and nil or (opts.timeout or conn.TIMEOUT) end
  if ct ~= nil and (type(ct) ~= "number" or not (ct >= 0)) then
    error("redis.pool: checkout_timeout must be a non-negative number of seconds", 2)
  end
  local copts = {}
  for k, v in pairs(opts) do
    if k ~= "size" and k ~= "blocking_size" and k ~= "checkout_timeout" then copts[k] = v end
  end
  local self = setmetatable({
    url = url, copts = copts, checkout_timeout = ct,
    cmd = new_set(size), blk = new_set(bsize), closed = false, _subscriber = false,
  }, M.PoolMT)
  -- Check the URL and options now, so a typo fails where the pool is made, not at first use.
  local ok, err = pcall(conn.parse_url, url)
  if not ok then error((tostring(err):gsub("^redis%.connect", "redis.pool")), 2) end
  return self
end

local function where(self) return (conn.where_of(self.url)) end

-- Opens a new connection for set (its slot already counted), honouring the backoff.
local function open_conn(self, set)
  local t = now()
  if t < set.retry_at then
    set.open = set.open - 1
    error(new_error("unavailable", format("redis: %s unreachable, retrying in %d ms (last error: %s)",
          where(self), (set.retry_at - t) * 1000 + 0.5, set.last_error)), 0)
  end
  local ok, c = pcall(conn.connect, self.url, self.copts)
  if not ok then
    set.open = set.open - 1
    set.failures = set.failures + 1
    set.retry_at = now() + backoff.delay(set.failures)
    set.last_error = type(c) == "table" and c.message or tostring(c)
    set.waiters:take()         -- a waiter may try (and see the backoff) rather than wait
    error(c, 0)
  end
  set.failures = 0
  return c
end

-- Takes a connection from set for the calling fiber, waiting while all are busy.
local function checkout(self, set)
  if self.closed then error(new_error("closed", "redis: the pool is closed"), 0) end
  local deadline = self.checkout_timeout and now() + self.checkout_timeout
  while true do
    local idle = set.idle
    local n = #idle
    while n > 0 do
      local c = idle[n]
      idle[n] = nil
      n = n - 1
      if not c:is_closed() then return c end
      set.open = set.open - 1     -- went away while idle: the server restarted
      c:close()
    end
    if set.open < set.size then
      set.open = set.open + 1
      return open_conn(self, set)
    end
    local left = deadline and deadline - now()
    local ok, err = false, nil
    if not (left and left <= 0) then
      ok, err = pcall(set.waiters.wait, set.waiters, left, "redis pool checkout")
    end
    if not ok then
      if err ~= nil and not (type(err) == "table" and err.code == "timeout") then error(err, 0) end
      error(new_error("timeout", format("redis: no free connection to %s within %g s (pool of %d"
            .. " busy)", where(self), self.checkout_timeout, set.size)), 0)
    end
    if self.closed then error(new_error("closed", "redis: the pool is closed"), 0) end
  end
end

-- Gives c back to set, or drops it when it is broken (or the pool closed).
local function checkin(self, set, c)
  if c:is_closed() or self.closed then
    set.open = set.open - 1
    c:close()
  else
    set.idle[#set.idle + 1] = c
  end
  set.waiters:take()
end

local function finish(self, set, c, ok, ...)
  checkin(self, set, c)
  if not ok then error((...), 0) end
  return ...
end

--- Sends one command on a connection of its own and returns the reply (see conn:call).
---@param cmd string
---@return any
function Pool:call(cmd, ...)
  if type(self) ~= "table" or not self.cmd then error("redis: use pool:call(), not pool.call()", 2) end
  if type(cmd) ~= "string" or cmd == "" then error("redis: command must be a non-empty string", 2) end
  local set = blocking(cmd, ...) and self.blk or self.cmd
  local c = checkout(self, set)
  return finish(self, set, c, pcall(c.call, c, cmd, ...))
end

--- Queues commands with fn(p) and sends them in one round trip (see conn:pipeline).
---@param fn function
---@return table replies
function Pool:pipeline(fn)
  if type(fn) ~= "function" then error("redis: pipeline expects a function", 2) end
  local c = checkout(self, self.cmd)
  return finish(self, self.cmd, c, pcall(c.pipeline, c, fn))
end

-- A connection pinned to a fiber or unit: MULTI, WATCH or SELECT leave state behind, so a
-- pinned connection that used them (or ended in an error) is closed rather than reused.
local STATEFUL = { MULTI = true, WATCH = true, SELECT = true, CLIENT = true }

local Pinned = {}
setmetatable(Pinned, { __index = function(_, k)
  if type(k) ~= "string" or not find(k, "^%a[%w_]*$") then return nil end
  local cmd = upper(k)
  local f = function(self, ...) return self:call(cmd, ...) end
  rawset(Pinned, k, f)
  return f
end })
local PinnedMT = { __index = Pinned }

function Pinned:call(cmd, ...)
  local c = self._c
  if not c then error(new_error("closed", "redis: this connection was given back to the pool"), 2) end
  if type(cmd) == "string" then
    local u = upper(cmd)
    if STATEFUL[u] then self._dirty = true
    elseif u == "EXEC" or u == "DISCARD" or u == "UNWATCH" then self._dirty = self._selected end
    if u == "SELECT" then self._selected = true end
  end
  return c:call(cmd, ...)
end

function Pinned:pipeline(fn)
  local c = self._c
  if not c then error(new_error("closed", "redis: this connection was given back to the pool"), 2) end
  self._dirty = true             -- what the pipeline did is not inspected: do not reuse
  return c:pipeline(fn)
end

--- Gives a pinned connection back (idempotent); later calls on it raise.
---@param failed boolean|nil true when the code using it raised: the connection is closed
function Pinned:release(failed)
  local c = self._c
  if not c then return end
  self._c = nil
  if failed or self._dirty then c:close() end
  checkin(self._pool, self._pool.cmd, c)
end

function Pinned:is_closed() return self._c == nil or self._c:is_closed() end

local function pin(self)
  return setmetatable({ _c = checkout(self, self.cmd), _pool = self, _dirty = false,
                        _selected = false }, PinnedMT)
end

--- Runs fn(conn) with a connection of its own for the whole function (MULTI/EXEC, WATCH),
--- and gives it back after, even when fn raises (then the connection is closed, since it may
--- be inside a MULTI).
---@param fn function
---@return any ... fn's results
function Pool:with(fn)
  if type(fn) ~= "function" then error("redis: with expects a function", 2) end
  local p = pin(self)
  local function done(ok, ...)
    p:release(not ok)
    if not ok then error((...), 0) end
    return ...
  end
  return done(pcall(fn, p))
end

-- Connections checked out in the current unit of work, released when it completes.
local registered = false
local function release_unit_pins()
  local locals = executor.locals()
  local pins = locals and locals["fibril.redis.pins"]
  if not pins then return end
  locals["fibril.redis.pins"] = nil
  for i = 1, #pins do pins[i]:release(true) end
end

--- Takes a connection for the rest of the unit of work (a request, a handler): it is given
--- back by conn:release(), or when the unit completes, even when its code forgot or raised
--- (then it is closed rather than reused). Outside a unit, release() is up to the caller.
---@return table conn
function Pool:checkout()
  local p = pin(self)
  local locals = executor.locals()
  if locals then
    if not registered then
      registered = true
      executor.to_complete(release_unit_pins)
    end
    local pins = locals["fibril.redis.pins"]
    if not pins then pins = {}; locals["fibril.redis.pins"] = pins end
    pins[#pins + 1] = p
  end
  return p
end

--- Closes the pool: idle connections now, busy ones when they come back; waiters raise.
function Pool:close()
  if self.closed then return end
  self.closed = true
  for _, set in pairs({ self.cmd, self.blk }) do
    for i = #set.idle, 1, -1 do
      set.idle[i]:close()
      set.idle[i] = nil
      set.open = set.open - 1
    end
    set.waiters:take_all()
  end
  if self._subscriber then self._subscriber:close() end
end

--- Counts: { size, open, idle, blocking_open, blocking_idle }.
function Pool:stats()
  return { size = self.cmd.size, open = self.cmd.open, idle = #self.cmd.idle,
           blocking_open = self.blk.open, blocking_idle = #self.blk.idle }
end

local function subscriber(self)
  local s = self._subscriber
  if not s or s.closed then
    s = require("fibril.redis.subscriber").new(self.url, self.copts)
    self._subscriber = s
  end
  return s
end

--- Calls fn(message, channel) for every message published on channel, each call a unit of
--- work, from one connection per pool that carries every subscription (and re-subscribes
--- after a reconnect). Returns once the server confirmed; sub:unsubscribe() ends it.
function Pool:subscribe(channel, fn) return subscriber(self):subscribe(channel, fn) end

--- Like subscribe, for a glob pattern: fn(message, channel, pattern).
function Pool:psubscribe(pattern, fn) return subscriber(self):psubscribe(pattern, fn) end

-- pool:get(k) is pool:call("GET", k): generated once per name, then a plain table lookup.
setmetatable(Pool, { __index = function(_, k)
  if type(k) ~= "string" or not find(k, "^%a[%w_]*$") then return nil end
  local cmd = upper(k)
  local f = function(self, ...) return self:call(cmd, ...) end
  rawset(Pool, k, f)
  return f
end })
M.PoolMT = { __index = Pool, __tostring = function(self) return "redis pool " .. where(self) end }

return M
