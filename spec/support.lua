-- spec/support.lua: helpers shared by specs: run the fibril binary as a child process and
-- write throw-away files. Child processes are awaited with a blocking popen: the child is a
-- separate process, so the spec only pauses its own loop while the child runs.
local M = {}

M.fibril = os.getenv("FIBRIL_BIN") or require("fibril.core.vm").executable()

local tmpdir, remover
function M.tmpdir()
  if not tmpdir then
    local p = io.popen("mktemp -d /tmp/fibril-spec.XXXXXX")
    tmpdir = p:read("*l")
    p:close()
    -- Removed when the Lua state closes (the end of `fibril test`).
    remover = newproxy(true)
    getmetatable(remover).__gc = function() os.execute("rm -rf '" .. tmpdir .. "'") end
  end
  return tmpdir
end

--- Writes content to a file under the spec temp dir and returns its path.
function M.write(name, content)
  local path = M.tmpdir() .. "/" .. name
  local dir = path:match("^(.*)/[^/]*$")
  os.execute("mkdir -p '" .. dir .. "'")
  local f = assert(io.open(path, "w"))
  f:write(content)
  f:close()
  return path
end

local function read_all(path)
  local f = io.open(path, "r")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

--- The value of an environment variable that scripts/with-services sets (REDIS_URL,
--- DATABASE_URL, FIBRIL_PG_CTL...). A spec that claims to test a real server never skips it:
--- without the variable it raises, naming the way to run it.
function M.service_env(name)
  local v = os.getenv(name)
  if not v or v == "" then
    error(name .. " is not set: run the specs through scripts/with-services (make test does)", 2)
  end
  return v
end

--- Runs `fibril ARGS` (a shell-quoted string); returns exit status, stdout, stderr.
function M.run(args)
  local out, err = M.tmpdir() .. "/run.out", M.tmpdir() .. "/run.err"
  local p = io.popen(("%s %s >%s 2>%s; echo $?"):format(M.fibril, args, out, err))
  local status = tonumber(p:read("*l"))
  p:close()
  return status, read_all(out), read_all(err)
end

--- Like run, with environment assignments before the command ("A='1' B='2' ").
function M.run_env(env_prefix, args)
  local out, err = M.tmpdir() .. "/run.out", M.tmpdir() .. "/run.err"
  local p = io.popen(("%s%s %s >%s 2>%s; echo $?"):format(env_prefix, M.fibril, args, out, err))
  local status = tonumber(p:read("*l"))
  p:close()
  return status, read_all(out), read_all(err)
end

--- Runs a Lua script given as a string in a fresh fibril process.
function M.run_script(source, args)
  local path = M.write("script_" .. tostring(os.time()) .. math.random(1e9) .. ".lua", source)
  return M.run("'" .. path .. "'" .. (args and (" " .. args) or ""))
end

--- Counts the non-overlapping occurrences of a plain string.
function M.count(haystack, needle)
  local n, i = 0, 1
  while true do
    local s, e = haystack:find(needle, i, true)
    if not s then return n end
    n, i = n + 1, e + 1
  end
end

-- ---- HTTP helpers: a server in this process, raw clients through fibril.tcp ----------------

--- Starts fibril's HTTP server on a free port with handler(req, res); returns server, port.
function M.http_server(handler, opts)
  local http = require "fibril.core.http"
  local o = { host = "127.0.0.1", port = 0, handler = handler, access_log = false }
  for k, v in pairs(opts or {}) do o[k] = v end
  local srv = assert(http.listen(o))
  return srv, srv:port()
end

