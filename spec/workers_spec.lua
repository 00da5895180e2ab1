-- fibril.process (child processes for fibers) and `fibril run --workers N` (fibril.workers):
-- a master holding the port, worker processes sharing it with SO_REUSEPORT, restarts and
-- the SIGTERM drain, against real child processes and real sockets.
local fibril = require "fibril"
local process = require "fibril.process"
local support = require "spec.support"

local function app_dir()
  local name = "workers_app_" .. math.random(1e9)
  support.write(name .. "/routes.lua",
                'return function(r) r:get("/pid", "home#pid") r:get("/slow", "home#slow") end\n')
  support.write(name .. "/controllers/home.lua", [[
local Controller = require "fibril.controller"
local process = require "fibril.process"
local C = Controller:extend()
function C:pid() self:render{ text = tostring(process.pid()) } end
function C:slow()
  require("fibril").sleep(1)
  self:render{ text = "slow " .. process.pid() }
end
return C
]])
  return support.tmpdir() .. "/" .. name
end

local function get(port, path)
  local res, sock = support.raw(port, ("GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                                      :format(path))
  sock:close()
  return res
end

-- Asks /pid on new connections until `enough` returns true for the set of pids seen (or
-- the deadline passes); every response must be a 200. Returns the set and the count.
local function pids_until(port, enough, seconds)
  local seen, n = {}, 0
  local deadline = fibril.now() + (seconds or 5)
  repeat
    local res = get(port, "/pid")
    assert.are.equal(200, res.status)
    seen[tonumber(res.body)] = true
    n = n + 1
  until enough(seen, n) or fibril.now() > deadline
  return seen, n
end

local function count(set)
  local n = 0
  for _ in pairs(set) do n = n + 1 end
  return n
end

-- Stops an app (TERM, then KILL), then checks that no process of it reported a sanitizer
-- error (under `make test SANITIZE=1`) and that every worker stopped with status 0.
local function cleanup(h)
  if not h then return end
  if not (h.status and h.status()) and h.alive() then
    h.stop("TERM")
    if not h.wait_exit(10) then h.stop("KILL") end
  end
  local log = h.log()
  assert.is_nil(log:match("Sanitizer"), log)
  for line in log:gmatch('[^\n]*msg="worker stopped"[^\n]*') do
    assert.matches('status="0"', line)
    assert.matches('signal="none"', line)
  end
end

describe("fibril.process", function()
  local base_procs, base_ports, base_traps
  setup(function() base_procs, base_ports, base_traps = process.live() end)

  it("runs a child and returns its exit status, also when asked again after the exit", function()
    local p = process.spawn{ "/bin/sh", args = { "-c", "exit 3" } }
    assert.is_true(p:pid() > 0)
    local status, sig = p:wait()
    assert.are.equal(3, status)
    assert.is_nil(sig)
    assert.are.same({ 3, nil }, { p:wait() })
    assert.is_true((p:exited()))
    p:close()
    p:close()                                       -- idempotent
  end)

  it("adds env to the inherited environment", function()
    local p = process.spawn{ file = "/bin/sh", args = { "-c", 'exit $((X + ${HOME:+1}))' },
                             env = { X = "6" } }
    assert.are.equal(7, (p:wait()))
    p:close()
  end)

  it("reports the signal that ended a killed child", function()
    local p = process.spawn{ "/bin/sh", args = { "-c", "exec sleep 10" }, stdio = "ignore" }
    assert.is_true(p:kill("SIGKILL"))
    local status, sig = p:wait(5)
    assert.are.equal(0, status)
    assert.are.equal("SIGKILL", sig)
    assert.is_false(p:kill("TERM"))                 -- gone: false, not an error
    p:close()
  end)

  it("raises code timeout when wait runs out, and the child keeps running", function()
    local p = process.spawn{ "/bin/sh", args = { "-c", "exec sleep 10" }, stdio = "ignore" }
    local ok, err = pcall(p.wait, p, 0.05)
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    assert.matches("still running", err.message)
    assert.is_false((p:exited()))
    assert.is_true(process.kill(p:pid(), 0))        -- signal 0: the process is there
    p:kill()
    assert.are.equal("SIGTERM", select(2, p:wait(5)))
    p:close()
  end)

  it("wakes a fiber waiting on a process object that is closed", function()
    local p = process.spawn{ "/bin/sh", args = { "-c", "exec sleep 10" }, stdio = "ignore" }
    local pid = p:pid()
    local waiter = fibril.schedule(function() return pcall(p.wait, p) end)
    fibril.sleep(0.02)
    p:close()
    local ok, err = fibril.await(waiter)
    assert.is_false(ok)
    assert.are.equal("closed", err.code)
    assert.is_true(process.kill(pid, "KILL"))
  end)

  it("raises naming the file when it cannot be run", function()
    local ok, err = pcall(process.spawn, { "/nonexistent/fibril-nope" })
    assert.is_false(ok)
    assert.are.equal("ENOENT", err.code)
    assert.matches("cannot run '/nonexistent/fibril%-nope'", err.message)
    assert.has_error(function() process.spawn{ "/bin/sh", args = { 1 } } end,
                     "process.spawn: args[1] must be a string")
  end)

  it("gives this process's pid and parent pid", function()
    local p = io.popen("echo $PPID")
    local shell_parent = tonumber(p:read("*l"))
    p:close()
    assert.are.equal(shell_parent, process.pid())
    assert.is_true(process.ppid() > 0 and process.ppid() ~= process.pid())
  end)

  it("reserves a port that only SO_REUSEPORT listeners can share", function()
    local r = process.reserve_port("127.0.0.1", 0)
    local port = r:port()
    assert.is_true(port > 0)
    local ok, err = pcall(support.http_server, function() end, { port = port })
    assert.is_false(ok)
    assert.matches("address already in use", tostring(err))
    local srv = support.http_server(function(_, res) res:send(200, {}, "shared") end,
                                    { port = port, reuseport = true })
    assert.are.equal("shared", get(port, "/").body)
    srv:close()
    r:close()
    r:close()                                       -- idempotent
    process.reserve_port("127.0.0.1", port):close() -- free again
    local ok2, err2 = pcall(process.reserve_port, "nowhere", 1)
    assert.is_false(ok2)
    assert.matches("cannot reserve nowhere:1: bad host", err2.message)
  end)

  it("traps a signal: it no longer ends the process, and signal.wait still sees it", function()
    local status, out = support.run_script([[
      local fibril = require "fibril"
      local process = require "fibril.process"
      local signal = require "fibril.core.signal"
      local trap = process.trap("SIGUSR2")
      local waiter = fibril.schedule(signal.wait, "SIGUSR2")
      fibril.sleep(0.01)
      process.kill(process.pid(), "SIGUSR2")     -- one for the wait ...
      print(fibril.await(waiter))
      process.kill(process.pid(), "USR2")        -- ... and one with only the trap left
      fibril.sleep(0.05)
      trap:close()
      trap:close()
      print("alive", process.live())
    ]])
    assert.are.equal(0, status)
    assert.are.equal("SIGUSR2\nalive\t0\t0\t1\n", out)   -- the trap frees on the next turn
  end)

  it("releases every process object and port (live() back to where it was)", function()
    collectgarbage()
    collectgarbage()
    fibril.sleep(0.02)                              -- close callbacks run on the loop
    local procs, ports, traps = process.live()
    assert.are.equal(base_procs, procs)
    assert.are.equal(base_ports, ports)
    assert.are.equal(base_traps, traps)
  end)
end)

describe("fibril run --workers", function()
  local h
  after_each(function() cleanup(h) h = nil end)

  it("backs off restarts from 0.1 s, doubling up to 5 s, reset by a worker that lived 10 s", function()
    local workers = require "fibril.workers"
    local waits, delay = {}, workers.BACKOFF_MIN
    for i = 1, 8 do waits[i], delay = workers.backoff(delay, 0.5) end
    assert.are.same({ 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5, 5 }, waits)
    assert.are.equal(0.1, (workers.backoff(delay, 10)))
  end)

  it("answers on one port from more than one worker process", function()
    h = support.start_app(app_dir(), "--workers 2 --env test")
    local seen, n = pids_until(h.port, function(s, k) return k >= 50 and count(s) >= 2 end)
    assert.is_true(n >= 50)
    assert.are.equal(2, count(seen))
    assert.is_nil(seen[h.pid])                      -- the master serves nothing itself
    local deadline = fibril.now() + 5               -- once a worker accepts, the master says so
    while not h.log():match('msg="listening"[^\n]*workers="2"') and fibril.now() < deadline do
      fibril.sleep(0.02)
    end
    assert.matches('msg="listening"[^\n]*workers="2"', h.log())
    assert.matches('msg="listening"[^\n]*url="http://127.0.0.1:' .. h.port .. '"', h.log())
  end)

  it("replaces a worker killed with SIGKILL while the port keeps answering", function()
    h = support.start_app(app_dir(), "--workers 2 --env test")
    local before = pids_until(h.port, function(s) return count(s) >= 2 end)
    local victim = next(before)
    assert.is_true(process.kill(victim, "SIGKILL"))
    local deadline = fibril.now() + 5                -- the master reaps it at once
    while process.kill(victim, 0) and fibril.now() < deadline do fibril.sleep(0.01) end
    assert.is_false(process.kill(victim, 0))
    local after = pids_until(h.port, function(s)
      for pid in pairs(s) do if not before[pid] then return true end end
    end)
    assert.is_nil(after[victim])
    local fresh
    for pid in pairs(after) do if not before[pid] then fresh = pid end end
    assert.is_not_nil(fresh)
    assert.matches('msg="worker exited: restarting"[^\n]*pid="' .. victim .. '"', h.log())
    assert.matches('msg="worker exited: restarting"[^\n]*signal="SIGKILL"', h.log())
  end)

  it("fails with one line and status 1 when the port is taken", function()
    local srv, port = support.http_server(function() end)
    local status, _, err = support.run(("run '%s' --port %d --workers 2 --env test")
                                       :format(app_dir(), port))
    srv:close()
    assert.are.equal(1, status)
    assert.are.equal(("fibril: http: cannot listen on 127.0.0.1:%d: address already in use\n")
                     :format(port), err)
  end)

  it("has its workers drain and exit when the master dies", function()
    h = support.start_app(app_dir(), "--workers 2 --env test")
    local workers = pids_until(h.port, function(s) return count(s) >= 2 end)
    h.stop("KILL")
    local deadline = fibril.now() + 5                -- they look once a second
    local left
    repeat
      fibril.sleep(0.05)
      left = 0
      for pid in pairs(workers) do if process.kill(pid, 0) then left = left + 1 end end
    until left == 0 or fibril.now() > deadline
    assert.are.equal(0, left)
    assert.are.equal(2, support.count(h.log(), 'msg="master is gone: draining"'))
  end)

  it("drains on SIGTERM: a request in flight completes and the master exits 0", function()
    h = support.start_app_status(app_dir(), "--workers 2 --env test")
    local workers = pids_until(h.port, function(s) return count(s) >= 2 end)
    local slow = fibril.schedule(get, h.port, "/slow")
    fibril.sleep(0.3)
    h.stop("TERM")
    fibril.sleep(0.1)
    for pid in pairs(workers) do process.kill(pid, "TERM") end   -- a repeat is no kill
    local res = fibril.await(slow)
    assert.are.equal(200, res.status)
    assert.matches("^slow %d+$", res.body)
    assert.is_true(h.wait_exit(10))
    assert.are.equal(0, h.status())
    local log = h.log()
    assert.matches('msg="stopping workers"', log)
    assert.are.equal(2, support.count(log, 'msg="worker stopped"'))
    assert.are.equal(2, support.count(log, 'status="0"'))
    assert.matches('msg="stopped"', log)
  end)
end)

describe("fibril run (one process)", function()
  local h
  after_each(function() cleanup(h) h = nil end)

  it("drains on SIGTERM: a request in flight completes and the process exits 0", function()
    h = support.start_app_status(app_dir(), "--env test")
    local slow = fibril.schedule(get, h.port, "/slow")
    fibril.sleep(0.3)
    h.stop("TERM")
    local res = fibril.await(slow)
    assert.are.equal(200, res.status)
    assert.is_true(h.wait_exit(10))
    assert.are.equal(0, h.status())
  end)
end)
