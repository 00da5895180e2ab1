--- fibril.redis.conn: one Redis connection for fibers (hiredis async on the loop), as
--- redis.connect returns it. A command suspends only the calling fiber; several fibers may
--- share one connection, each reply goes to its command. Failures raise error objects
--- ({ code, message }). fibril.redis (the pool and the module) builds on it; docs/redis.md.
local core = require "fibril.core.redis"
local fcore = require "fibril.core.fiber"
local url = require "fibril.url"

local type, error, setmetatable, tostring, tonumber, getmetatable, select, rawset =
      type, error, setmetatable, tostring, tonumber, getmetatable, select, rawset
local sub, upper, lower, find, match, floor = string.sub, string.upper, string.lower,
      string.find, string.match, math.floor
local cconnect = core.connect
local m = core.methods
local ccall, cpipeline, cclose, cstate = m.call, m.pipeline, m.close, m.state
local csubscribe, cnext = m.subscribe, m.next_message
local new_error, ERROR_MT = fcore.error, fcore.error_metatable
local decode = url.decode

local M = {}

--- Stands for a nil inside an array reply or a pipeline's list of replies, so the list keeps
--- its length. It is the same value as fibril.json.null (a NULL lightuserdata).
M.null = core.null
--- Default bound on the array elements one reply may hold (nested arrays summed).
M.MAX_ELEMENTS = core.MAX_ELEMENTS
--- Defaults, in seconds: connect (DNS, TCP, AUTH, SELECT) and each command.
M.CONNECT_TIMEOUT = 5
M.TIMEOUT = 5

--- True when v is an error object (an error reply in a pipeline slot or an array).
---@param v any
---@return boolean
function M.is_error(v) return getmetatable(v) == ERROR_MT end

-- "Connection refused" -> "connection refused"
local function lcfirst(s) return lower(sub(s, 1, 1)) .. sub(s, 2) end

-- Raises for a failed connect: msg, code from C, or the scheduler's timeout/cancel object.
local function raise_connect(where, msg, code)
  if getmetatable(msg) == ERROR_MT then
    local after = msg.code == "timeout" and type(msg.message) == "string"
                  and match(msg.message, "timed out (after .*)$")
    if after then msg.message = "redis: connect timed out " .. after .. " (" .. where .. ")" end
    error(msg, 0)
  end
  msg = tostring(msg)
  if code == "auth" or code == "redis_error" or code == "connection_lost" then
    error(new_error(code, "redis: " .. msg .. (find(msg, where, 1, true) and ""
                                                or " (" .. where .. ")")), 0)
  end
  error(new_error(code, "redis: " .. lcfirst(msg) .. " (" .. where .. ")"), 0)
end

-- Parses "redis://[user:password@]host[:port][/db]" or "unix:///path/to.sock?db=N".
-- Returns { host=, port=, path=, user=, password=, db= } or raises at level 3.
local function parse_url(s)
  if type(s) ~= "string" then error("redis.connect: url must be a string", 3) end
  local scheme, rest = match(s, "^(%a+)://(.*)$")
  scheme = scheme and lower(scheme)
  local t = { db = 0 }
  if scheme == "unix" then
    local path, query = match(rest, "^([^?]*)%??(.*)$")
    if path == "" or sub(path, 1, 1) ~= "/" then
      error("redis.connect: a unix URL needs an absolute path (unix:///path/to.sock)", 3)
    end
    t.path = decode(path)
    local q = url.parse_query(query)
    if q.db then t.db = tonumber(q.db) end
    if q.password then t.password = q.password end
    if q.user then t.user = q.user end
  elseif scheme == "redis" then
    local authority, db = match(rest, "^([^/?]*)/?([^?]*)")
    local auth, hostport = match(authority, "^(.*)@(.*)$")
    if auth then
      local u, p = match(auth, "^([^:]*):(.*)$")
      if u then
        t.user = u ~= "" and decode(u) or nil
        t.password = decode(p)
      else
        t.password = decode(auth)                    -- redis://password@host, as some tools
      end
    else
      hostport = authority
    end
    local host, port = match(hostport, "^%[([^%]]+)%]:?(%d*)$")
    if not host then host, port = match(hostport, "^([^:]*):?(%d*)$") end
    if not host or host == "" then error("redis.connect: no host in URL '" .. s .. "'", 3) end
    t.host = host
    t.port = port ~= "" and tonumber(port) or 6379
    if db ~= "" then t.db = tonumber(db) end
  else
    error("redis.connect: URL must start with redis:// or unix:// (got '" .. s .. "')", 3)
  end
  if not t.db or t.db ~= floor(t.db) or t.db < 0 then
    error("redis.connect: database must be a non-negative integer in '" .. s .. "'", 3)
  end
  if t.port and (t.port < 1 or t.port > 65535) then
    error("redis.connect: port must be 1..65535 in '" .. s .. "'", 3)
  end
  return t
