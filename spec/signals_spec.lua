local fibril = require "fibril"
local support = require "spec.support"
local signal = require "fibril.core.signal"

describe("fibril.core.signal", function()
  it("wakes a fiber with the name of the signal that arrived", function()
    local f = fibril.schedule(function() return signal.wait("SIGUSR1", "SIGUSR2") end)
    fibril.sleep(0.02)
    local pid = io.open("/proc/self/stat"):read("*l"):match("^(%d+)")
    os.execute("kill -USR2 " .. pid)
    assert.are.equal("SIGUSR2", fibril.await(f, { timeout = 2 }))
  end)

  it("times out and is cancelled like any wait", function()
    local ok, err = pcall(function() local _, e = signal.wait("SIGUSR1", 0.02) error(e) end)
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
  end)

  it("checks every argument before it listens, so a bad call leaves nothing behind", function()
    local status, out = support.run_script([[
      local signal = require "fibril.core.signal"
      print(pcall(signal.wait, "SIGUSR2", {}))
      print(pcall(signal.wait, "SIGNOPE"))
      print(pcall(signal.wait, "SIGUSR2", -1))
    ]])
    assert.are.equal(0, status)                    -- no handle left to keep the process up
    assert.matches("false\t.*string expected", out)
    assert.matches("unknown signal 'SIGNOPE'", out)
    assert.matches("timeout must be a non%-negative number", out)
  end)

  it("lets the process exit while a fiber still waits for a signal", function()
    local t0 = fibril.now()
    local status = support.run_script([[
      local fibril = require "fibril"
      local signal = require "fibril.core.signal"
      fibril.schedule(function() signal.wait("SIGUSR1") end)
      fibril.sleep(0.05)
      fibril.exit(0)
    ]])
    assert.are.equal(0, status)
    assert.is_true(fibril.now() - t0 < 3)
  end)
end)
