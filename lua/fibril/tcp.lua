--- fibril.tcp: TCP client sockets for fibers. A read, a connect or a write past the
--- high-water mark suspends only the calling fiber. Failures raise error objects
--- ({ code, message }) naming the peer; docs/tcp.md is the guide.
local core = require "fibril.core.tcp"
local fcore = require "fibril.core.fiber"

local type, error, setmetatable, tostring, tonumber, getmetatable =
      type, error, setmetatable, tostring, tonumber, getmetatable
local sub, floor = string.sub, math.floor
local cconnect = core.connect
local m = core.methods
local cread, cwrite, cshutdown, cclose, cpeer, cstats, cis_closed =
      m.read, m.write, m.shutdown, m.close, m.peer, m.stats, m.is_closed
local new_error, ERROR_MT = fcore.error, fcore.error_metatable

local M = {}

--- The read buffer's default (and largest) limit, and the default write high-water mark.
M.READ_LIMIT = core.READ_LIMIT
M.HIGH_WATER = core.HIGH_WATER
--- Seconds a connect may take (resolving included) when opts.timeout is not given.
M.CONNECT_TIMEOUT = 30

local Socket = {}
Socket.__index = Socket

-- Codes that mean the peer went away: reported as "connection closed".
local CLOSED = { EPIPE = true, ECONNRESET = true, ENOTCONN = true, ECONNABORTED = true }

-- Raises for a failed call: msg is C's (nil, msg, code) message, or the scheduler's error
-- object for a timeout or a cancel. what names the operation ("read", "connect").
local function raise(where, what, msg, code)
  if getmetatable(msg) == ERROR_MT then
    local after = msg.code == "timeout" and type(msg.message) == "string"
                  and msg.message:match("timed out (after .*)$")
    if after then msg.message = "tcp: " .. what .. " timed out " .. after .. " (" .. where .. ")" end
    error(msg, 0)
  end
  msg = tostring(msg)
  if code == "closed" and msg == "connection is closed" then
    msg = "tcp: connection is closed (" .. where .. ")"
  elseif CLOSED[code] then
    msg = "tcp: connection closed (" .. where .. ": " .. msg .. ")"
  else
    msg = "tcp: " .. msg .. " (" .. where .. ")"
  end
  error(new_error(code, msg), 0)
end

local function check_opts(opts, who)
  if opts ~= nil and type(opts) ~= "table" then
    error(who .. ": options must be a table", 3)
  end
  return opts or {}
end

local function check_size(v, who, name, default)
  if v == nil then return default end
  if type(v) ~= "number" or v < 0 or v ~= floor(v) then
    error(who .. ": " .. name .. " must be a non-negative integer", 3)
  end
  return v
end

local function check_timeout(t, who, default)
  if t == nil then return default end
  if t == false then return nil end
  if type(t) ~= "number" or not (t >= 0) then
    error(who .. ": timeout must be a non-negative number of seconds", 3)
  end
  return t
end

--- Connects to host:port, resolving a name without blocking the loop; every address the
--- name has is tried in turn.
---@param host string an IPv4/IPv6 address or a name ("localhost", "[::1]")
---@param port integer 1..65535
---@param opts table|nil { timeout = s (default 30, false = none; covers resolving),
---   read_timeout = s (default for reads), read_limit = bytes (default and max 16 MiB),
---   write_high_water = bytes (default 256 KiB) }
---@return table socket
---@usage local sock = tcp.connect("127.0.0.1", 6379, { timeout = 5 })
function M.connect(host, port, opts)
  opts = check_opts(opts, "tcp.connect")
  if type(host) ~= "string" or host == "" then
    error("tcp.connect: host must be a non-empty string", 2)
  end
  if type(port) == "string" then port = tonumber(port) end
  if type(port) ~= "number" or port ~= floor(port) or port < 1 or port > 65535 then
    error("tcp.connect: port must be an integer from 1 to 65535", 2)
  end
  local timeout = check_timeout(opts.timeout, "tcp.connect", M.CONNECT_TIMEOUT)
  local read_limit = check_size(opts.read_limit, "tcp.connect", "read_limit", M.READ_LIMIT)
  if read_limit < 1 or read_limit > M.READ_LIMIT then
    error("tcp.connect: read_limit must be from 1 to " .. M.READ_LIMIT .. " bytes", 2)
  end
  local hwm = check_size(opts.write_high_water, "tcp.connect", "write_high_water", M.HIGH_WATER)
  local read_timeout = check_timeout(opts.read_timeout, "tcp.connect", nil)
  local name = host
  if sub(host, 1, 1) == "[" and sub(host, -1) == "]" then name = sub(host, 2, -2) end
  local where = (name:find(":", 1, true) and "[" .. name .. "]" or name) .. ":" .. port
  local s, msg, code = cconnect(name, port, timeout, read_limit, hwm)
  if not s then
    if type(code) == "string" and sub(code, 1, 4) == "EAI_" then
      error(new_error(code, "tcp: cannot resolve '" .. name .. "': " .. tostring(msg)), 0)
    end
    raise(where, "connect", msg, code)
  end
  return setmetatable({ _s = s, _peer = cpeer(s), _read_timeout = read_timeout }, Socket)
