--- fibril.pg.conn: one PostgreSQL connection (runtime/pg.c) with the Lua half of a query:
--- parameters encoded, statements prepared automatically for repeated SQL, json and array
--- columns finished, failures raised as error objects naming the app line that queried.
local core = require "fibril.core.pg"
local fcore = require "fibril.core.fiber"
local types = require "fibril.pg.types"

local type, error, tostring, getmetatable, setmetatable, pcall, select, unpack, next =
      type, error, tostring, getmetatable, setmetatable, pcall, select, unpack, next
local sub, find, match, format = string.sub, string.find, string.match, string.format
local getinfo = debug.getinfo
local m = core.methods
local cquery, cquery_prepared, cprepare, cstate, cclose, cinfo, ctxstatus, cbatch =
      m.query, m.query_prepared, m.prepare, m.state, m.close, m.info, m.txstatus, m.batch
local new_error, ERROR_MT = fcore.error, fcore.error_metatable
local encode, finish = types.encode, types.finish
local LUA_DIR = require("fibril.core.vm").lua_dir

local M = {}

--- Statements prepared per connection at most; past it, new SQL runs unprepared.
M.MAX_PREPARED = 256
local MAX_SEEN = 1024

-- "file:line" of the first frame outside fibril's own Lua modules: the app line that queried.
local function app_where()
  for level = 3, 40 do
    local info = getinfo(level, "Sl")
    if not info then return nil end
    local src = info.source
    if sub(src, 1, 1) == "@" and info.currentline > 0 and sub(src, 2, #LUA_DIR + 1) ~= LUA_DIR then
      return sub(src, 2) .. ":" .. info.currentline
    end
  end
end
M.app_where = app_where

-- Raises for a failed query: C's (nil, msg, code, fields), or the scheduler's timeout/cancel.
local function raise(self, sql, msg, code, fields)
  local at = app_where()
  local suffix = at and (" (query at " .. at .. ")") or ""
  if getmetatable(msg) == ERROR_MT then
    if msg.code == "timeout" then
      local after = type(msg.message) == "string" and match(msg.message, "timed out (after .*)$")
      msg.message = "pg: query timed out " .. (after or "") .. " (" .. self._where
                    .. "); it was cancelled on the server" .. suffix
    end
    msg.query = sql
    error(msg, 0)
  end
  msg = tostring(msg)
  local err
  if code == "pg_error" then
    err = new_error(code, "pg: " .. msg .. suffix)
    if fields then
      for k, v in pairs(fields) do err[k] = v end
    end
  else
    if not find(msg, self._where, 1, true) then msg = msg .. " (" .. self._where .. ")" end
    err = new_error(code, "pg: " .. msg .. suffix)
  end
  err.query = sql
  error(err, 0)
end
M.raise = raise

local Conn = {}
Conn.__index = Conn
M.Conn = Conn

--- Opens a connection. opts: connect_timeout (s, default 5), statement_timeout (s: set on
--- the server; the client waits that plus 5 s), timeout (s, client-side bound per query),
--- max_result_bytes, prepare (default true).
---@return table conn
function M.open(url, opts)
  opts = opts or {}
  if type(url) ~= "string" or url == "" then
    error("pg.connect: url must be a postgresql:// URL or a keyword string", 3)
  end
  local c, msg, code = core.connect(url, opts.connect_timeout or 5, opts.max_result_bytes)
  if not c then
    local where = match(url, "@([^/?]+)") or match(url, "host=(%S+)") or "server"
    if getmetatable(msg) == ERROR_MT then
      if msg.code == "timeout" then
        msg.message = "pg: connect timed out after " .. (opts.connect_timeout or 5) .. " s ("
                      .. where .. ")"
      end
      error(msg, 0)
    end
    msg = tostring(msg)
    if find(msg, "password authentication failed", 1, true) or find(msg, "no password supplied", 1, true) then
      code = "auth"
    end
    error(new_error(code, "pg: " .. msg), 0)
  end
  local where = cinfo(c)
  local self = setmetatable({
    _c = c, _where = where, _stmts = {}, _nstmts = 0, _seq = 0, _seen = {}, _nseen = 0,
    _prepare = opts.prepare ~= false, _txdepth = 0,
    _timeout = opts.timeout or (opts.statement_timeout and opts.statement_timeout + 5),
  }, Conn)
  if opts.statement_timeout then
    local ms = format("%d", opts.statement_timeout * 1000)
    local ok, err = pcall(self.exec, self, "set statement_timeout = " .. ms)
    if not ok then cclose(c) error(err, 0) end
  end
  return self
end

-- Runs sql with encoded parameters; returns rows, affected, status or raises.
local function run(self, sql, ...)
  local c, timeout = self._c, self._timeout
  local name = self._stmts[sql]
  local rows, post, affected, status
  if name then
    rows, post, affected, status = cquery_prepared(c, timeout, name, ...)
    local state = rows == nil and affected == "pg_error" and status and status.sqlstate
    if state == "26000" or state == "0A000" then
      -- 26000: the server forgot it (DISCARD ALL). 0A000: "cached plan must not change result
      -- type", after an ALTER TABLE. Either way it did not run: forget it (the next call
      -- prepares it afresh) and, unless a transaction is now aborted, run it unprepared.
      self._stmts[sql], self._nstmts = nil, self._nstmts - 1
      if state == "0A000" then cquery(c, timeout, "deallocate " .. name) end
      if ctxstatus(c) == "idle" then rows, post, affected, status = cquery(c, timeout, sql, ...) end
    end
  elseif self._prepare and self._seen[sql] and self._nstmts < M.MAX_PREPARED then
    self._seq = self._seq + 1
    name = "fibril_" .. self._seq
    local _, msg, code, fields = cprepare(c, timeout, name, sql)
    if msg ~= nil then raise(self, sql, msg, code, fields) end
    self._stmts[sql], self._nstmts = name, self._nstmts + 1
    rows, post, affected, status = cquery_prepared(c, timeout, name, ...)
  else
    if self._prepare and self._nseen < MAX_SEEN then
      self._seen[sql], self._nseen = true, self._nseen + 1
    end
    rows, post, affected, status = cquery(c, timeout, sql, ...)
  end
  if rows == nil and post ~= nil then raise(self, sql, post, affected, status) end
  if post then finish(rows, post) end
  return rows, affected, status
