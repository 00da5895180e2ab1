--- fibril.http.pool: keep-alive connections per origin, bounded per origin and in total.
--- A checkout takes the most recently parked live connection, else opens one if both bounds
--- allow, else waits (no longer than the request's deadline). Parked connections no longer
--- keep the process alive and close themselves after idle_timeout (runtime/http_client.c).
local cond = require "fibril.cond"
local fcore = require "fibril.core.fiber"

local error, pcall, setmetatable, pairs, type, max, min = error, pcall, setmetatable, pairs,
      type, math.max, math.min
local now, new_error = fcore.now, fcore.error

local Pool = {}
Pool.__index = Pool

local M = { Pool = Pool }

--- A new pool.
---@param opts table { per_origin = 16, max_connections = 256, idle_timeout = 30 }
function M.new(opts)
  return setmetatable({
    per_origin = opts.per_origin or 16,
    max_connections = opts.max_connections or 256,
    idle_timeout = opts.idle_timeout or 30,
    origins = {},              -- key -> { idle = { conn... }, open = n, connecting = n }
    open = 0,                  -- connections counted against max_connections
    -- conn -> its origin while checked out. Weak: a streamed response dropped unread takes
    -- its connection with it (its __gc closes the socket), and recount() notices.
    busy = setmetatable({}, { __mode = "k" }),
    freed = cond.new(),        -- broadcast whenever a slot or an idle connection frees up
    waiting = 0,               -- fibers waiting on freed (no broadcast needed when 0)
    opened = 0, reused = 0,    -- counters for tests and monitoring
  }, Pool)
end

local function origin(self, key)
  local o = self.origins[key]
  if not o then
    o = { idle = {}, open = 0, connecting = 0 }
    self.origins[key] = o
  end
  return o
end

-- Forgets a connection that is gone (closed, expired, broken).
local function drop(self, o, conn)
  o.open = o.open - 1
  self.open = self.open - 1
  conn:close()
end

-- Removes every idle connection that closed itself (expired, or closed by the server).
local function sweep(self)
  for _, o in pairs(self.origins) do
    local idle, j = o.idle, 0
    for i = 1, #idle do
      local c = idle[i]
      idle[i] = nil
      if c:is_closed() then drop(self, o, c) else j = j + 1; idle[j] = c end
    end
  end
end

-- Recomputes the counts from what is really there: idle lists, connects in flight and the
-- checked-out connections still reachable. Run at a bound, before waiting.
local function recount(self)
  sweep(self)
  local total = 0
  for _, o in pairs(self.origins) do o.open = #o.idle + o.connecting end
  for _, o in pairs(self.busy) do o.open = o.open + 1 end
  for _, o in pairs(self.origins) do total = total + o.open end
  self.open = total
end

-- Closes the least recently parked idle connection of another origin, to make room.
local function evict(self, except)
  for _, o in pairs(self.origins) do
    if o ~= except and #o.idle > 0 then
      drop(self, o, table.remove(o.idle, 1))
      return true
    end
  end
  return false
end

--- A connection for key: (conn, true) reused, or (conn, false) from connect().
---@param key string origin and TLS settings
---@param deadline number fibril.now() by which to have one
---@param connect function(a1, a2, a3) -> conn, raises on failure
function Pool:checkout(key, deadline, connect, a1, a2, a3)
  local o = origin(self, key)
  while true do
    local idle = o.idle
    while #idle > 0 do
      local c = idle[#idle]
      idle[#idle] = nil
      if c:unpark() then
        self.reused = self.reused + 1
        self.busy[c] = o
        return c, true
      end
      drop(self, o, c)
    end
    if o.open >= self.per_origin or self.open >= self.max_connections then recount(self) end
    if o.open < self.per_origin and self.open >= self.max_connections then evict(self, o) end
    if o.open < self.per_origin and self.open < self.max_connections then
      o.open, self.open = o.open + 1, self.open + 1          -- the slot is ours while connecting
      o.connecting = o.connecting + 1
      local ok, conn = pcall(connect, a1, a2, a3)
      o.connecting = o.connecting - 1
      if not ok then
        o.open, self.open = o.open - 1, self.open - 1
        if self.waiting > 0 then self.freed:broadcast() end
        error(conn, 0)
      end
      self.opened = self.opened + 1
      self.busy[conn] = o
      return conn, false
    end
    local left = deadline - now()
    if left <= 0 then
      error(new_error("timeout", "no connection free in the pool (per_origin "
                      .. self.per_origin .. ", max_connections " .. self.max_connections .. ")"), 0)
    end
    -- At most half a second: a connection dropped with its unread stream frees its slot
    -- through the garbage collector, which broadcasts nothing.
    self.waiting = self.waiting + 1
    local ok, err = pcall(self.freed.wait, self.freed, min(max(left, 0.001), 0.5))
    self.waiting = self.waiting - 1
    if not ok and not (type(err) == "table" and err.code == "timeout") then error(err, 0) end
  end
end

--- Gives a connection back: parked for reuse when reusable, else closed.
function Pool:checkin(key, conn, reusable)
  local o = origin(self, key)
  self.busy[conn] = nil
  if reusable and not conn:is_closed() then
    conn:park(self.idle_timeout)
    o.idle[#o.idle + 1] = conn
  else
    drop(self, o, conn)
  end
  if self.waiting > 0 then self.freed:broadcast() end
end

--- Closes every idle connection (busy ones close when given back).
function Pool:close_idle()
  for _, o in pairs(self.origins) do
    for i = #o.idle, 1, -1 do
      drop(self, o, o.idle[i])
      o.idle[i] = nil
    end
  end
  self.freed:broadcast()
end

--- Counts for tests and monitoring.
---@return table { open, idle, opened (ever), reused (checkouts served by a parked conn) }
function Pool:stats()
  local idle = 0
  for _, o in pairs(self.origins) do idle = idle + #o.idle end
  return { open = self.open, idle = idle, opened = self.opened, reused = self.reused }
end

return M
