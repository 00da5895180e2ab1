-- Hot reload in development: a real `fibril run` child process, files rewritten under it.
local fibril = require "fibril"
local support = require "spec.support"

local function controller(version, extra)
  return ([[
local Controller = require "fibril.controller"
local fibril = require "fibril"
local C = Controller:extend()
local VERSION = %q
function C:show() self:render{ text = VERSION } end
function C:slow() fibril.sleep(0.6) self:render{ text = "slow " .. VERSION } end
function C:identity() self:render{ text = tostring(Controller) } end
%s
return C
]]):format(version, extra or "")
end

local ROUTES = [[
return function(r)
  r:get("/v", "home#show")
  r:get("/slow", "home#slow")
  r:get("/id", "home#identity")
  %s
end
]]

local function get(h, path)
  local res = support.raw(h.port, "GET " .. path .. " HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
  return res.status, res.body
end

-- Polls until path answers body (or the time is up); returns the seconds it took.
local function wait_for(h, path, body, timeout)
  local t0 = fibril.now()
  while fibril.now() - t0 < (timeout or 5) do
    local _, b = get(h, path)
    if b == body then return fibril.now() - t0 end
    fibril.sleep(0.01)
  end
  error(("%s never answered %q (last: %q)"):format(path, body, select(2, get(h, path))))
end

describe("the reloader", function()
  local h, name
  before_each(function()
    name = "reload" .. math.random(1e9)
    support.write(name .. "/routes.lua", ROUTES:format(""))
    support.write(name .. "/controllers/home.lua", controller("v1"))
    h = support.start_app(support.tmpdir() .. "/" .. name, "--env development")
  end)
  after_each(function()
    h.stop("TERM")
    h.wait_exit(5)
  end)

  it("serves a changed controller on the next request", function()
    assert.are.same({ 200, "v1" }, { get(h, "/v") })
    support.write(name .. "/controllers/home.lua", controller("v2"))
    local took = wait_for(h, "/v", "v2")
    assert.is_true(took < 2, "took " .. took .. " s")
    assert.matches('msg="code reloaded"', h.log(), 1, true)
  end)

  it("lets a request started before the change finish on the old code", function()
    local slow = fibril.schedule(function() return select(2, get(h, "/slow")) end)
    fibril.sleep(0.1)
    support.write(name .. "/controllers/home.lua", controller("v2"))
    wait_for(h, "/v", "v2")
    assert.are.equal("slow v1", fibril.await(slow))
    assert.are.same({ 200, "slow v2" }, { get(h, "/slow") })
  end)

  it("keeps running through a syntax error, names file and line, and recovers when it is fixed", function()
    local slow = fibril.schedule(function() return select(2, get(h, "/slow")) end)
    fibril.sleep(0.1)
    support.write(name .. "/controllers/home.lua", "local C = {\nreturn C ==\n")
    local status, body
    local t0 = fibril.now()
    repeat
      fibril.sleep(0.02)
      status, body = get(h, "/v")
    until status == 500 or fibril.now() - t0 > 5
    assert.are.equal(500, status)
    assert.matches("the app's code does not load", body, 1, true)
    assert.matches("controllers/home.lua:%d+:", body)
    assert.are.equal("slow v1", fibril.await(slow))
    assert.are.equal(1, support.count(h.log(), "reload failed"))   -- logged once
    support.write(name .. "/controllers/home.lua", controller("fixed"))
    wait_for(h, "/v", "fixed")
  end)

  it("picks up a new controller in a new subdirectory", function()
    support.write(name .. "/controllers/admin/panel.lua", [[
      local C = require("fibril.controller"):extend()
      function C:index() self:render{ text = "panel" } end
      return C]])
    support.write(name .. "/routes.lua", ROUTES:format('r:get("/admin", "admin.panel#index")'))
    wait_for(h, "/admin", "panel")
  end)

  it("reloads app modules but never fibril's own", function()
    local _, before = get(h, "/id")
    support.write(name .. "/controllers/home.lua", controller("v2"))
    wait_for(h, "/v", "v2")
    local _, after = get(h, "/id")
    assert.matches("^table: ", before)
    assert.are.equal(before, after)
  end)
end)

describe("without reloading", function()
  it("does not watch in production or with --no-reload", function()
    local name = "noreload" .. math.random(1e9)
    support.write(name .. "/routes.lua", ROUTES:format(""))
    support.write(name .. "/controllers/home.lua", controller("v1"))
    local dir = support.tmpdir() .. "/" .. name
    for _, args in ipairs({ "--env production", "--env development --no-reload" }) do
      local h = support.start_app(dir, args)
      assert.matches('reload="off"', h.log(), 1, true)
      support.write(name .. "/controllers/home.lua", controller("v2"))
      fibril.sleep(0.3)
      assert.are.equal("v1", select(2, get(h, "/v")))
      support.write(name .. "/controllers/home.lua", controller("v1"))
      h.stop("TERM")
      h.wait_exit(5)
    end
  end)
end)