end

local function check(self, sql, who)
  if type(self) ~= "table" or not self._c then
    error("pg: expected a connection (use conn:" .. who .. "(), not conn." .. who .. "())", 3)
  end
  if type(sql) ~= "string" then error("pg: " .. who .. " expects SQL text, got " .. type(sql), 3) end
end

--- Runs one statement with $1..$n parameters sent apart from the SQL; returns its rows (a
--- list of tables keyed by column name; SQL NULL is pg.null), or for a command with no rows
--- an empty list. The second result is the affected row count, the third the command tag.
---@return table rows, number|nil affected, string status
function Conn:query(sql, ...)
  check(self, sql, "query")
  local rows, affected, status = run(self, sql, encode(...))
  return rows or {}, affected, status
end

--- Runs a command; returns the number of rows it affected (0 when it reports none).
---@return number
function Conn:exec(sql, ...)
  check(self, sql, "exec")
  local _, affected = run(self, sql, encode(...))
  return affected or 0
end

local Batch = {}
Batch.__index = Batch

--- Queues a statement in a batch (see Conn:batch).
function Batch:query(sql, ...)
  if type(self) ~= "table" or not self._sql then error("pg: use b:query(), not b.query()", 2) end
  if self._sent then error("pg: this batch was already sent", 2) end
  if type(sql) ~= "string" then error("pg: query expects SQL text, got " .. type(sql), 2) end
  local n = self._n + 1
  self._n = n
  self._sql[n] = sql
  self._params[n] = { n = select("#", ...), encode(...) }
end

