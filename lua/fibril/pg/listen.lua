--- fibril.pg.listen: LISTEN/NOTIFY for a pool, on one dedicated connection. A listener fiber
--- waits for notifications and runs each handler as a unit of work in a fiber of its own;
--- when the connection is lost it reconnects with backoff and LISTENs again to every channel
--- (notifications sent while it was away are lost: PostgreSQL keeps none for absent listeners).
local core = require "fibril.core.pg"
local fcore = require "fibril.core.fiber"
local executor = require "fibril.executor"
local semaphore = require "fibril.semaphore"
local log = require "fibril.log"
local Conn = require "fibril.pg.conn"

local type, error, pcall, tostring, next, setmetatable = type, error, pcall, tostring, next, setmetatable
local find, gsub, min = string.find, string.gsub, math.min
local spawn, sleep, new_error = fcore.spawn, fcore.sleep, fcore.error
local wait_notify = core.methods.wait_notify

local M = {}

local function quote(channel) return '"' .. gsub(channel, '"', '""') .. '"' end

local Listener = {}
Listener.__index = Listener

-- Runs one handler as a unit of work in its own fiber; an error is logged, not raised.
local function deliver(fn, payload, channel)
  spawn(function()
    local ok, err = executor.call(fn, { pg_channel = channel }, payload, channel)
    if not ok then
      log.error("pg notification handler failed", { sub = "pg", channel = channel, err = tostring(err) })
    end
  end)
end

-- Runs a LISTEN or UNLISTEN on the dedicated connection, one at a time.
local function command(self, sql)
  self._lock:with(function() self._conn:exec(sql) end)
end

-- Connects and LISTENs to every channel; raises on failure.
local function connect(self)
  local conn = Conn.open(self._pool._url, { connect_timeout = self._pool._copts.connect_timeout,
                                            prepare = false })
  self._conn = conn
  for channel in next, self._handlers do command(self, "LISTEN " .. quote(channel)) end
  self._connected = true
end

local function loop(self)
  local delay = 0.05
  while not self._stopped do
    if not self._connected then
      local ok, err = pcall(connect, self)
      if not ok then
        if self._conn then self._conn:close() end
        self._conn = nil
        if self._stopped then break end
        log.warn("pg listener cannot connect", { sub = "pg", err = tostring(err), retry = delay })
        sleep(delay)
        delay = min(delay * 2, 5)
      else
        delay = 0.05
      end
    else
      local list = wait_notify(self._conn._c)
      if list then
        for i = 1, #list do
          local n = list[i]
          local handlers = self._handlers[n.channel]
          if handlers then
            for j = 1, #handlers do deliver(handlers[j], n.payload, n.channel) end
          end
        end
      elseif not self._stopped then      -- the connection is gone: reconnect, LISTEN again
        self._connected = false
        self._conn:close()
        self._conn = nil
        log.warn("pg listener lost its connection; reconnecting", { sub = "pg" })
      end
    end
  end
end

function M.new(pool)
  return setmetatable({ _pool = pool, _handlers = {}, _lock = semaphore.new(1),
                        _connected = false, _stopped = false }, Listener)
end

-- Starts the listener fiber and waits for its first connection.
local function ensure(self)
  if self._fiber then return end
  connect(self)                        -- in the caller: a bad URL raises here, to the caller
  self._fiber = spawn(loop, self)
end

--- Calls fn(payload, channel) for every NOTIFY on channel; returns a subscription with
--- :unlisten().
function Listener:listen(channel, fn)
  if type(channel) ~= "string" or channel == "" or find(channel, "\0", 1, true) then
    error("pg: listen expects a channel name (a non-empty string)", 3)
  end
  if type(fn) ~= "function" then error("pg: listen expects a handler function", 3) end
  if self._stopped then error(new_error("closed", "pg: the pool is closed"), 0) end
  local handlers = self._handlers[channel]
  local first = handlers == nil
  if first then
    handlers = {}
    self._handlers[channel] = handlers
  end
  handlers[#handlers + 1] = fn
  if not self._fiber then
    local ok, err = pcall(ensure, self)   -- connect() LISTENs to every channel, this one too
    if not ok then
      self:unlisten(channel, fn)
      if self._conn then self._conn:close() end
      self._conn, self._connected = nil, false
      error(err, 0)
    end
  elseif first and self._connected then
    command(self, "LISTEN " .. quote(channel))
  end
  local sub = {}
  function sub.unlisten() return self:unlisten(channel, fn) end
  return sub
end

--- Removes fn from channel's handlers (all of them when fn is nil); UNLISTENs when none is left.
function Listener:unlisten(channel, fn)
  local handlers = self._handlers[channel]
  if not handlers then return end
  for i = #handlers, 1, -1 do
    if fn == nil or handlers[i] == fn then table.remove(handlers, i) end
  end
  if #handlers == 0 then
    self._handlers[channel] = nil
    if self._connected and self._conn then
      pcall(command, self, "UNLISTEN " .. quote(channel))
    end
  end
end

--- Stops listening and closes the dedicated connection.
function Listener:close()
  self._stopped = true
  if self._conn then self._conn:close() end
end

return M
