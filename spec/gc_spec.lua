-- fibril.gc and the gc section of config/app.lua: `fibril run` paces the collector from it
-- (docs/gc.md). The served apps live in a temp dir and run in a child process.
local support = require "spec.support"
local gc = require "fibril.gc"

local CONTROLLER = [[
local Controller = require "fibril.controller"
local C = Controller:extend()
-- Reads the pace without changing it: collectgarbage("set...") returns the previous value.
local function read(what)
  local v = collectgarbage(what, 200)
  collectgarbage(what, v)
  return v
end
function C:show()
  local gc = require "fibril.gc"
  collectgarbage("collect")                 -- a cycle ends: the pace is worked out again
  local s = gc.stats()
  self:render{ json = { pause = read("setpause"), stepmul = read("setstepmul"), kept = s.kept,
                        planned_pause = s.pause, planned_stepmul = s.stepmul, cycles = s.cycles,
                        pacing = s.pacing } }
end
return C
]]

local function app(name, config)
  support.write(name .. "/config/app.lua", config)
  support.write(name .. "/routes.lua", 'return function(r) r:get("/gc", "pace#show") end\n')
  support.write(name .. "/controllers/pace.lua", CONTROLLER)
  return support.tmpdir() .. "/" .. name
end

local function pace(dir)
  local server = support.start_app(dir, "--env production")
  local body = support.curl(("http://127.0.0.1:%d/gc"):format(server.port))
  server.stop()
  return require("fibril.json").decode(body)
end

describe("the collector's pace in a served app", function()
  it("paces by default with gc.pause 200, gc.stepmul 25 and gc.min_growth_bytes 8 MiB", function()
    local p = pace(app("gc_default", "return {}\n"))
    assert.is_true(p.pacing)
    assert.is_true(p.cycles >= 1)
    local pause, stepmul = gc.plan(p.kept, { pause = 200, stepmul = 25, min_growth = 8388608 })
    assert.are.same({ pause, stepmul }, { p.pause, p.stepmul })
    assert.are.same({ pause, stepmul }, { p.planned_pause, p.planned_stepmul })
    -- a served app keeps far less than 8 MiB: cycles rest until it has grown by 8 MiB
    assert.is_true(p.kept < 8388608)
    assert.are.equal(math.ceil(100 * (p.kept + 8388608) / p.kept), p.pause)
    assert.are.equal(25, p.stepmul)
  end)

  it("follows the gc section of config/app.lua", function()
    local dir = app("gc_set", "return { production = { gc = { pause = 300, stepmul = 250, "
                              .. "min_growth_bytes = 0 } } }\n")
    local p = pace(dir)
    assert.are.same({ 300, 250 }, { p.pause, p.stepmul })
  end)

  it("refuses a pace out of range at boot, naming the key", function()
    local dir = app("gc_bad", "return { production = { gc = { stepmul = 5 } } }\n")
    local code, _, err = support.run("run '" .. dir .. "' --port 0 --env production")
    assert.are_not.equal(0, code)
    assert.matches("'gc.stepmul' must be a whole number from 10 to 10000", err)
    dir = app("gc_bad2", "return { production = { gc = { min_growth_bytes = -1 } } }\n")
    code, _, err = support.run("run '" .. dir .. "' --port 0 --env production")
    assert.are_not.equal(0, code)
    assert.matches("'gc.min_growth_bytes' must be an integer >= 0", err)
  end)
end)

describe("fibril.gc", function()
  after_each(function() gc.stop() end)

  it("plans a small heap by its least growth, with the least stepmul", function()
    local s = { pause = 200, stepmul = 25, min_growth = 8 * 2^20 }
    local pause, stepmul = gc.plan(512 * 1024, s)
    assert.are.equal(100 * (0.5 + 8) / 0.5, pause)    -- a cycle after 8 MiB more: 1700%
    assert.are.equal(25, stepmul)
  end)

  it("plans a large heap by its pause, raising stepmul to mark it within that growth", function()
    local s = { pause = 200, stepmul = 25, min_growth = 8 * 2^20 }
    local pause, stepmul = gc.plan(100 * 2^20, s)
    assert.are.equal(200, pause)
    assert.are.equal(103, stepmul)                 -- 102.4 * kept / growth, growth = kept
    pause, stepmul = gc.plan(100 * 2^20, { pause = 120, stepmul = 25, min_growth = 0 })
    assert.are.equal(120, pause)
    assert.are.equal(512, stepmul)                 -- growth is a fifth: five times the work
    assert.are.equal(10000, (gc.plan(1, s)))       -- never past LuaJIT's range
  end)

  it("refuses bad settings", function()
    assert.has_error(function() gc.pace() end, "gc.pace: expected { pause, stepmul, min_growth }")
    assert.has_error(function() gc.pace{ pause = 99, stepmul = 25, min_growth = 0 } end,
                     "gc.pace: pause must be a whole number from 100 to 10000")
    assert.has_error(function() gc.pace{ pause = 200, stepmul = 9, min_growth = 0 } end,
                     "gc.pace: stepmul must be a whole number from 10 to 10000")
    assert.has_error(function() gc.pace{ pause = 200, stepmul = 25, min_growth = 0.5 } end,
                     "gc.pace: min_growth must be a whole number of bytes")
  end)

  it("works the pace out again after every cycle, and stops", function()
    local s = { pause = 150, stepmul = 30, min_growth = 2 * 2^20 }
    gc.pace(s)
    local before = gc.stats().cycles
    for _ = 1, 3 do collectgarbage("collect") end
    local st = gc.stats()
    assert.is_true(st.pacing)
    assert.is_true(st.cycles >= before + 3)
    local pause, stepmul = gc.plan(st.kept, s)
    assert.are.same({ pause, stepmul }, { st.pause, st.stepmul })
    assert.are.equal(pause, collectgarbage("setpause", pause))
    assert.are.equal(stepmul, collectgarbage("setstepmul", stepmul))
    gc.stop()
    collectgarbage("collect")
    collectgarbage("collect")
    assert.are.equal(st.cycles, gc.stats().cycles)       -- the chain of sentinels ended
    assert.is_false(gc.stats().pacing)
    assert.are.equal(200, collectgarbage("setpause", 200))
  end)

  it("keeps collecting as garbage is made, the heap within about kept + 2 x growth", function()
    local growth = 4 * 2^20
    gc.pace{ pause = 110, stepmul = 25, min_growth = growth }
    collectgarbage("collect")
    local kept, cycles = gc.stats().kept, gc.stats().cycles
    local peak, recent = 0, {}
    for i = 1, 400000 do                         -- ~40 MiB of short-lived tables
      recent[i % 64 + 1] = { i, i + 1, tostring(i) }
      if i % 1000 == 0 then peak = math.max(peak, collectgarbage("count") * 1024) end
    end
    assert.are.equal(64, #recent)
    assert.is_true(gc.stats().cycles >= cycles + 3, "cycles ran while allocating")
    -- a growth to start a cycle, about one more while it marks and sweeps (its garbage, then
    -- the string table, are swept a step per KiB allocated)
    local bound = kept + 2.5 * math.max(growth, kept * 0.1)
    assert.is_true(peak < bound, ("peak %.1f MiB, bound %.1f MiB"):format(peak / 2^20, bound / 2^20))
  end)
end)