end

M.parse_url = function(s) return parse_url(s) end

--- "host:port" or the socket path of a URL, as error messages name it.
---@param u string
---@return string
function M.where_of(u)
  local t = parse_url(u)
  return t.path or ((find(t.host, ":", 1, true) and "[" .. t.host .. "]" or t.host) .. ":" .. t.port)
end

local function check_timeout(t, who, default)
  if t == nil then return default end
  if t == false then return nil end
  if type(t) ~= "number" or not (t >= 0) then
    error(who .. ": timeout must be a non-negative number of seconds (or false)", 3)
  end
  return t
end

local Conn = {}
local Pipeline = {}
M.Conn = Conn

-- Blocking commands and where their blocking time is: "last" or "first" argument in seconds,
-- "BLOCK" the argument after BLOCK in milliseconds, "last_ms" the last in milliseconds.
local BLOCKING = {
  BLPOP = "last", BRPOP = "last", BRPOPLPUSH = "last", BLMOVE = "last", BZPOPMIN = "last",
  BZPOPMAX = "last", BLMPOP = "first", BZMPOP = "first", XREAD = "BLOCK",
  XREADGROUP = "BLOCK", WAIT = "last_ms", WAITAOF = "last_ms",
}

local function block_ms(...)
  for i = 1, select("#", ...) - 1 do
    local a = select(i, ...)
    if type(a) == "string" and upper(a) == "BLOCK" then return tonumber((select(i + 1, ...))) end
  end
end

--- How long cmd may block on the server, in seconds: nil for a command that does not block,
--- 0 for one that blocks until data comes (BLPOP k 0, XREAD BLOCK 0).
---@param cmd string
---@return number|nil
function M.blocking(cmd, ...)
  local where = BLOCKING[cmd] or BLOCKING[upper(cmd)]
  if not where then return nil end
  local n = select("#", ...)
  if where == "BLOCK" then
    local ms = block_ms(...)
    return ms and ms / 1000
  end
  local t = n > 0 and tonumber((select(where == "first" and 1 or n, ...)))
  if t and where == "last_ms" then t = t / 1000 end
  return t or 0
end

-- The client-side deadline of a command: a blocking one gets its blocking time on top of the
-- connection's timeout, and none at all when it may block forever.
local function deadline(timeout, cmd, ...)
  local b = M.blocking(cmd, ...)
  if not b then return timeout end
  if b <= 0 or not timeout then return nil end
  return timeout + b
end

-- A method generated on first use: conn:hset(...) is conn:call("HSET", ...).
local function command_method(proto, name)
  if type(name) ~= "string" or not find(name, "^%a[%w_]*$") then return nil end
  local cmd = upper(name)
  local f = function(self, ...) return self:call(cmd, ...) end
  rawset(proto, name, f)
  return f
end

-- Instances index the method tables directly (a plain table chain the JIT follows); only a
-- name missing there reaches the generator, once.
setmetatable(Conn, { __index = command_method })
setmetatable(Pipeline, { __index = command_method })
local ConnMT = { __index = Conn }
local PipeMT = { __index = Pipeline }

