local fibril = require "fibril"
local support = require "spec.support"

describe("fibril FILE.lua", function()
  it("runs the script as the main fiber and exits 0", function()
    local status, out = support.run_script([[
      local fibril = require "fibril"
      local f = fibril.schedule(function() fibril.sleep(0.01) return "slept" end)
      print(fibril.await(f), fibril.current() ~= nil)
    ]])
    assert.are.equal(0, status)
    assert.are.equal("slept\ttrue\n", out)
  end)

  it("sets arg and ... as the lua binary does", function()
    local status, out = support.run_script([[
      print(arg[1], arg[2], select("#", ...), arg[0]:match("[^/]+$"), arg[-1] ~= nil)
      print(...)
    ]], "one two")
    assert.are.equal(0, status)
    assert.matches("^one\ttwo\t2\tscript_.-%.lua\ttrue\none\ttwo\n$", out)
  end)

  it("exits 1 with the message and a traceback on stderr when the script raises", function()
    local status, out, err = support.run_script([[
      local function explode() error("raised in the script") end
      explode()
    ]])
    assert.are.equal(1, status)
    assert.are.equal("", out)
    assert.matches("^fibril: .-script_.-%.lua:1: raised in the script\nstack traceback:", err)
    assert.matches("in function 'explode'", err)
  end)

  it("exits 1 and names the file and line of a syntax error", function()
    local status, _, err = support.run_script("local x = = 1\n")
    assert.are.equal(1, status)
    assert.matches("^fibril: .-script_.-%.lua:1: unexpected symbol near '='\n$", err)
  end)

  it("exits 2 with one line for a missing file or an unknown command", function()
    local status, _, err = support.run("/nonexistent/nothing.lua")
    assert.are.equal(2, status)
    assert.are.equal("fibril: cannot open /nonexistent/nothing.lua: No such file or directory\n", err)
    status, _, err = support.run("frobnicate")
    assert.are.equal(2, status)
    assert.are.equal("fibril: unknown command 'frobnicate' (see 'fibril help')\n", err)
  end)

  it("prints its version and help", function()
    local status, out = support.run("version")
    assert.are.equal(0, status)
    assert.matches("^fibril %d+%.%d+%.%d+ %(LuaJIT 2%.1", out)
    status, out = support.run("help")
    assert.are.equal(0, status)
    assert.matches("fibril test", out)
  end)

  it("waits for pending fibers after the main fiber returns", function()
    local status, out = support.run_script([[
      local fibril = require "fibril"
      fibril.schedule(function() fibril.sleep(0.05) print("late fiber ran") end)
      print("main done")
    ]])
    assert.are.equal(0, status)
    assert.are.equal("main done\nlate fiber ran\n", out)
  end)

  it("exits at once with fibril.exit(n) and os.exit(n), pending fibers or not", function()
    local t0 = fibril.now()
    local status = support.run_script([[
      local fibril = require "fibril"
      fibril.schedule(function() fibril.sleep(30) end)
      fibril.schedule(function() fibril.exit(4) end)
    ]])
    assert.are.equal(4, status)
    status = support.run_script([[
      local fibril = require "fibril"
      fibril.schedule(function() fibril.sleep(30) end)
      fibril.sleep(0.01)
      os.exit(3)
    ]])
    assert.are.equal(3, status)
    assert.is_true(fibril.now() - t0 < 5)
  end)

  it("reports a main fiber that waits for something that can never happen", function()
    local status, _, err = support.run_script([[
      require("fibril").channel():receive()
    ]])
    assert.are.equal(1, status)
    assert.matches("main fiber is still waiting in channel:receive", err, 1, true)
  end)

  it("logs a fiber that fails and is never awaited once, and keeps running", function()
    local status, out, err = support.run_script([[
      local fibril = require "fibril"
      fibril.schedule(function() error("nobody awaits me") end)
      fibril.sleep(0.01)
      collectgarbage(); collectgarbage()
      fibril.sleep(0.01)
      print("still running")
    ]])
    assert.are.equal(0, status)
    assert.are.equal("still running\n", out)
    assert.are.equal(1, support.count(err, "fiber failed and was never awaited"))
    assert.are.equal(1, support.count(err, "nobody awaits me"))
    assert.matches("level=error sub=fiber", err, 1, true)
    assert.matches("stack traceback:", err, 1, true)
  end)

  it("logs an unawaited failure still referenced at exit, when the process ends", function()
    local status, out, err = support.run_script([[
      local fibril = require "fibril"
      KEEP = fibril.schedule(function() error("held until exit") end)
      fibril.sleep(0.01)
      print("bye")
    ]])
    assert.are.equal(0, status)
    assert.are.equal("bye\n", out)
    assert.are.equal(1, support.count(err, "fiber failed and was never awaited"))
    assert.matches("held until exit", err, 1, true)
  end)

  it("does not log a failed fiber that was awaited, nor a cancelled one", function()
    local status, _, err = support.run_script([[
      local fibril = require "fibril"
      local f = fibril.schedule(function() error("awaited") end)
      pcall(fibril.await, f)
      local g = fibril.schedule(function() fibril.sleep(10) end)
      fibril.sleep(0.01)
      g:cancel()
      f, g = nil, nil
      collectgarbage(); collectgarbage()
    ]])
    assert.are.equal(0, status)
    assert.are.equal("", err)
  end)

  it("loads C modules built for Lua 5.1 from the system paths (cjson)", function()
    local status, out = support.run_script([[ print(require("cjson").encode({ 1, 2 })) ]])
    assert.are.equal(0, status)
    assert.are.equal("[1,2]\n", out)
  end)
end)

describe("the build", function()
  local build_dir = support.fibril:match("^(.*)/[^/]+$")

  it("installs a binary that finds the framework under its own prefix", function()
    local prefix = support.tmpdir() .. "/prefix"
    local p = io.popen(("cmake --install '%s' --prefix '%s' >/dev/null 2>&1; echo $?")
                       :format(build_dir, prefix))
    local status = tonumber(p:read("*l"))
    p:close()
    assert.are.equal(0, status)
    local script = support.write("where.lua",
      'print(package.path:match("^[^;]+")); print(require("fibril").now() > 0)')
    p = io.popen(("cd / && '%s/bin/fibril' '%s' 2>&1"):format(prefix, script))
    local out = p:read("*a")
    p:close()
    assert.are.equal(prefix .. "/share/fibril/lua/?.lua\ntrue\n", out)
  end)

  it("stops with one line naming the Debian package of a missing dependency", function()
    local dir = support.tmpdir() .. "/cmake-missing"
    local p = io.popen(("PKG_CONFIG_LIBDIR=/nonexistent cmake -S '%s' -B '%s' 2>&1")
                       :format(os.getenv("PWD"), dir))
    local out = p:read("*a")
    p:close()
    assert.matches("fibril: missing dependency 'luajit': install the Debian package", out, 1, true)
    assert.matches("'libluajit2-5.1-dev'", out, 1, true)
  end)
end)
