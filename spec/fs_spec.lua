-- fibril.core.fs (runtime/fs.c): stat, realpath, open and positional reads on libuv's thread
-- pool, errors as (nil, msg, code), and descriptors that always get closed.
local fibril = require "fibril"
local fs = require "fibril.core.fs"
local support = require "spec.support"

local function live()
  local fds, requests = fs.live()
  return fds .. "/" .. requests
end

local function settled(baseline) return support.settled(live, baseline) end

describe("fibril.core.fs", function()
  local dir, baseline
  setup(function()
    dir = support.tmpdir() .. "/fs"
    support.write("fs/ten.txt", "0123456789")
    os.execute(("ln -s ten.txt '%s/link.txt'"):format(dir))
    baseline = settled(live())
  end)
  after_each(function() assert.are.equal(baseline, settled(baseline)) end)

  it("stats a file, a directory and a link", function()
    local st = assert(fs.stat(dir .. "/ten.txt"))
    assert.are.equal(10, st.size)
    assert.are.equal("file", st.type)
    assert.is_true(math.abs(st.mtime - os.time()) < 60)
    assert.is_true(st.mtime_nsec >= 0 and st.mtime_nsec < 1e9)
    assert.is_true(st.ino > 0)
    assert.are.equal("directory", fs.stat(dir).type)
    assert.are.equal("file", fs.stat(dir .. "/link.txt").type)
    assert.are.equal("link", fs.lstat(dir .. "/link.txt").type)
  end)

  it("resolves a path with realpath", function()
    local real = assert(fs.realpath(dir .. "/./link.txt"))
    assert.are.equal(assert(fs.realpath(dir)) .. "/ten.txt", real)
  end)

  it("returns nil, message, code for a missing path and a NUL byte", function()
    local v, msg, code = fs.stat(dir .. "/missing")
    assert.is_nil(v)
    assert.are.equal("ENOENT", code)
    assert.matches("no such file", msg)
    assert.are.equal("ENOENT", select(3, fs.realpath(dir .. "/missing")))
    assert.are.equal("ENOENT", select(3, fs.open(dir .. "/missing")))
    assert.are.equal("EINVAL", select(3, fs.open(dir .. "/ten.txt\0.png")))
    assert.are.equal("ELOOP", select(3, fs.open(dir .. "/link.txt", "nofollow")))
  end)

  it("lists a directory synchronously, with each entry's type", function()
    support.write("fs/sub/.keep", "")
    local list = assert(fs.list(dir))
    local types = {}
    for _, e in ipairs(list) do types[e.name] = e.type end
    assert.are.same({ ["ten.txt"] = "file", ["link.txt"] = "link", sub = "dir" }, types)
    assert.are.same({ nil, "no such file or directory", "ENOENT" }, { fs.list(dir .. "/none") })
    assert.are.same({ nil, "path contains a NUL byte", "EINVAL" }, { fs.list(dir .. "\0x") })
  end)

  it("reads at an offset, returns an empty string at the end, and fstats", function()
    local f = assert(fs.open(dir .. "/ten.txt"))
    assert.are.equal("0123", f:read(4, 0))
    assert.are.equal("789", f:read(100, 7))
    assert.are.equal("", f:read(5, 10))
    assert.are.equal("", f:read(0, 0))
    assert.are.equal("0123456789", f:read(10))
    assert.are.equal(10, f:stat().size)
    f:close()
  end)

  it("closes idempotently and raises on use after close", function()
    local f = assert(fs.open(dir .. "/ten.txt"))
    f:close()
    f:close()
    assert.is_true(f:is_closed())
    assert.has_error(function() f:read(1, 0) end, "fs: file is closed")
    assert.has_error(function() f:read(-1, 0) end)
  end)

  it("closes a file that is only garbage collected", function()
    for _ = 1, 20 do assert(fs.open(dir .. "/ten.txt")) end
    collectgarbage()
  end)

  it("raises, naming the call, where the fiber cannot suspend", function()
    local ok, err = pcall(table.sort, { 1, 2 }, function() fs.stat(dir) return false end)
    assert.is_false(ok)
    assert.matches("fs.stat: cannot suspend inside a callback", tostring(err), 1, true)
  end)

  it("detaches requests of cancelled fibers and closes what they opened", function()
    local fibers = {}
    for i = 1, 50 do
      fibers[i] = fibril.schedule(function()
        local f = fs.open(dir .. "/ten.txt")
        fs.stat(dir)
        return f and f:read(10, 0)
      end)
    end
    fibril.sleep(0)
    for i = 1, 50 do fibril.cancel(fibers[i]) end
    for i = 1, 50 do pcall(fibril.await, fibers[i]) end
  end)

  it("leaves nothing behind when the process exits with requests in flight", function()
    local status, out, err = support.run_script(([[
      local fibril = require "fibril"
      local fs = require "fibril.core.fs"
      for _ = 1, 20 do                       -- reading when the loop stops
        fibril.schedule(function()
          local f = assert(fs.open(%q))
          while true do f:read(5, 0) end
        end)
      end
      local kept = assert(fs.open(%q))     -- never closed: lua_close's __gc closes it
      fibril.sleep(0.02)
      print(kept:is_closed())
      fibril.exit(0)
    ]]):format(dir .. "/ten.txt", dir .. "/ten.txt"))
    assert.are.equal("", err)
    assert.are.equal(0, status)
    assert.are.equal("false\n", out)
  end)
end)
