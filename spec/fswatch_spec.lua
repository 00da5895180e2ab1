-- fibril.core.fswatch (runtime/fswatch.c): a recursive inotify watcher for the code reloader:
-- changed paths come back as deduplicated lists, and directories are followed as they come
-- and go. Waits use next() with a timeout, never fixed sleeps.
local fibril = require "fibril"
local fswatch = require "fibril.core.fswatch"
local support = require "spec.support"

local function live()
  local handles, watchers = fswatch.live()
  return handles .. "/" .. watchers
end

local function settled(baseline) return support.settled(live, baseline) end

local function sh(fmt, ...)
  assert(os.execute(fmt:format(...)) == 0, fmt)
end

-- A fresh directory for each test, holding files (relative name -> content); returns its
-- absolute path and its path relative to the spec temp dir (for support.write).
local count = 0
local function tree(files)
  count = count + 1
  local rel = "fswatch/t" .. count
  sh("mkdir -p '%s/%s'", support.tmpdir(), rel)
  for name, content in pairs(files or {}) do support.write(rel .. "/" .. name, content) end
  return support.tmpdir() .. "/" .. rel, rel
end

-- Takes lists from w:next until every wanted path has come (or 2 s passed); returns the set
-- of paths seen and how many lists it took.
local function wait_for(w, wanted)
  local seen, lists, deadline = {}, 0, fibril.now() + 2
  local function missing()
    for _, p in ipairs(wanted) do if not seen[p] then return true end end
    return false
  end
  while missing() and fibril.now() < deadline do
    local list = w:next(math.max(deadline - fibril.now(), 0))
    if not list then break end
    lists = lists + 1
    for _, p in ipairs(list) do seen[p] = true end
  end
  return seen, lists
end