--- Reads one HTTP response from sock: { status, reason, headers (lowercased), body }.
--- Handles Content-Length, chunked and close-delimited bodies; `head` skips the body.
function M.read_response(sock, head)
  local line = sock:read_line({ timeout = 5 })
  if not line then return nil end
  local version, status, reason = line:match("^(HTTP/%d%.%d) (%d%d%d) ?(.*)$")
  assert(status, "not a status line: " .. line)
  local headers = {}
  while true do
    local h = assert(sock:read_line({ timeout = 5 }))
    if h == "" then break end
    local k, v = h:match("^([^:]+):%s*(.*)$")
    k = k:lower()
    headers[k] = headers[k] and (headers[k] .. ", " .. v) or v
  end
  local res = { version = version, status = tonumber(status), reason = reason, headers = headers }
  local code = res.status
  if head or code == 204 or code == 304 or (code >= 100 and code < 200) then
    res.body = ""
  elseif headers["transfer-encoding"] == "chunked" then
    local parts = {}
    while true do
      local size = tonumber(assert(sock:read_line({ timeout = 5 })), 16)
      if size == 0 then assert(sock:read_line({ timeout = 5 }) == "") break end
      parts[#parts + 1] = sock:read_bytes(size, { timeout = 5 })
      assert(sock:read_line({ timeout = 5 }) == "")
    end
    res.body = table.concat(parts)
  elseif headers["content-length"] then
    res.body = sock:read_bytes(tonumber(headers["content-length"]), { timeout = 5 })
  else
    res.body = sock:read_all({ timeout = 5 })
  end
  return res
end

--- Opens a connection to 127.0.0.1:port.
function M.connect(port)
  return require("fibril.tcp").connect("127.0.0.1", port, { timeout = 5 })
end

--- Sends a GET for each of paths back to back in one write on a new connection (pipelined),
--- then reads as many responses; returns their bodies in order.
function M.pipeline(port, paths)
  local parts = {}
  for i, path in ipairs(paths) do parts[i] = "GET " .. path .. " HTTP/1.1\r\nHost: t\r\n\r\n" end
  local sock = M.connect(port)
  sock:write(table.concat(parts))
  local bodies = {}
  for i = 1, #paths do bodies[i] = M.read_response(sock).body end
  sock:close()
  return bodies
end

--- Sends raw bytes on a new connection and returns the first response (and the socket).
function M.raw(port, bytes, head)
  local sock = M.connect(port)
  sock:write(bytes)
  return M.read_response(sock, head), sock
end

-- "NAME='value' ..." for a shell command line (values single-quoted).
local function env_prefix(env)
  local parts = {}
  for k, v in pairs(env or {}) do
    parts[#parts + 1] = k .. "='" .. tostring(v):gsub("'", "'\\''") .. "' "
  end
  return table.concat(parts)
end

--- Starts `fibril run APP ARGS` as a child process on a free port; returns a handle with
--- port, pid, log() and stop(signal). Waits until the server says it listens. env adds
--- variables to the child's environment ({ QUEUE_KEY = "k" }).
function M.start_app(app_dir, args, env)
  local fibril = require "fibril"
  local log = M.tmpdir() .. "/app-" .. math.random(1e9) .. ".log"
  local p = io.popen(("%s%s run '%s' --port 0 %s >%s 2>&1 & echo $!")
                     :format(env_prefix(env), M.fibril, app_dir, args or "", log))
  local pid = tonumber(p:read("*l"))
  p:close()
  local handle = { pid = pid }
  function handle.log()
    local f = io.open(log)
    if not f then return "" end
    local s = f:read("*a")
    f:close()
    return s
  end
  function handle.stop(sig)
    os.execute(("kill -%s %d 2>/dev/null"):format(sig or "TERM", pid))
  end
  function handle.alive()
    return os.execute(("kill -0 %d 2>/dev/null"):format(pid)) == 0
  end
  function handle.wait_exit(timeout)
    local deadline = fibril.now() + (timeout or 10)
    while fibril.now() < deadline do
      local f = io.popen(("kill -0 %d 2>/dev/null; echo $?"):format(pid))
      local gone = f:read("*l") ~= "0"
      f:close()
      if gone then return true end
      fibril.sleep(0.02)
    end
    return false
  end
  local deadline = fibril.now() + 10
  while fibril.now() < deadline do
    local port = handle.log():match('url="http://[^:]+:(%d+)"')
    if port then handle.port = tonumber(port) return handle end
    if handle.log():match("fibril: ") then break end
    fibril.sleep(0.02)
  end
  handle.stop("KILL")
  error("app did not start: " .. handle.log())
end

--- Runs curl with the given arguments; returns its stdout (the body, or what -i/-w add).
function M.curl(args)
  local p = io.popen("curl -s --max-time 10 " .. args .. " 2>&1")
  local out = p:read("*a")
  p:close()
  return out
end

--- Like start_app, but the app runs under a shell that records its exit status: the
--- handle's status() gives it once the app has exited (nil before; 128+n for signal n).
function M.start_app_status(app_dir, args)
  local fibril = require "fibril"
  local base = M.tmpdir() .. "/app-" .. math.random(1e9)
  local log, pidfile, statusfile = base .. ".log", base .. ".pid", base .. ".status"
  os.execute(("( %s run '%s' --port 0 %s >%s 2>&1 & echo $! >%s; wait $!; echo $? >%s.tmp; "
              .. "mv %s.tmp %s ) >/dev/null 2>&1 &")
             :format(M.fibril, app_dir, args or "", log, pidfile, statusfile, statusfile, statusfile))
  local pid
  local deadline = fibril.now() + 5
  while not pid and fibril.now() < deadline do
    pid = tonumber(read_all(pidfile):match("%d+") or "")
    if not pid then fibril.sleep(0.01) end
  end
  assert(pid, "app did not start: no pid")
  local handle = { pid = pid }
  function handle.log() return read_all(log) end
  function handle.stop(sig)
    os.execute(("kill -%s %d 2>/dev/null"):format(sig or "TERM", pid))
  end
  function handle.alive()
    return os.execute(("kill -0 %d 2>/dev/null"):format(pid)) == 0
  end
  function handle.status()
    return tonumber(read_all(statusfile):match("%d+") or "")
  end
  --- Waits for the recorded exit status; true once there is one.
  function handle.wait_exit(timeout)
    local until_ = fibril.now() + (timeout or 10)
    while fibril.now() < until_ do
      if handle.status() then return true end
      fibril.sleep(0.02)
    end
    return false
  end
  deadline = fibril.now() + 10
  while fibril.now() < deadline do
    local port = handle.log():match('url="http://[^:]+:(%d+)"')
    if port then handle.port = tonumber(port) return handle end
    if handle.log():match("fibril: ") or handle.status() then break end
    fibril.sleep(0.02)
  end
  handle.stop("KILL")
  error("app did not start: " .. handle.log())
end

--- Polls cond every interval seconds (0.01) for up to seconds (5); returns its first truthy
--- value, or what it returns at the deadline (for assert.is_true(support.eventually(...))).
function M.eventually(cond, seconds, interval)
  local fibril = require "fibril"
  local deadline = fibril.now() + (seconds or 5)
  repeat
    local v = cond()
    if v then return v end
    fibril.sleep(interval or 0.01)
  until fibril.now() > deadline
  return cond()
end

--- Like eventually, but raises "timed out waiting for WHAT" at the caller's line when cond
--- is still false at the deadline.
function M.wait_for(cond, seconds, what)
  local v = M.eventually(cond, seconds)
  if not v then error("timed out waiting for " .. (what or "a condition"), 2) end
  return v
end

--- Collects garbage and gives close callbacks a few loop turns, until live() (a function
--- returning a comparable summary of open resources) equals baseline; returns its last value.
function M.settled(live, baseline)
  local fibril = require "fibril"
  for _ = 1, 200 do
    collectgarbage()
    if live() == baseline then return baseline end
    fibril.sleep(0.005)
  end
  return live()
end

-- ---- redis-server processes of a spec's own (to kill, restart, or give a password) --------

local function sh(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

local function redis_ping(port)
  local out = sh("redis-cli -p " .. port .. " ping 2>&1")
  return out == "PONG\n" or out:find("NOAUTH", 1, true) ~= nil
end

--- True when a Redis server answers on the loopback port.
M.redis_answers = redis_ping

local RedisServer = {}
RedisServer.__index = RedisServer
local redis_servers = {}

-- Runs redis-server on s.port; true once it answers, false when the port was taken.
function RedisServer:start()
  local fibril = require "fibril"
  self.pid = tonumber(sh(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no "
    .. "--dir %s --daemonize no --enable-debug-command local --unixsocket %s %s "
    .. ">>%s/redis-%d.log 2>&1 & echo $!"):format(self.port, M.tmpdir(), self.sock,
    self.extra or "", M.tmpdir(), self.port)))
  self.stopped = false
  for _ = 1, 250 do
    if redis_ping(self.port) then return true end
    if sh("kill -0 " .. self.pid .. " 2>/dev/null && echo up") == "" then return false end
    fibril.sleep(0.02)
  end
  error("redis-server on port " .. self.port .. " did not answer")
end

--- Kills the server (SIGKILL: no goodbye to the clients) and waits until the port is free.
function RedisServer:stop()
  if self.stopped then return end
  os.execute("kill -9 " .. self.pid .. " 2>/dev/null")
  self.stopped = true
  local fibril = require "fibril"
  for _ = 1, 250 do
    if not redis_ping(self.port) then return end
    fibril.sleep(0.02)
  end
end

--- Starts a redis-server of the spec's own on a free loopback port (and a unix socket), with
--- extra command-line arguments. Returns { port, url, sock, pid, stop(), start() }; every
--- one still running is killed by stop_redis_servers().
function M.redis_server(extra)
  for _ = 1, 20 do
    local port = math.random(20000, 32000)   -- below the ephemeral range (32768 up)
    if not redis_ping(port) then
      local s = setmetatable({ port = port, extra = extra,
        url = "redis://127.0.0.1:" .. port .. "/0",
        sock = M.tmpdir() .. "/redis-" .. port .. ".sock" }, RedisServer)
      if s:start() then
        redis_servers[#redis_servers + 1] = s
        return s
      end
    end
  end
  error("could not start redis-server")
end

function M.stop_redis_servers()
  for _, s in ipairs(redis_servers) do s:stop() end
  redis_servers = {}
end

return M
