--- fibril.workers: `fibril run APP --workers N`. A master process holds the port (bound,
--- never listening), runs N worker processes (each a fresh `fibril run` serving on the port
--- with SO_REUSEPORT), restarts a worker that dies, and on SIGTERM/SIGINT has them all drain.
--- The master serves no request and loads no app code of its own beyond the boot check.
--- docs/deploying.md is the guide.
local fibril = require "fibril"
local process = require "fibril.process"
local signal = require "fibril.core.signal"
local server = require "fibril.server"
local vm = require "fibril.core.vm"

local tostring, tonumber, pcall, ipairs, format, min =
      tostring, tonumber, pcall, ipairs, string.format, math.min
local getenv, stderr = os.getenv, io.stderr
local now, sleep, log = fibril.now, fibril.sleep, server.log

local M = {}

--- Restart backoff: the first restart waits BACKOFF_MIN seconds, each next one twice as
--- long up to BACKOFF_MAX; a worker that lived STABLE_AFTER seconds resets it.
M.BACKOFF_MIN, M.BACKOFF_MAX, M.STABLE_AFTER = 0.1, 5, 10
--- Seconds past http.drain_timeout the master waits for workers before SIGKILL.
M.KILL_GRACE = 5
--- Seconds between a worker's checks that its master is still alive.
M.PARENT_CHECK = 1
--- Seconds the master waits for a first worker to accept before it logs "listening".
M.READY_TIMEOUT = 10

--- The delay before the next restart of a worker, and the delay to keep for the one after.
---@param delay number the delay kept from the previous restart (BACKOFF_MIN at first)
---@param lived number seconds the worker that just exited ran
---@return number wait, number next
function M.backoff(delay, lived)
  if lived >= M.STABLE_AFTER then delay = M.BACKOFF_MIN end
  return delay, min(delay * 2, M.BACKOFF_MAX)
end

-- The address a probe connects to: a wildcard bind is reached on loopback.
local function probe_host(host)
  if host == "0.0.0.0" then return "127.0.0.1" end
  if host == "::" then return "::1" end
  return host
end

local function url_of(host, port)
  return format(host:find(":", 1, true) and "http://[%s]:%d" or "http://%s:%d", host, port)
end

