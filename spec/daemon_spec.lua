-- fibril.daemon: daemons run in their own fibers, restarted with a growing backoff, cleaned
-- up after every run and on shutdown, reloaded with the code in development, and placed by
-- scope under --workers. In-process supervisors first, then real `fibril run` children.
local fibril = require "fibril"
local Daemon = require "fibril.daemon"
local executor = require "fibril.executor"
local log = require "fibril.log"
local support = require "spec.support"

local function capture_log()
  local lines = {}
  log.output(function(line) lines[#lines + 1] = line end)
  return lines
end

-- An app table for Daemon.start: just daemons and the settings it reads.
local function fake_app(daemons, backoff_min)
  return { daemons = daemons, config = { daemons = { backoff_min = backoff_min or 0.05,
           backoff_max = 30, reset_after = 60 }, http = { drain_timeout = 5 } } }
end

-- Waits (polling, never a fixed sleep) until cond() is true; fails after seconds.
local eventually = support.wait_for

-- Live fibers (the runner's own fiber's timer comes and goes, so handles are not compared).
local function live() return fibril.debug.live().fibers end

describe("fibril.daemon", function()
  it("makes classes that inherit, and tells daemons from other tables", function()
    local D = Daemon:extend("Poller")
    local E = D:extend()
    assert.are.equal("Poller", D.name)
    assert.are.equal("node", D.scope)
    assert.is_true(Daemon.is_daemon(D))
    assert.is_true(Daemon.is_daemon(E))
    assert.is_false(Daemon.is_daemon({}))
    assert.is_false(Daemon.is_daemon(Daemon))
    assert.has_error(function() Daemon:extend(42) end, "Daemon:extend: the name must be a non-empty string")
  end)

  it("backs off from min, doubling up to max, with waits that still grow under jitter", function()
    local opts = { min = 0.1, max = 2, reset_after = 60 }
    local delay, waits = 0.1, {}
    for i = 1, 8 do
      waits[i], delay = Daemon.backoff(delay, 0.01, opts)
    end
    for i = 1, 5 do
      local nominal = 0.1 * 2 ^ (i - 1)
      assert.is_true(waits[i] <= nominal and waits[i] >= nominal * (1 - Daemon.JITTER), tostring(waits[i]))
      assert.is_true(waits[i + 1] > waits[i])
    end
    assert.is_true(waits[8] <= 2 and waits[8] >= 1.5)         -- capped at max
    local wait, next_delay = Daemon.backoff(delay, 61, opts)  -- a healthy run resets it
    assert.is_true(wait <= 0.1)
    assert.are.equal(0.2, next_delay)
  end)

  it("puts node daemons in a single process or worker 1, worker daemons everywhere", function()
    assert.is_true(Daemon.runs_here("node", nil))
    assert.is_true(Daemon.runs_here("node", 1))
    assert.is_false(Daemon.runs_here("node", 2))
    assert.is_true(Daemon.runs_here("worker", 2))
  end)
end)

describe("a daemon supervisor", function()
  local baseline, sup
  before_each(function()
    capture_log()                         -- quiet; the specs that read lines capture their own
    baseline = support.settled(live, live())
  end)
  after_each(function()
    if sup then sup:stop(2) end
    sup = nil
    log.output(nil)
    assert.are.equal(baseline, support.settled(live, baseline))
  end)

  it("restarts a daemon that raises, at growing intervals, logging its name and traceback", function()
    local lines = capture_log()
    local starts = {}
    local D = Daemon:extend("Flaky")
    function D:perform()
      starts[#starts + 1] = fibril.now()
      assert.are.equal(#starts, self.attempt)
      error("broken on attempt " .. self.attempt)
    end
    sup = Daemon.start(fake_app({ D }, 0.05))
    eventually(function() return #starts >= 5 end, 5, "five attempts")
    -- nominal waits 0.05, 0.1, 0.2, 0.4 less up to 25 % jitter: each longer than the last
    for i = 2, 4 do
      local before, after = starts[i] - starts[i - 1], starts[i + 1] - starts[i]
      assert.is_true(after > before, ("interval %d (%.3f s) not longer than %d (%.3f s)")
                                     :format(i, after, i - 1, before))
    end
    assert.is_true(starts[5] - starts[4] >= 0.4 * 0.75 - 0.002)
    local failure
    for _, l in ipairs(lines) do
      if l:find('msg="daemon failed: restarting"', 1, true) then failure = failure or l end
    end
    assert.is_truthy(failure)
    assert.matches("daemon=Flaky", failure, 1, true)
    assert.matches("broken on attempt 1", failure, 1, true)
    assert.matches("stack traceback", failure, 1, true)
    assert.matches("daemon_spec.lua:%d+", failure)
  end)

  it("restarts a daemon that returns, and runs cleanup after every run", function()
    local performed, cleaned = 0, 0
    local D = Daemon:extend("Returner")
    function D.perform() performed = performed + 1 end
    function D.cleanup() cleaned = cleaned + 1 end
    sup = Daemon.start(fake_app({ D }, 0.02))
    eventually(function() return cleaned >= 3 end, 5, "three runs")
    assert.is_true(performed >= cleaned and performed <= cleaned + 1)
  end)

  it("runs each perform as a unit of work tagged with the daemon's name, fresh each run", function()
    local seen
    local D = Daemon:extend("Tagged")
    function D:perform()
      if self.attempt == 1 then
        log.tag("job", 7)                 -- this run's tag: the next run must not see it
        executor.locals().x = 1
        error("first run fails")
      end
      seen = { active = executor.active(), tags = log.tags(), x = executor.locals().x }
      fibril.sleep(10)
    end
    sup = Daemon.start(fake_app({ D }, 0.01))
    eventually(function() return seen end)
    assert.are.same({ active = true, tags = { daemon = "Tagged" } }, seen)
  end)

  it("stops a daemon on stop(): perform is cancelled, cleanup runs once, no restart follows", function()
    local runs, cleanups, stopping_in_cleanup = 0, 0, nil
    local D = Daemon:extend("Sleeper")
    function D.perform()
      runs = runs + 1
      fibril.sleep(30)
    end
    function D:cleanup()
      cleanups = cleanups + 1
      stopping_in_cleanup = self:stopping()
      fibril.sleep(0.01)                 -- a cleanup may suspend: it is not cancelled
    end
    local s = Daemon.start(fake_app({ D }))
    eventually(function() return runs == 1 end)
    assert.are.same({ "Sleeper" }, s:names())
    local t0 = fibril.now()
    assert.is_true(s:stop())
    assert.is_true(fibril.now() - t0 < 1)
    assert.are.same({ 1, 1, true }, { runs, cleanups, stopping_in_cleanup })
    fibril.sleep(0.1)
    assert.are.equal(1, runs)
  end)

  it("stops a daemon waiting out its backoff at once", function()
    local runs = 0
    local D = Daemon:extend("Backing")
    function D.perform() runs = runs + 1; error("no") end
    local lines = capture_log()
    local s = Daemon.start(fake_app({ D }, 20))
    eventually(function() return runs == 1 end)
    fibril.sleep(0.02)
    local t0 = fibril.now()
    assert.is_true(s:stop())
    assert.is_true(fibril.now() - t0 < 1)
    assert.are.equal(1, runs)
    assert.matches('msg="daemon stopped"', lines[#lines], 1, true)
  end)

  it("gives up on a daemon that swallows the stop, after the timeout, and says so", function()
    local release = false
    local D = Daemon:extend("Stubborn")
    function D.perform()
      while not release do pcall(fibril.sleep, 0.01) end   -- catches "cancelled" too
    end
    local lines = capture_log()
    local s = Daemon.start(fake_app({ D }))
    fibril.sleep(0.02)
    local t0 = fibril.now()
    assert.is_false(s:stop(0.2))
    assert.is_true(fibril.now() - t0 >= 0.19)
    assert.matches('msg="daemon did not stop in time" daemon=Stubborn', table.concat(lines, "\n"))
    release = true                        -- let it end, for the leak check
    fibril.sleep(0.05)
  end)

  it("waits for a cleanup under way instead of cancelling it", function()
    local finished = false
    local D = Daemon:extend("SlowCleanup")
    function D.perform() end
    function D.cleanup()
      fibril.sleep(0.2)
      finished = true
    end
    local s = Daemon.start(fake_app({ D }))
    fibril.sleep(0.05)
    assert.is_true(s:stop())
    assert.is_true(finished)
  end)

  it("starts only the daemons whose scope belongs in this worker", function()
    local N = Daemon:extend("NodeOne")
    local W = Daemon:extend("EveryWorker")
    W.scope = "worker"
    function N.perform() fibril.sleep(10) end
    W.perform = N.perform
    local s1 = Daemon.start(fake_app({ N, W }), { worker = 1 })
    local s2 = Daemon.start(fake_app({ N, W }), { worker = 2 })
    assert.are.same({ "NodeOne", "EveryWorker" }, s1:names())
    assert.are.same({ "EveryWorker" }, s2:names())
    assert.is_true(s1:stop())              -- both cancelled before they ever ran
    assert.is_true(s2:stop())
  end)
end)

-- ---- served apps: real child processes ------------------------------------------------

-- Writes an app whose daemons append lines to APP/out/<file>.log; returns its directory. The
-- names have an extension and out/ exists from the start: in development, a new name
-- without one (a directory, maybe) counts as a code change and reloads.
local function daemon_app(daemons, config)
  local name = "daemon_app_" .. math.random(1e9)
  support.write(name .. "/routes.lua", "return function() end\n")
  support.write(name .. "/config/app.lua", config or [[
return { development = { daemons = { backoff_min = 0.05 } }, test = { daemons = { backoff_min = 0.05 } } }
]])
  support.write(name .. "/lib/record.lua", [[
-- Appends one line to APP/out/<file>.log (a plain blocking write: tiny, and it is a test).
local getenv = os.getenv
return function(daemon, file, line)
  local f = assert(io.open(daemon.app.dir .. "/out/" .. file .. ".log", "a"))
  f:write(line, " pid=", tostring(require("fibril.process").pid()), " worker=",
          getenv("FIBRIL_WORKER") or "main", "\n")
  f:close()
end
]])
  support.write(name .. "/out/.keep", "")
  for file, source in pairs(daemons) do support.write(name .. "/daemons/" .. file, source) end
  return support.tmpdir() .. "/" .. name
end

local function read(path)
  local f = io.open(path .. ".log")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

local function stop(h)
  if h and h.alive() then
    h.stop("TERM")
    if not h.wait_exit(10) then h.stop("KILL") end
  end
end

local LOOPER = [[
local Daemon = require "fibril.daemon"
local fibril = require "fibril"
local record = require "record"
local D = Daemon:extend(%q)
D.scope = %q
function D:perform()
  record(self, %q, "start %s")
  while true do
    record(self, %q, "tick %s")
    fibril.sleep(0.05)
  end
end
function D:cleanup() record(self, %q, "cleanup %s") end
return D
]]

local function looper(name, scope, file, version)
  return LOOPER:format(name, scope, file, version, file, version, file, version)
end

describe("daemons in a served app", function()
  local h
  after_each(function()
    stop(h)
    if h then assert.is_nil(h.log():match("Sanitizer"), h.log()) end
    h = nil
  end)

  it("start at boot, and stop with cleanup on SIGTERM before the process exits 0", function()
    local dir = daemon_app({ ["looper.lua"] = looper("Looper", "node", "looper", "v1") })
    h = support.start_app_status(dir, "--env test")
    eventually(function() return read(dir .. "/out/looper"):find("tick v1") end, 5, "a tick")
    h.stop("TERM")
    assert.is_true(h.wait_exit(10))
    assert.are.equal(0, h.status())
    local out = read(dir .. "/out/looper")
    assert.are.equal(1, support.count(out, "start v1"))
    assert.are.equal(1, support.count(out, "cleanup v1"))
    assert.is_truthy(out:find("cleanup v1[^\n]*\n$"))          -- nothing ran after cleanup
    assert.matches('msg="daemon stopped"[^\n]*daemon=Looper', h.log())
  end)

  it("reload with the code in development: the new daemon code runs after a change", function()
    local dir = daemon_app({ ["looper.lua"] = looper("Looper", "node", "looper", "v1") })
    h = support.start_app(dir, "--env development")
    eventually(function() return read(dir .. "/out/looper"):find("tick v1") end, 5, "v1 ticks")
    support.write(dir:match("[^/]+$") .. "/daemons/looper.lua", looper("Looper", "node", "looper", "v2"))
    eventually(function() return read(dir .. "/out/looper"):find("tick v2") end, 5, "v2 ticks")
    local out = read(dir .. "/out/looper")
    -- v1 was stopped (cleanup) before v2 started, and v1 ticks no more
    local cleanup_v1, start_v2 = out:find("cleanup v1", 1, true), out:find("start v2", 1, true)
    assert.is_truthy(cleanup_v1 and start_v2 and cleanup_v1 < start_v2, out)
    assert.is_nil(out:find("tick v1", start_v2, true))
    assert.matches('msg="code reloaded"', h.log(), 1, true)
  end)

  it("run worker-scoped daemons in every worker and node-scoped ones once, in worker 1", function()
    local dir = daemon_app({
      ["node.lua"] = looper("NodeDaemon", "node", "node", "n"),
      ["each.lua"] = looper("WorkerDaemon", "worker", "each", "w"),
    })
    h = support.start_app(dir, "--workers 2 --env test")
    local function starts(file)
      local out, pids = read(dir .. "/out/" .. file), {}
      for pid, worker in out:gmatch("start %a pid=(%d+) worker=(%w+)") do pids[#pids + 1] = pid .. "/" .. worker end
      return pids
    end
    eventually(function() return #starts("each") >= 2 and #starts("node") >= 1 end, 10, "daemons in both workers")
    fibril.sleep(0.3)                                    -- room for a wrong second node daemon
    local each, node = starts("each"), starts("node")
    assert.are.equal(2, #each)
    assert.are_not.equal(each[1]:match("^%d+"), each[2]:match("^%d+"))
    assert.are.equal(1, #node)
    assert.matches("/1$", node[1])
    -- worker 1 dies: the master restarts it, and the node daemon comes back with it
    os.execute("kill -KILL " .. node[1]:match("^%d+"))
    eventually(function() return #starts("node") >= 2 end, 10, "the node daemon back in a new worker 1")
    node = starts("node")
    assert.are_not.equal(node[1], node[2])
    assert.matches("/1$", node[2])
  end)

  it("fail the boot naming the file when a daemon file does not return a daemon", function()
    local dir = daemon_app({ ["bad.lua"] = "return { perform = function() end }\n" })
    local status, _, err = support.run("routes '" .. dir .. "'")
    assert.are.equal(1, status)
    assert.matches("daemons/bad.lua: must return a daemon", err, 1, true)
    local dir2 = daemon_app({ ["broken.lua"] = "local Daemon = require 'fibril.daemon'\nreturn Daemon:extend(\n" })
    status, _, err = support.run("routes '" .. dir2 .. "'")
    assert.are.equal(1, status)
    assert.matches("daemons/broken.lua:3:", err, 1, true)
    local dir3 = daemon_app({ ["v1.2.lua"] = looper("Dotted", "node", "d", "v") })
    status, _, err = support.run("routes '" .. dir3 .. "'")
    assert.are.equal(1, status)
    assert.matches("daemons/v1.2.lua: a daemon file's name cannot contain '.'", err, 1, true)
  end)
end)