--- Connects and, when the URL says so, authenticates (AUTH password, or AUTH user password
--- for a Redis 6 ACL user) and selects the database.
---@param u string "redis://[user:password@]host[:port][/db]" or "unix:///path.sock?db=N"
---@param opts table|nil { connect_timeout = s (default 5), timeout = s per command (default
---   5; false = none), password =, user =, db = (override the URL), max_elements = n }
---@return table conn
---@usage local conn = redis.connect("redis://127.0.0.1:6379/0", { timeout = 2 })
function M.connect(u, opts)
  if opts ~= nil and type(opts) ~= "table" then error("redis.connect: opts must be a table", 2) end
  opts = opts or {}
  local t = parse_url(u)
  if opts.password ~= nil then t.password = opts.password end
  if opts.user ~= nil then t.user = opts.user end
  if opts.db ~= nil then t.db = opts.db end
  local ctimeout = check_timeout(opts.connect_timeout, "redis.connect", M.CONNECT_TIMEOUT)
  local timeout = check_timeout(opts.timeout, "redis.connect", M.TIMEOUT)
  local maxel = opts.max_elements
  if maxel ~= nil and (type(maxel) ~= "number" or maxel < 1 or maxel ~= floor(maxel)) then
    error("redis.connect: max_elements must be a positive integer", 2)
  end
  local where = M.where_of(u)
  local c, msg, code = cconnect(t.host, t.path and nil or t.port, t.path, ctimeout,
                                t.password, t.user, t.db, maxel)
  if not c then raise_connect(where, msg, code) end
  return setmetatable({ _c = c, _where = where, _timeout = timeout }, ConnMT)
end

-- The C connection of self, raising at the level of the caller of a method.
local function conn_of(self)
  local c = type(self) == "table" and self._c
  if not c then error("redis: expected a connection (use conn:method(), not conn.method())", 3) end
  if cstate(c) == "closed" then
    error(new_error("closed", "redis: connection is closed (" .. self._where .. ")"), 3)
  end
  return c
end

-- Raises for a failed command: C's (nil, msg, code), or the scheduler's timeout/cancel.
local function raise_call(self, what, msg, code)
  if getmetatable(msg) == ERROR_MT then
    if msg.code == "timeout" then
      -- The reply may still come and would answer the next command: C closed the connection.
      local after = type(msg.message) == "string" and match(msg.message, "timed out (after .*)$")
      msg.message = "redis: " .. what .. " timed out " .. (after or "") .. " (" .. self._where
                    .. "); the connection was closed"
    end
    error(msg, 0)
  end
  msg = tostring(msg)
  if code == "redis_error" then error(new_error(code, "redis: " .. msg), 0) end
  if not find(msg, self._where, 1, true) then msg = msg .. " (" .. self._where .. ")" end
  error(new_error(code, "redis: " .. msg), 0)
end

--- Sends one command and returns its reply: status and bulk strings as strings, integers as
--- numbers (beyond +-2^53 as decimal strings), nil as nil, arrays as lists (nil elements as
--- redis.null). An error reply raises ("redis: WRONGTYPE ...", code "redis_error").
---@param cmd string the command name ("SET", "HGETALL", ...)
---@param ... string|number arguments, each sent as one binary-safe argv element
---@return any reply
---@usage conn:call("SET", "k", "v", "EX", 60)
function Conn:call(cmd, ...)
  local c = conn_of(self)
  if type(cmd) ~= "string" or cmd == "" then error("redis: command must be a non-empty string", 2) end
  for i = 1, select("#", ...) do
    local a = select(i, ...)
    local ta = type(a)
    if ta ~= "string" and ta ~= "number" then
      error("redis: " .. cmd .. " argument " .. i .. " must be a string or a number, got " .. ta, 2)
    end
  end
  local v, msg, code = ccall(c, deadline(self._timeout, cmd, ...), cmd, ...)
  if v == nil and msg ~= nil then raise_call(self, upper(cmd), msg, code) end
  return v