-- Starts worker slot.i: this same binary, `fibril run APP --workers 1 --reuseport-worker`.
local function spawn_worker(m, slot)
  local app = m.app
  local args = { "run", app.dir, "--workers", "1", "--port", tostring(m.port),
                 "--host", app.config.host, "--env", app.env, "--reuseport-worker",
                 app.config.reload and "--reload" or "--no-reload" }
  -- detached (a session of its own): a terminal's Ctrl-C reaches the master only, and the
  -- master alone decides when and how the workers stop.
  return process.spawn{ file = m.exe, args = args, detached = true,
                        env = { FIBRIL_WORKER = tostring(slot.i),
                                FIBRIL_WORKERS = tostring(#m.slots),   -- deferred: orphan journals
                                FIBRIL_MASTER_PID = tostring(m.pid),
                                FIBRIL_RELAY_PORT = m.relay_port and tostring(m.relay_port),
                                FIBRIL_RELAY_TOKEN = m.relay_token } }
end

-- One fiber per worker slot: run it, wait for it, restart it with backoff until stopping.
local function supervise(m, slot)
  local delay = M.BACKOFF_MIN
  while not m.stopping do
    local started = now()
    local ok, proc = pcall(spawn_worker, m, slot)
    local fields = { worker = slot.i }
    if ok then
      slot.proc = proc
      fields.pid = proc:pid()
      log("info", "worker started", fields)
      local status, sig = proc:wait()
      slot.proc = nil
      proc:close()
      if m.stopping then
        log("info", "worker stopped", { worker = slot.i, pid = fields.pid, status = status,
                                        signal = sig or "none" })
        return
      end
      fields.status, fields.signal = status, sig or "none"
    else
      fields.err = tostring(proc)
    end
    local wait
    wait, delay = M.backoff(delay, now() - started)
    fields.delay = wait
    log(ok and "warn" or "error", ok and "worker exited: restarting" or "worker failed to start",
        fields)
    pcall(m.wake.wait, m.wake, wait)      -- a timeout is the normal end; stop() wakes it early
  end
end

-- Waits until the port accepts a connection (a worker listens), a stop signal, or timeout.
local function wait_ready(m, stop)
  local tcp = require "fibril.tcp"
  local host, deadline = probe_host(m.app.config.host), now() + M.READY_TIMEOUT
  while now() < deadline and stop:status() ~= "done" do
    local ok, sock = pcall(tcp.connect, host, m.port, { timeout = 1 })
    if ok then
      sock:close()
      return true
    end
    sleep(0.02)
  end
  return false
end

-- Forwards SIGTERM to every worker, waits for them (drain_timeout + KILL_GRACE), then
-- SIGKILLs those left and waits for those too.
local function stop_workers(m, supervisors, name)
  m.stopping = true
  m.wake:broadcast()
  local grace = m.app.config.http.drain_timeout + M.KILL_GRACE
  local running = 0
  for _, slot in ipairs(m.slots) do
    if slot.proc then
      running = running + 1
      slot.proc:kill("SIGTERM")
    end
  end
  log("info", "stopping workers", { signal = name, workers = running, timeout = grace })
  if pcall(fibril.await, supervisors, { timeout = grace }) then return end
  for _, slot in ipairs(m.slots) do
    if slot.proc then
      log("warn", "worker did not stop in time: killing", { worker = slot.i, pid = slot.proc:pid() })
      slot.proc:kill("SIGKILL")
    end
  end
  pcall(fibril.await, supervisors, { timeout = M.KILL_GRACE })
end

--- Runs the master for app (app.config.workers workers) until SIGTERM or SIGINT, then
--- drains the workers and returns the process exit status (0; 1 when the port is taken).
---@param app table from fibril.app.load
---@return integer status
function M.run(app)
  local cfg = app.config
  local exe = vm.executable()
  if not exe then
    stderr:write("fibril: --workers: cannot find this program's own path to start workers\n")
    return 1
  end
  local ok, reserved = pcall(process.reserve_port, cfg.host, cfg.port)
  if not ok then
    local msg = tostring(reserved)
    if fibril.is_error(reserved, "EADDRINUSE") then   -- the single-process server's words
      msg = format("http: cannot listen on %s: address already in use",
                   url_of(cfg.host, cfg.port):sub(8))
    end
    stderr:write("fibril: ", msg, "\n")
    return 1
  end
  -- Waiting for the signal starts now, before any worker runs: a SIGTERM during boot
  -- still finds a handler and stops the workers that have started.
  local stop = fibril.schedule(signal.wait, "SIGTERM", "SIGINT")
  local m = { app = app, port = reserved:port(), exe = exe, pid = process.pid(),
              stopping = false, wake = fibril.cond(), slots = {} }
  -- The local pub/sub adapter reaches every worker through the master (pubsub/relay.lua).
  local relay_server
  if (cfg.pubsub and cfg.pubsub.adapter or "local") == "local" then
    relay_server, m.relay_port, m.relay_token = require("fibril.pubsub.relay").serve_master()
  end
  local supervisors = {}
  for i = 1, cfg.workers do
    m.slots[i] = { i = i }
    supervisors[i] = fibril.schedule(supervise, m, m.slots[i])
  end
  if not wait_ready(m, stop) and stop:status() ~= "done" then
    log("warn", "no worker accepts connections yet", { timeout = M.READY_TIMEOUT })
  end
  log("info", "listening", { url = url_of(cfg.host, m.port), workers = cfg.workers,
                             env = app.env, pid = m.pid })
  local name = fibril.await(stop)
  stop_workers(m, supervisors, name)
  if relay_server then relay_server:close() end
  reserved:close()
  log("info", "stopped", { pid = m.pid })
  return 0
end

-- In a worker: every PARENT_CHECK seconds, checks that the master still runs; once it is
-- gone, sends this process SIGTERM, so the server drains as if the master had asked.
local function watch_master(master)
  while pcall(sleep, M.PARENT_CHECK) do
    if process.ppid() ~= master then
      log("warn", "master is gone: draining", { master = master, worker = getenv("FIBRIL_WORKER") })
      process.kill(process.pid(), "SIGTERM")
      return
    end
  end                                          -- cancelled: the server has returned
end

--- Runs a worker (`fibril run ... --reuseport-worker`, started by the master): the plain
--- single-process server, listening with SO_REUSEPORT, plus a watch on the master.
--- SIGTERM and SIGINT stay trapped for the worker's life: the server's one-shot wait ends
--- at the first signal, and a second one (the master forwarding what systemd also sent to
--- every process of the unit, or a second Ctrl-C) must not kill the drain half-way.
---@return integer status
function M.worker(app)
  app.reuseport = true
  local traps = { process.trap("SIGTERM"), process.trap("SIGINT") }
  local master = tonumber(getenv("FIBRIL_MASTER_PID") or "") or process.ppid()
  local watcher = fibril.schedule(watch_master, master)
  local ok, status = pcall(server.run, app)
  fibril.cancel(watcher)
  for _, t in ipairs(traps) do t:close() end
  if not ok then
    stderr:write("fibril: ", tostring(status), "\n")
    return 1
  end
  return status
end

return M
