--- fibril.process: child processes for fibers (spawn, wait, kill), this process's pid and
--- parent pid, signal traps, and a TCP port held without listening (for fibril.workers).
--- wait suspends only the calling fiber. Failures raise error objects ({ code, message }).
local core = require "fibril.core.process"
local fcore = require "fibril.core.fiber"

local type, error, setmetatable, tostring, ipairs, pairs, getmetatable =
      type, error, setmetatable, tostring, ipairs, pairs, getmetatable
local floor = math.floor
local m = core.methods
local cspawn, ckill, creserve = core.spawn, core.kill, core.reserve_port
local cpid, cwait, cpkill, cexited, cclose, cis_closed =
      m.pid, m.wait, m.kill, m.exited, m.close, m.is_closed
local new_error, ERROR_MT = fcore.error, fcore.error_metatable

local M = {}

local Process = {}
Process.__index = Process

local Reservation = {}
Reservation.__index = Reservation

local function raise(msg, code)
  error(new_error(code, msg), 0)
end

local function check_signal(sig, who)
  if sig ~= nil and type(sig) ~= "string" and type(sig) ~= "number" then
    error(who .. ": signal must be a name (\"SIGTERM\", \"TERM\") or a number", 3)
  end
  return sig
end

--- Starts a child process.
---@param opts table { file = "/bin/sh" (or opts[1]; searched on PATH without a '/'),
---   args = { "-c", "exit 3" } (argv[1..]), env = { NAME = "value" } (added to this
---   process's environment), cwd = dir, stdio = "inherit" (default) | "ignore",
---   detached = true (a new session: a terminal's Ctrl-C does not reach it) }
---@return table process with pid(), wait([timeout]), kill([signal]), exited(), close()
---@usage local p = process.spawn{ "/bin/sh", args = { "-c", "exit 3" } }; p:wait() --> 3
function M.spawn(opts)
  if type(opts) ~= "table" then error("process.spawn: expected a table of options", 2) end
  local file = opts.file or opts[1]
  if type(file) ~= "string" or file == "" then
    error("process.spawn: file must be a non-empty string", 2)
  end
  if opts.args ~= nil then
    if type(opts.args) ~= "table" then error("process.spawn: args must be a list of strings", 2) end
    for i, a in ipairs(opts.args) do
      if type(a) ~= "string" then error("process.spawn: args[" .. i .. "] must be a string", 2) end
    end
  end
  if opts.env ~= nil then
    if type(opts.env) ~= "table" then error("process.spawn: env must be a table of strings", 2) end
    for k, v in pairs(opts.env) do
      if type(k) ~= "string" or type(v) ~= "string" then
        error("process.spawn: env names and values must be strings", 2)
      end
    end
  end
  local p, msg, code = cspawn(opts)
  if not p then raise("process: cannot run '" .. file .. "': " .. tostring(msg), code) end
  return setmetatable({ _p = p, _pid = cpid(p), _file = file }, Process)
end

local function proc_of(self)
  local p = type(self) == "table" and self._p
  if not p then error("process: expected a process (use p:method(), not p.method())", 3) end
  if cis_closed(p) then error("process: the process object is closed", 3) end
  return p
end

---@return integer the child's pid (still known after close)
function Process:pid()
  if type(self) ~= "table" or not self._pid then error("process: expected a process", 2) end
  return self._pid
end

--- Suspends the calling fiber until the child exits (at once if it has). Raises
--- err.code == "timeout" past timeout (the child keeps running), or "cancelled".
---@param timeout number|nil seconds; nil waits for as long as it takes
---@return integer exit_status, string|nil signal the name of the signal that ended it ("SIGKILL")
function Process:wait(timeout)
  local p = proc_of(self)
  if timeout ~= nil and (type(timeout) ~= "number" or not (timeout >= 0)) then
    error("process.wait: timeout must be a non-negative number of seconds", 2)
  end
  local status, sig, code = cwait(p, timeout)
  if status == nil then
    if getmetatable(sig) == ERROR_MT then
      if sig.code == "timeout" then
        sig.message = "process.wait: pid " .. self._pid .. " still running after " .. timeout .. " s"
      end
      error(sig, 0)
    end
    raise("process.wait: " .. tostring(sig) .. " (pid " .. self._pid .. ")", code)
  end
  return status, sig
end

--- Sends a signal (default SIGTERM).
---@param sig string|number|nil "SIGTERM", "TERM", 15
---@return boolean true when sent, false when the child has already exited
function Process:kill(sig)
  local p = proc_of(self)
  local ok, msg, code = cpkill(p, check_signal(sig, "process.kill"))
  if ok then return true end
  if code == "ESRCH" then return false end
  raise("process.kill: " .. tostring(msg) .. " (pid " .. self._pid .. ")", code)
end

---@return boolean exited, integer|nil exit_status, string|nil signal
function Process:exited()
  return cexited(proc_of(self))
end

--- Releases the handle. Idempotent. Does not signal the child: one still running runs on
--- unobserved. A fiber in wait() raises err.code == "closed".
function Process:close()
  if type(self) ~= "table" or not self._p then error("process: expected a process", 2) end
  cclose(self._p)
end

function Process:__tostring()
  return "process " .. self._pid .. " (" .. self._file .. ")"
end

---@return integer this process's pid
M.pid = core.pid

---@return integer the parent's pid (1, or a subreaper's, once the parent has died)
M.ppid = core.ppid

--- Sends a signal (default SIGTERM) to any process.
---@return boolean true when sent, false when there is no such process
function M.kill(pid, sig)
  if type(pid) ~= "number" or pid < 1 or pid ~= floor(pid) then
    error("process.kill: pid must be a positive integer", 2)
  end
  local ok, msg, code = ckill(pid, check_signal(sig, "process.kill"))
  if ok then return true end
  if code == "ESRCH" then return false end
  raise("process.kill: " .. tostring(msg) .. " (pid " .. pid .. ")", code)
end

--- Holds a TCP port without listening on it: the socket is bound with SO_REUSEPORT, so
--- servers that set SO_REUSEPORT too (fibril's workers) can listen on the same port, while
--- other programs cannot take it. Connections go only to the listeners.
---@param host string an IPv4 or IPv6 address
---@param port integer 0 picks a free port
---@return table reservation with port() and close()
function M.reserve_port(host, port)
  if type(host) ~= "string" then error("process.reserve_port: host must be a string", 2) end
  if type(port) ~= "number" or port < 0 or port > 65535 or port ~= floor(port) then
    error("process.reserve_port: port must be an integer from 0 to 65535", 2)
  end
  local r, msg, code = creserve(host, port)
  if not r then
    local where = (host:find(":", 1, true) and "[" .. host .. "]" or host) .. ":" .. port
    if code == "EADDRINUSE" then msg = "address already in use" end
    raise("process: cannot reserve " .. where .. ": " .. tostring(msg), code)
  end
  return setmetatable({ _r = r }, Reservation)
end

---@return integer the reserved port
function Reservation:port() return self._r:port() end

--- Releases the port. Idempotent.
function Reservation:close() self._r:close() end

local Trap = {}
Trap.__index = Trap

--- Traps a signal: while the trap is open the signal never takes its default action (for
--- SIGTERM, ending the process) in this process. It still wakes every fiber in
--- `signal.wait`, and is otherwise ignored. A server that has begun draining on its first
--- SIGTERM keeps one so that a repeated SIGTERM does not kill it.
---@param sig string|number "SIGTERM", "TERM", 15
---@return table trap with close() (idempotent; the garbage collector closes it too)
function M.trap(sig)
  if type(sig) ~= "string" and type(sig) ~= "number" then
    error("process.trap: signal must be a name (\"SIGTERM\", \"TERM\") or a number", 2)
  end
  local t, msg, code = core.trap(sig)
  if not t then raise("process.trap: " .. tostring(msg), code) end
  return setmetatable({ _t = t }, Trap)
end

--- Releases the trap: the signal's default action applies again when nothing else handles it.
function Trap:close() self._t:close() end

--- Child process objects not yet freed, reserved ports open and traps not yet freed (all
--- return to 0).
---@return integer processes, integer ports, integer traps
M.live = core.live

return M
