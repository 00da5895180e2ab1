--- fibril.pg.pool: a fiber-safe pool of PostgreSQL connections. A fiber takes a connection
--- for one query and gives it back at once, or holds it pinned (a transaction, or pool:pin()
--- until the unit of work ends). At most `size` connections are open; a fiber that needs one
--- more waits in line up to checkout_timeout. A connection is never used by two fibers at
--- once, and one that broke is closed, never handed out again.
local fcore = require "fibril.core.fiber"
local waitq = require "fibril.waitq"
local executor = require "fibril.executor"
local Conn = require "fibril.pg.conn"
local listen = require "fibril.pg.listen"

local type, error, pcall, select, setmetatable, unpack, tostring =
      type, error, pcall, select, setmetatable, unpack, tostring
local current, spawn, now, new_error = fcore.current, fcore.spawn, fcore.now, fcore.error
local open = Conn.open
local Q, E, B = Conn.Conn.query, Conn.Conn.exec, Conn.Conn.batch

local M = {}

local Pool = {}
Pool.__index = Pool
M.Pool = Pool

-- How long a cancelled query may take to drain before its connection is closed instead.
local DRAIN_TIMEOUT = 10

--- Creates a pool (no connection is opened until one is needed).
---@param opts table { url, size = 10, checkout_timeout = 5, statement_timeout = 30,
---   connect_timeout = 5, max_result_bytes, prepare = true }
---@return table pool
function M.new(opts)
  if type(opts) ~= "table" then error("pg.pool: expected a table of options", 3) end
  local url = opts.url
  if type(url) ~= "string" or url == "" then
    error("pg.pool: url must be a postgresql:// URL or a keyword string", 3)
  end
  local size = opts.size or opts.pool or 10
  if type(size) ~= "number" or size < 1 or size % 1 ~= 0 then
    error("pg.pool: size must be a positive integer", 3)
  end
  return setmetatable({
    _url = url, _size = size, _checkout_timeout = opts.checkout_timeout or 5,
    _copts = {
      connect_timeout = opts.connect_timeout or 5, statement_timeout = opts.statement_timeout,
      timeout = opts.timeout, max_result_bytes = opts.max_result_bytes, prepare = opts.prepare,
    },
    _idle = {}, _nidle = 0, _open = 0, _waiters = waitq.new(),
    _pins = setmetatable({}, { __mode = "k" }),   -- fiber -> its pinned connection
    _closed = false,
  }, Pool)
end

-- A connection is gone for good: close it and let a waiter open a new one in its place.
local function drop(self, conn)
  conn:close()
  self._open = self._open - 1
  self._waiters:take(false)
end

--- Gives a connection back: idle ones go to the next waiter or the idle list, a draining one
--- (its query cancelled) is waited for in a fiber of its own, anything else is closed.
function Pool:release(conn)
  local state = conn:state()
  if state == "idle" and not self._closed then
    if conn:txstatus() ~= "idle" then           -- a transaction left open: never reuse it
      drop(self, conn)
    elseif not self._waiters:take(conn) then
      local n = self._nidle + 1
      self._nidle = n
      self._idle[n] = conn
    end
  elseif state == "draining" and not self._closed then
    spawn(function()
      local ok, idle = pcall(conn.wait_idle, conn, DRAIN_TIMEOUT)
      if ok and idle then self:release(conn) else drop(self, conn) end
    end)
  else
    drop(self, conn)
  end
end

local function checkout_error(self, waited)
  return new_error("checkout_timeout", "pg: no connection free in the pool within "
                   .. waited .. " s (pool of " .. self._size .. ", all in use; raise "
                   .. "database.pool or database.checkout_timeout, or hold connections less)")
end

--- Takes a connection for the calling fiber: an idle one, a new one while fewer than size
--- are open, else the next one given back, waiting up to checkout_timeout.
---@return table conn
function Pool:checkout()
  local deadline
  while true do
    if self._closed then error(new_error("closed", "pg: the pool is closed"), 0) end
    local n = self._nidle
    if n > 0 then
      local conn = self._idle[n]
      self._idle[n] = nil
      self._nidle = n - 1
      -- The server may have closed it while it sat idle (a restart): read before trusting.
      if conn:state(true) == "idle" then return conn end
      drop(self, conn)
    elseif self._open < self._size then
      self._open = self._open + 1
      local ok, conn = pcall(open, self._url, self._copts)
      if ok then return conn end
      self._open = self._open - 1
      self._waiters:take(false)
      error(conn, 0)
    else
      deadline = deadline or now() + self._checkout_timeout
      local left = deadline - now()
      if left <= 0 then error(checkout_error(self, self._checkout_timeout), 0) end
      local ok, conn = pcall(self._waiters.wait, self._waiters, left, "pg pool checkout")
      if not ok then
        if type(conn) == "table" and conn.code == "timeout" then
          error(checkout_error(self, self._checkout_timeout), 0)
        end
        error(conn, 0)
      end
      if conn then
        if conn:state(true) == "idle" then return conn end
        drop(self, conn)
      end
    end
  end