end

--- Runs fn(p), where p queues commands (p:call(cmd, ...) or p:incr(k) ...), then sends them
--- all in one write and returns their replies in order. An error reply stands in its slot as
--- an error object (redis.is_error(v)); a nil reply as redis.null. Nothing is sent if fn raises.
---@param fn function
---@return table replies
---@usage local r = conn:pipeline(function(p) p:incr("a"); p:get("b") end)
function Conn:pipeline(fn)
  local c = conn_of(self)
  if type(fn) ~= "function" then error("redis: pipeline expects a function", 2) end
  local p = setmetatable({ _cmds = {}, _n = 0, _closed = false }, PipeMT)
  fn(p)
  p._closed = true
  local v, msg, code = cpipeline(c, self._timeout, p._cmds)
  if v == nil then raise_call(self, "pipeline of " .. p._n .. " commands", msg, code) end
  return v
end

--- Queues a command in a pipeline (generated methods such as p:set(k, v) call this).
---@param cmd string
---@param ... string|number
function Pipeline:call(cmd, ...)
  if type(self) ~= "table" or not self._cmds then error("redis: use p:call(), not p.call()", 2) end
  if self._closed then error("redis: this pipeline was already sent", 2) end
  if type(cmd) ~= "string" or cmd == "" then error("redis: command must be a non-empty string", 2) end
  local argv = { cmd, ... }
  for i = 2, select("#", ...) + 1 do
    local a = argv[i]
    if type(a) ~= "string" then
      if type(a) ~= "number" then
        error("redis: " .. cmd .. " argument " .. (i - 1) .. " must be a string or a number, got "
              .. type(a), 2)
      end
      argv[i] = tostring(a)
    end
  end
  local n = self._n + 1
  self._n = n
  self._cmds[n] = argv
end

--- Closes the connection (idempotent). Fibers waiting on it raise "redis: connection is
--- closed"; later calls raise the same.
function Conn:close()
  if type(self) ~= "table" or not self._c then error("redis: expected a connection", 2) end
  cclose(self._c)
end

--- True once closed by close(), or dropped: after a command timed out or was cancelled, or
--- when the server went away. Only close() is left to call on a dropped connection.
---@return boolean
function Conn:is_closed() return cstate(self._c) ~= "open" end

---@return string the server address, "127.0.0.1:6379" or the socket path
function Conn:where() return self._where end

--- Sends SUBSCRIBE, PSUBSCRIBE, UNSUBSCRIBE or PUNSUBSCRIBE (kind in lower case) without
--- waiting: confirmations come through next_message. From the first, the connection carries
--- subscriptions only. fibril.redis's subscriber is built on these two.
---@param kind string
---@param ... string channels or patterns
function Conn:send_subscription(kind, ...)
  local c = conn_of(self)
  local ok, msg, code = csubscribe(c, kind, ...)
  if not ok then raise_call(self, upper(kind), msg, code) end
end

--- The next pushed reply of a subscribed connection, waiting up to timeout seconds (nil:
--- forever): "message", channel, payload | "pmessage", channel, payload, pattern |
--- "subscribe" (or another confirmation), name, count | "dropped", nil, n (n messages were
--- dropped: the reader fell more than 64 MiB behind). Returns nil on timeout; raises once the
--- connection is gone and nothing is left to read.
---@param timeout number|nil
function Conn:next_message(timeout)
  local c = conn_of(self)
  local kind, a, b, d = cnext(c, timeout)
  if kind == nil then
    if getmetatable(a) == ERROR_MT and a.code == "timeout" then return nil end
    raise_call(self, "read of subscriptions", a, b)
  end
  return kind, a, b, d
end

function ConnMT.__tostring(self)
  return "redis connection " .. self._where .. (cstate(self._c) ~= "open" and " (closed)" or "")
end

--- Connection structs plus poll handles, and commands in flight, in the whole process
--- (both return to their baseline when nothing leaks).
---@return integer conns, integer requests
M.live = core.live

return M