end

-- The C socket of self, raising at the level of the caller of a method.
local function sock_of(self)
  local s = type(self) == "table" and self._s
  if not s then error("tcp: expected a socket (use sock:method(), not sock.method())", 3) end
  if cis_closed(s) then error("tcp: connection is closed", 3) end
  return s
end

-- The timeout of a read: opts.timeout, else the connection's read_timeout.
local function read_timeout(self, opts, who)
  if opts ~= nil and type(opts) ~= "table" then error(who .. ": options must be a table", 3) end
  local t = opts and opts.timeout
  if t == nil then return self._read_timeout end
  if t == false then return nil end
  if type(t) ~= "number" or not (t >= 0) then
    error(who .. ": timeout must be a non-negative number of seconds", 3)
  end
  return t
end

-- (data) | (nil) at EOF | raises.
local function read(self, s, mode, n, timeout)
  local data, msg, code = cread(s, mode, n, timeout)
  if data == nil and msg ~= nil then raise(self._peer, "read", msg, code) end
  return data
end

--- Returns the next bytes available (any amount), suspending until some arrive.
---@param opts table|nil { timeout = s }
---@return string|nil data, nil at end of stream
function Socket:read(opts)
  local s = sock_of(self)
  return read(self, s, "chunk", nil, read_timeout(self, opts, "sock:read"))
end

--- Returns the bytes up to the next "\n", without the "\n" or "\r\n". At end of stream
--- the remaining bytes come back as a last line, then nil.
---@param opts table|nil { timeout = s }
---@return string|nil line
function Socket:read_line(opts)
  local s = sock_of(self)
  return read(self, s, "line", nil, read_timeout(self, opts, "sock:read_line"))
end

--- Returns exactly n bytes; raises "tcp: connection closed after k of n bytes" when the
--- stream ends first (the k bytes stay buffered for read()).
---@param n integer 0..read_limit
---@param opts table|nil { timeout = s }
---@return string
function Socket:read_bytes(n, opts)
  local s = sock_of(self)
  if type(n) ~= "number" or n < 0 or n ~= floor(n) then
    error("sock:read_bytes: n must be a non-negative integer", 2)
  end
  return read(self, s, "bytes", n, read_timeout(self, opts, "sock:read_bytes"))
end

--- Returns everything until the peer ends the stream ("" when nothing came).
---@param opts table|nil { timeout = s }
---@return string
function Socket:read_all(opts)
  local s = sock_of(self)
  return read(self, s, "all", nil, read_timeout(self, opts, "sock:read_all"))
end

--- Sends data (any bytes). Returns once no more than the high-water mark is unsent; the
--- bytes past it are queued in order. A timeout or cancel leaves them queued.
---@param data string
---@param opts table|nil { timeout = s }
---@return boolean true
function Socket:write(data, opts)
  local s = sock_of(self)
  if type(data) ~= "string" then
    error("sock:write: data must be a string, got " .. type(data), 2)
  end
  opts = check_opts(opts, "sock:write")
  local ok, msg, code = cwrite(s, data, check_timeout(opts.timeout, "sock:write", nil))
  if not ok then raise(self._peer, "write", msg, code) end
  return true
end

--- Half-closes: sends FIN once every queued byte is out, and waits for that. The peer sees
--- end of stream; reading still works.
---@param opts table|nil { timeout = s }
function Socket:shutdown(opts)
  local s = sock_of(self)
  opts = check_opts(opts, "sock:shutdown")
  local ok, msg, code = cshutdown(s, check_timeout(opts.timeout, "sock:shutdown", nil))
  if not ok then raise(self._peer, "shutdown", msg, code) end
end

--- Closes the socket at once (bytes still queued are dropped: shutdown() first to flush).
--- Idempotent; fibers waiting on it raise "tcp: connection is closed".
function Socket:close()
  if type(self) ~= "table" or not self._s then error("tcp: expected a socket", 2) end
  cclose(self._s)
end

---@return boolean
function Socket:is_closed() return cis_closed(self._s) end

---@return string the peer address, "127.0.0.1:8080" or "[::1]:8080"
function Socket:peer()
  sock_of(self)
  return self._peer
end

--- Counters for tests and monitoring.
---@return table { queued = unsent bytes, buffered = received bytes not yet read,
---   read_limit = n, high_water = n }
function Socket:stats()
  local queued, buffered, limit, hwm = cstats(sock_of(self))
  return { queued = queued, buffered = buffered, read_limit = limit, high_water = hwm }
end

function Socket:__tostring()
  return "tcp socket " .. self._peer .. (cis_closed(self._s) and " (closed)" or "")
end

--- Open sockets and requests in flight in the whole process (both return to 0).
---@return integer handles, integer requests
M.live = core.live

return M
