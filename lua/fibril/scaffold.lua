--- fibril.scaffold: `fibril new NAME` writes a small working app: config, routes, one
--- controller and one spec, which `fibril run NAME` serves at once.
local M = {}

local FILES = {
  ["config/app.lua"] = [[
-- Settings per environment; every key and its default: docs/configuration.md.
return {
  development = { port = 3000 },
  test = { port = 3001 },
  production = { port = 3000, log = { level = "info" } },
}
]],
  ["routes.lua"] = [[
return function(r)
  r:get("/", "home#index")
  r:get("/hello/:name", "home#hello")
end
]],
  ["controllers/home.lua"] = [[
local Controller = require "fibril.controller"

local Home = Controller:extend()

function Home:index()
  self:render{ json = { app = "%s", ok = true } }
end

function Home:hello()
  self:render{ text = "Hello, " .. self.params.name .. "!" }
end

return Home
]],
  ["spec/home_spec.lua"] = [[
-- Run with: fibril test spec (from the app directory)
local App = require "fibril.app"
local Controller = require "fibril.controller"

describe("home", function()
  local app = App.load(".", "test")

  local function get(path)
    local route, params = app.router:match("GET", path)
    local req = { method = "GET", path = path, headers = {}, body = "", id = "spec" }
    return Controller.dispatch(app.controllers[route.controller], route.action, req, params)
  end

  it("greets by name", function()
    local res = get("/hello/ada")
    assert.are.equal(200, res.status)
    assert.are.equal("Hello, ada!", res.body)
  end)
end)
]],
  ["public/robots.txt"] = "User-agent: *\nDisallow:\n",
  ["lib/.keep"] = "",
  ["daemons/.keep"] = "",             -- background loops: docs/daemons.md
}

local ORDER = { "config/app.lua", "routes.lua", "controllers/home.lua", "spec/home_spec.lua",
                "public/robots.txt", "lib/.keep", "daemons/.keep" }

--- Creates the app directory name; calls die(message) when it exists or cannot be written.
function M.create(name, die)
  if not name:match("^[%w_%-%./]+$") then
    return die("new: an app name may use letters, digits, '_', '-', '.' and '/' only")
  end
  local probe = io.open(name .. "/.", "r")
  if probe then
    probe:close()
    return die("new: '" .. name .. "' already exists")
  end
  local app_name = name:match("([^/]+)/*$")
  for _, rel in ipairs(ORDER) do
    local path = name .. "/" .. rel
    local dir = path:match("^(.*)/[^/]+$")
    if os.execute("mkdir -p '" .. dir .. "'") ~= 0 then return die("new: cannot create " .. dir) end
    local f, err = io.open(path, "w")
    if not f then return die("new: " .. tostring(err)) end
    local content = FILES[rel]
    if rel == "controllers/home.lua" then content = content:format(app_name) end
    f:write(content)
    f:close()
  end
end

return M