end

local function give_back(self, conn, ok, ...)
  self:release(conn)
  if not ok then error((...), 0) end
  return ...
end

--- Runs one statement on a connection of the pool (the fiber's pinned one, if any).
---@return table rows, number|nil affected, string status
function Pool:query(sql, ...)
  local pinned = self._pins[current() or 0]
  if pinned then return Q(pinned, sql, ...) end
  local conn = self:checkout()
  return give_back(self, conn, pcall(Q, conn, sql, ...))
end

--- Runs a command on a connection of the pool; returns the affected row count.
---@return number
function Pool:exec(sql, ...)
  local pinned = self._pins[current() or 0]
  if pinned then return E(pinned, sql, ...) end
  local conn = self:checkout()
  return give_back(self, conn, pcall(E, conn, sql, ...))
end

--- Sends several statements in one round trip on one connection (see docs/postgres.md,
--- "Batches"): fn(b) queues them with b:query(sql, ...); returns their rows and counts.
---@return table results, table counts
function Pool:batch(fn)
  local pinned = self._pins[current() or 0]
  if pinned then return B(pinned, fn) end
  local conn = self:checkout()
  return give_back(self, conn, pcall(B, conn, fn))
end

-- ---- pinning and transactions ------------------------------------------------------------

-- Unit-of-work context (the executor's, shared by the unit's fibers) -> { {pool, fiber}... }:
-- what to release when the unit ends. Weak: a context dies with its unit.
local unit_pins = setmetatable({}, { __mode = "k" })
local pinned_units = 0        -- lists made in unit_pins less those taken: 0 skips the lookup
local context = fcore.context

--- Pins a connection to the calling fiber until the unit of work ends (executor to_complete)
--- or pool:unpin(): every query of the fiber then runs on it (session settings, temp tables,
--- advisory locks). Returns it.
---@return table conn
function Pool:pin()
  local f = current()
  if not f then error("pg: pin needs a fiber", 2) end
  local conn = self._pins[f]
  if conn then return conn end
  conn = self:checkout()
  self._pins[f] = conn
  local ctx = executor.active() and context()
  if ctx then
    local list = unit_pins[ctx]
    if not list then list = {}; unit_pins[ctx] = list; pinned_units = pinned_units + 1 end
    list[#list + 1] = { self, f }
  end
  return conn
end

--- Releases the calling fiber's pinned connection (a no-op without one).
function Pool:unpin(f)
  f = f or current()
  local conn = f and self._pins[f]
  if not conn or conn._txdepth > 0 then return end
  self._pins[f] = nil
  self:release(conn)
end

-- Every unit of work gives back what it pinned, even when it raised.
executor.to_complete(function()
  if pinned_units == 0 then return end        -- every request of an app that never pins
  local ctx = context()
  local list = ctx and unit_pins[ctx]
  if not list then return end
  unit_pins[ctx] = nil
  pinned_units = pinned_units - 1
  for i = 1, #list do
    local pool, f = list[i][1], list[i][2]
    local conn = pool._pins[f]
    if conn then
      pool._pins[f] = nil
      conn._txdepth = 0
      pool:release(conn)        -- a transaction still open is closed, not reused
    end
  end
end)

local Tx = {}
local TxMT = { __index = Tx }

local function tx_conn(self, who)
  if type(self) ~= "table" or not self._conn then error("pg: use tx:" .. who .. "()", 3) end
  if self._done then error("pg: this transaction has ended", 3) end
  if current() ~= self._fiber then
    error("pg: a transaction's connection is pinned to the fiber that began it", 3)
  end
  return self._conn
end

--- Runs a statement in the transaction.
function Tx:query(sql, ...) return Q(tx_conn(self, "query"), sql, ...) end
--- Runs a command in the transaction; returns the affected row count.
function Tx:exec(sql, ...) return E(tx_conn(self, "exec"), sql, ...) end
--- A batch in the transaction (one round trip; a failure aborts the transaction).
function Tx:batch(fn) return B(tx_conn(self, "batch"), fn) end
--- A nested transaction: a SAVEPOINT, rolled back to when fn raises.
function Tx:transaction(fn)
  local conn = tx_conn(self, "transaction")
  if self._pool then return self._pool:transaction(fn) end
  return conn:transaction(fn)
end

local function pack(...) return { n = select("#", ...), ... } end
local run_tx, give_back_pinned

-- Ends a (sub)transaction after fn ran: commit or release the savepoint, else roll back.
-- Returns fn's results or raises its error (or the COMMIT's).
local function finish_tx(conn, depth, tx, res)
  local ok = res[1]
  tx._done = true
  if depth == 1 then
    if ok then
      local cok, err = pcall(function()
        local _, _, status = Q(conn, "COMMIT")
        if status == "ROLLBACK" then   -- a statement failed and fn went on (pcall)
          error(new_error("rolled_back", "pg: the transaction was rolled back at COMMIT: a "
                          .. "statement in it had failed"), 0)
        end
      end)
      if not cok then return false, err end
    else
      pcall(Q, conn, "ROLLBACK")
    end
  else
    local sp = "fibril_sp_" .. depth
    if ok then
      local cok, err = pcall(Q, conn, "RELEASE SAVEPOINT " .. sp)
      if not cok then return false, err end
    else
      pcall(Q, conn, "ROLLBACK TO SAVEPOINT " .. sp)
    end
  end
  if not ok then return false, res[2] end
  return true
end

--- Runs fn(tx) in a transaction on a connection pinned to the calling fiber: BEGIN, then
--- COMMIT when fn returns, ROLLBACK when it raises (the error is re-raised). Inside fn, tx
--- and this pool's own query/exec run on that connection; a nested transaction is a
--- SAVEPOINT. Returns fn's results.
---@param fn function fn(tx)
---@param opts table|nil { isolation = "serializable" | "repeatable read" | "read committed",
---   read_only = true }
function Pool:transaction(fn, opts)
  if type(fn) ~= "function" then error("pg: transaction expects a function", 2) end
  local f = current()
  if not f then error("pg: transaction needs a fiber", 2) end
  local conn = self._pins[f]
  local owned = conn == nil
  if owned then
    conn = self:checkout()
    self._pins[f] = conn
  end
  return give_back_pinned(self, f, owned, conn, pcall(run_tx, conn, self, fn, opts))
end

-- BEGIN (with options) at depth 1, a SAVEPOINT deeper.
local function begin_sql(depth, opts)
  if depth > 1 then return "SAVEPOINT fibril_sp_" .. depth end
  local begin = "BEGIN"
  if opts and opts.isolation then
    local iso = tostring(opts.isolation):lower()
    if iso ~= "serializable" and iso ~= "repeatable read" and iso ~= "read committed" then
      error("pg: isolation must be serializable, repeatable read or read committed", 0)
    end
    begin = begin .. " ISOLATION LEVEL " .. iso
  end
  if opts and opts.read_only then begin = begin .. " READ ONLY" end
  return begin
end

-- Runs fn(tx) between BEGIN (or SAVEPOINT) and COMMIT (or RELEASE), rolling back when it
-- raises; returns fn's results or raises.
run_tx = function(conn, pool, fn, opts)
  local depth = conn._txdepth + 1
  Q(conn, begin_sql(depth, opts))
  conn._txdepth = depth
  local tx = setmetatable({ _conn = conn, _pool = pool, _fiber = current() }, TxMT)
  local res = pack(pcall(fn, tx))
  local done, ferr = finish_tx(conn, depth, tx, res)
  conn._txdepth = depth - 1
  if not done then error(ferr, 0) end
  return unpack(res, 2, res.n)
end

give_back_pinned = function(self, f, owned, conn, ok, ...)
  if owned then
    self._pins[f] = nil
    self:release(conn)
  end
  if not ok then error((...), 0) end
  return ...
end

--- A transaction on a single connection (pg.connect): as pool:transaction, on this one.
function Conn.Conn:transaction(fn, opts)
  if type(fn) ~= "function" then error("pg: transaction expects a function", 2) end
  return run_tx(self, nil, fn, opts)
end

--- Calls fn(payload, channel) for every NOTIFY on channel, each call a unit of work in a
--- fiber of its own, from one connection dedicated to listening (re-LISTENs after a
--- reconnect). Returns a subscription with :unlisten().
---@return table sub
function Pool:listen(channel, fn)
  if not self._listener then self._listener = listen.new(self) end
  return self._listener:listen(channel, fn)
end

--- Stops calling fn (every handler of channel when fn is nil) for channel.
function Pool:unlisten(channel, fn)
  if self._listener then self._listener:unlisten(channel, fn) end
end

--- Counts: open connections, idle ones, fibers waiting for one.
---@return table { open, idle, waiting, size }
function Pool:stats()
  local waiting = 0
  local q = self._waiters
  for i = q.first, q.last do
    if q[i] and not q[i].dead then waiting = waiting + 1 end
  end
  return { open = self._open, idle = self._nidle, waiting = waiting, size = self._size }
end

--- Closes the idle connections and refuses new checkouts; connections in use are closed
--- when given back.
function Pool:close()
  self._closed = true
  if self._listener then self._listener:close() end
  for i = self._nidle, 1, -1 do
    local conn = self._idle[i]
    self._idle[i] = nil
    drop(self, conn)
  end
  self._nidle = 0
  while self._waiters:take(false) do end
end

return M
