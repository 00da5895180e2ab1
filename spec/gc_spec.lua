-- gc.pause and gc.stepmul (config/app.lua): `fibril run` sets the collector's pace from them
-- (docs/http.md, "Garbage collection"). Apps in a temp dir, served by a child process.
local support = require "spec.support"

local CONTROLLER = [[
local Controller = require "fibril.controller"
local C = Controller:extend()
-- Reads the pace without changing it: collectgarbage("set...") returns the previous value.
local function read(what)
  local v = collectgarbage(what, 200)
  collectgarbage(what, v)
  return v
end
function C:show() self:render{ json = { pause = read("setpause"), stepmul = read("setstepmul") } } end
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
  it("is gc.pause 120 and gc.stepmul 100 by default", function()
    assert.are.same({ pause = 120, stepmul = 100 }, pace(app("gc_default", "return {}\n")))
  end)

  it("follows gc.pause and gc.stepmul from config/app.lua", function()
    local dir = app("gc_set", "return { production = { gc = { pause = 300, stepmul = 250 } } }\n")
    assert.are.same({ pause = 300, stepmul = 250 }, pace(dir))
  end)

  it("refuses a pace below 100 at boot, naming the key", function()
    local dir = app("gc_bad", "return { production = { gc = { stepmul = 50 } } }\n")
    local code, _, err = support.run("run '" .. dir .. "' --port 0 --env production")
    assert.are_not.equal(0, code)
    assert.matches("'gc.stepmul' must be a whole number from 100 to 10000", err)
  end)
end)