describe("fibril.core.fswatch", function()
  local baseline
  setup(function() baseline = settled(live()) end)
  after_each(function() assert.are.equal(baseline, settled(baseline)) end)

  it("reports a write to an existing file by its absolute path", function()
    local dir, rel = tree({ ["app.lua"] = "return 1" })
    local w = assert(fswatch.watch(dir))
    assert.are.equal(1, w:dirs())
    support.write(rel .. "/app.lua", "return 2")
    assert.are.same({ dir .. "/app.lua" }, w:next(2))
    w:close()
  end)

  it("returns a burst of writes as one deduplicated list in arrival order", function()
    local dir, rel = tree({ ["a.lua"] = "", ["b.lua"] = "" })
    local w = assert(fswatch.watch(dir))
    for i = 1, 3 do support.write(rel .. "/a.lua", "a" .. i) end
    for i = 1, 3 do support.write(rel .. "/b.lua", "b" .. i) end
    support.write(rel .. "/a.lua", "again")
    assert.are.same({ dir .. "/a.lua", dir .. "/b.lua" }, w:next(2))
    w:close()
  end)

  it("returns at once when changes are already pending", function()
    local dir, rel = tree({ ["a.lua"] = "" })
    local w = assert(fswatch.watch(dir))
    support.write(rel .. "/a.lua", "1")
    fibril.sleep(0.05)                       -- the events arrive with nobody waiting
    local t0 = fibril.now()
    assert.are.same({ dir .. "/a.lua" }, w:next(2))
    assert.is_true(fibril.now() - t0 < 0.015)
    w:close()
  end)

  it("follows a new subdirectory and reports the files written into it", function()
    local dir, rel = tree()
    local w = assert(fswatch.watch(dir))
    sh("mkdir '%s/sub'", dir)
    support.write(rel .. "/sub/x.lua", "1")
    assert.is_true(wait_for(w, { dir .. "/sub/x.lua" })[dir .. "/sub/x.lua"])
    assert.are.equal(2, w:dirs())
    support.write(rel .. "/sub/x.lua", "2")
    assert.is_true(wait_for(w, { dir .. "/sub/x.lua" })[dir .. "/sub/x.lua"])
    w:close()
  end)

  it("follows a nested tree made with mkdir -p, including files already in it", function()
    local dir, rel = tree()
    local w = assert(fswatch.watch(dir))
    sh("mkdir -p '%s/a/b/c' && echo 1 >'%s/a/b/c/x.lua'", dir, dir)
    local x = dir .. "/a/b/c/x.lua"
    assert.is_true(wait_for(w, { x })[x])
    assert.are.equal(4, w:dirs())
    support.write(rel .. "/a/b/c/x.lua", "2")
    support.write(rel .. "/a/b/y.lua", "3")
    local seen = wait_for(w, { x, dir .. "/a/b/y.lua" })
    assert.is_true(seen[x] and seen[dir .. "/a/b/y.lua"])
    w:close()
  end)

  it("reports a file and a directory renamed into the tree", function()
    local dir = tree()
    local outside = tree({ ["f.lua"] = "1", ["pkg/init.lua"] = "2" })
    local w = assert(fswatch.watch(dir))
    sh("mv '%s/f.lua' '%s/moved.lua' && mv '%s/pkg' '%s/pkg'", outside, dir, outside, dir)
    local seen = wait_for(w, { dir .. "/moved.lua", dir .. "/pkg/init.lua" })
    assert.is_true(seen[dir .. "/moved.lua"])
    assert.is_true(seen[dir .. "/pkg/init.lua"])
    assert.are.equal(2, w:dirs())
    w:close()
  end)

  it("stops watching a directory that is deleted or moved away", function()
    local dir = tree({ ["keep/k.lua"] = "", ["gone/deep/f.lua"] = "", ["away/a.lua"] = "" })
    local w = assert(fswatch.watch(dir))
    assert.are.equal(5, w:dirs())
    sh("rm -rf '%s/gone'", dir)
    assert.is_true(wait_for(w, { dir .. "/gone" })[dir .. "/gone"])
    assert.are.equal(3, w:dirs())
    sh("mv '%s/away' '%s/elsewhere'", dir, tree())
    assert.is_true(wait_for(w, { dir .. "/away" })[dir .. "/away"])
    assert.are.equal(2, w:dirs())
    w:close()
  end)

  it("skips hidden and symlinked directories", function()
    local dir = tree({ [".git/HEAD"] = "", ["lib/a.lua"] = "" })
    sh("ln -s lib '%s/link'", dir)
    local w = assert(fswatch.watch(dir))
    assert.are.equal(2, w:dirs())
    w:close()
  end)

  it("returns err.code 'timeout' from next() when nothing changes", function()
    local w = assert(fswatch.watch((tree())))
    local t0 = fibril.now()
    local list, err = w:next(0.05)
    assert.is_nil(list)
    assert.are.equal("timeout", err.code)
    assert.is_true(fibril.now() - t0 >= 0.045)
    w:close()
  end)

  it("releases a fiber cancelled in next(), and lets another wait after it", function()
    local dir, rel = tree({ ["a.lua"] = "" })
    local w = assert(fswatch.watch(dir))
    local g = fibril.schedule(function() return w:next() end)
    fibril.sleep(0.01)
    local ok, msg = pcall(w.next, w, 1)
    assert.is_false(ok)
    assert.matches("another fiber is already waiting", msg)
    g:cancel()
    local list, err = fibril.await(g)
    assert.is_nil(list)
    assert.are.equal("cancelled", err.code)
    support.write(rel .. "/a.lua", "1")
    assert.are.same({ dir .. "/a.lua" }, w:next(2))
    w:close()
  end)

  it("gives { '*' } once more than max_pending paths are pending", function()
    local dir, rel = tree()
    local w = assert(fswatch.watch(dir, { max_pending = 3 }))
    for i = 1, 5 do support.write(rel .. "/f" .. i .. ".lua", "") end
    assert.are.same({ "*" }, w:next(2))
    support.write(rel .. "/f1.lua", "again")
    assert.are.same({ dir .. "/f1.lua" }, w:next(2))
    w:close()
  end)

  it("resumes a fiber waiting in next() with nil, 'closed' when the watcher closes", function()
    local w = assert(fswatch.watch((tree())))
    local g = fibril.schedule(function() return w:next() end)
    fibril.sleep(0.01)
    w:close()
    local list, msg = fibril.await(g)
    assert.is_nil(list)
    assert.are.equal("closed", msg)
    w:close()
    assert.are.equal(0, w:dirs())
    assert.has_error(function() w:next(0) end, "fswatch: watcher is closed")
  end)

  it("releases every handle of a watcher that is collected unclosed", function()
    local w = assert(fswatch.watch((tree({ ["a/x.lua"] = "", ["b/y.lua"] = "" }))))
    assert.are.equal(3, w:dirs())
    assert.are_not.equal(baseline, live())
    w = nil -- luacheck: ignore 311
    assert.are.equal(baseline, settled(baseline))
  end)

  it("returns nil and a message naming a missing directory", function()
    local missing = support.tmpdir() .. "/fswatch/missing"
    local w, msg, code = fswatch.watch(missing)
    assert.is_nil(w)
    assert.is_truthy(msg:find(missing, 1, true))
    assert.are.equal("ENOENT", code)
    assert.are.equal("ENOTDIR", select(3, fswatch.watch(support.write("fswatch/file", ""))))
  end)

  it("fails past max_dirs and rejects bad options", function()
    local dir = tree({ ["a/1"] = "", ["b/2"] = "", ["c/3"] = "" })
    local w, msg, code = fswatch.watch(dir, { max_dirs = 3 })
    assert.is_nil(w)
    assert.matches("more than 3 directories", msg)
    assert.are.equal("limit", code)
    assert.has_error(function() fswatch.watch(dir, { max_pending = 0 }) end)
    assert.has_error(function() fswatch.watch(dir, { max_dirs = 1.5 }) end)
  end)
end)