-- The entries C sends for a batch: a statement seen before and not prepared yet is prepared
-- in the same round trip ({"p", name, sql} before its {"x", name, ...}).
local function batch_entries(self, b)
  local entries, at, prepared, npending, e = {}, {}, {}, 0, 0
  local pending, sqls = {}, {}
  for i = 1, b._n do
    local sql, params = b._sql[i], b._params[i]
    local name = self._stmts[sql] or pending[sql]
    if not name and self._prepare and self._seen[sql]
       and self._nstmts + npending < M.MAX_PREPARED then
      npending = npending + 1
      self._seq = self._seq + 1               -- names never reused: a failed batch may
      name = "fibril_" .. self._seq           -- still have created one on the server
      pending[sql] = name
      e = e + 1
      entries[e] = { "p", name, sql }
      prepared[e] = sql
      sqls[e] = sql
    elseif not name and self._prepare and self._nseen < MAX_SEEN and not self._seen[sql] then
      self._seen[sql], self._nseen = true, self._nseen + 1
    end
    e = e + 1
    entries[e] = { name and "x" or "q", name or sql, unpack(params, 1, params.n) }
    at[i], sqls[e] = e, sql
  end
  return entries, at, prepared, pending, sqls
end

--- Sends several statements in one round trip (libpq pipeline mode) and returns the list of
--- their rows (rows[i] for the i-th b:query) and the list of affected counts. fn(b) queues
--- them with b:query(sql, ...). Outside a transaction the batch is one implicit transaction:
--- if a statement fails, none of the batch's changes stay, and the first error is raised.
---@return table results, table counts
function Conn:batch(fn)
  if type(self) ~= "table" or not self._c then error("pg: use conn:batch(fn)", 2) end
  if type(fn) ~= "function" then error("pg: batch expects a function", 2) end
  local b = setmetatable({ _n = 0, _sql = {}, _params = {} }, Batch)
  fn(b)
  b._sent = true
  if b._n == 0 then return {}, {} end
  local entries, at, prepared, pending, sqls = batch_entries(self, b)
  local slots, msg, code = cbatch(self._c, self._timeout, entries)
  if not slots then raise(self, "batch of " .. b._n .. " statements", msg, code) end
  for e, sql in next, prepared do
    local slot = slots[e]
    if type(slot) == "table" and not slot.error then
      self._stmts[sql], self._nstmts = pending[sql], self._nstmts + 1
    end
  end
  for e = 1, #entries do             -- the first error, a prepare's included, is the cause
    local slot = slots[e]
    if type(slot) == "table" and slot.error then
      local emsg = slot.error
      slot.error = nil
      raise(self, sqls[e], emsg, slot.code, slot)
    end
  end
  local results, counts = {}, {}
  for i = 1, b._n do
    local slot = slots[at[i]]
    local rows = slot[1] or {}
    if slot[2] then finish(rows, slot[2]) end
    results[i], counts[i] = rows, slot[3] or 0
  end
  return results, counts
end

--- Closes the connection (idempotent); a query running on it is cancelled on the server.
function Conn:close() cclose(self._c) end

--- "idle", "busy", "draining" (a cancelled query finishing), "dead" or "closed". With
--- check true, an idle connection first reads what arrived, to notice a server that left.
function Conn:state(check_socket) return cstate(self._c, check_socket) end

---@return boolean true once closed, or dead (the server went away, a limit was passed)
function Conn:is_closed()
  local s = cstate(self._c)
  return s == "dead" or s == "closed"
end

---@return string "idle", "intrans", "inerror", "active" or "unknown" (libpq's view)
function Conn:txstatus() return ctxstatus(self._c) end

---@return number the server process serving this connection (pg_backend_pid())
function Conn:pid()
  local _, pid = cinfo(self._c)
  return pid
end

---@return string "127.0.0.1:5432" or the socket directory
function Conn:where() return self._where end

--- Waits (up to timeout s) for a cancelled query to finish; true when idle again.
function Conn:wait_idle(timeout)
  local ok = m.wait_idle(self._c, timeout)
  return ok == true
end

function Conn:__tostring()
  return "pg connection " .. self._where .. " (" .. cstate(self._c) .. ")"
end

return M
