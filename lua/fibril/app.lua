--- fibril.app: loads an app directory: config/app.lua for the environment, routes.lua, the
--- controllers the routes name, the daemons in APP/daemons, the event subscribers in
--- APP/subscribers and task classes in APP/tasks, and APP/lib on package.path.
--- Every boot error names the file (and line, when Lua knows it) and says what to do.
local config = require "fibril.config"
local Router = require "fibril.router"
local Controller = require "fibril.controller"
local Daemon = require "fibril.daemon"
local fs = require "fibril.core.fs"

local type, error, pcall, loadfile, tostring, ipairs, format, sort, rawget =
      type, error, pcall, loadfile, tostring, ipairs, string.format, table.sort, rawget
local open = io.open

local M = {}

local function exists(path)
  local f = open(path, "r")
  if f then f:close() return true end
  return false
end

local function is_dir(path)
  local f = open(path .. "/.", "r")
  if f then f:close() return true end
  return false
end

-- Raises a boot error: a message for a person, no Lua position prefix.
local function boot_error(msg) error({ boot = true, message = msg }, 0) end

local function add_paths(dir)
  local prefix = dir .. "/?.lua;" .. dir .. "/?/init.lua;"
                 .. dir .. "/lib/?.lua;" .. dir .. "/lib/?/init.lua;"
  if package.path:sub(1, #prefix) ~= prefix then package.path = prefix .. package.path end
end

local function load_routes(dir)
  local file = dir .. "/routes.lua"
  if not exists(file) then boot_error("no routes.lua in " .. dir .. " (an app needs one)") end
  local chunk, err = loadfile(file)
  if not chunk then boot_error(err) end
  local ok, fn = pcall(chunk)
  if not ok then boot_error(tostring(fn)) end
  if type(fn) ~= "function" then
    boot_error(file .. ": must return function(r) ... end, got " .. type(fn))
  end
  local ok2, router = pcall(Router.load, fn)
  if not ok2 then boot_error(tostring(router)) end
  return router
end

-- require with the error turned into a boot error naming the file.
local function load_controller(dir, name)
  local module = "controllers." .. name
  local file = dir .. "/controllers/" .. name:gsub("%.", "/") .. ".lua"
  if not exists(file) then
    boot_error(format("%s/routes.lua names controller '%s' but %s does not exist", dir, name, file))
  end
  local ok, C = pcall(require, module)
  if not ok then boot_error(tostring(C)) end
  if type(C) ~= "table" then
    boot_error(format("%s: must return a controller (Controller:extend()), got %s", file, type(C)))
  end
  if not C.name then C.name = name end
  return C
end

-- Every APP/daemons/*.lua, in file name order; each must return a daemon class. The name
-- defaults to the file's; two daemons may not share a name (it tags their log lines).
local function load_daemons(dir)
  local entries, err, code = fs.list(dir .. "/daemons")
  if not entries then
    if code == "ENOENT" then return {} end
    boot_error(format("cannot list %s/daemons: %s", dir, tostring(err)))
  end
  local names = {}
  for _, e in ipairs(entries) do
    -- Hidden files (editor locks) are skipped; a dot inside the name would make require
    -- look in a subdirectory, so it is an error rather than a file silently left out.
    local base = e.type ~= "dir" and e.name:match("^([^.].*)%.lua$")
    if base and base:find(".", 1, true) then
      boot_error(format("%s/daemons/%s: a daemon file's name cannot contain '.' (require reads "
                        .. "it as a directory)", dir, e.name))
    end
    if base then names[#names + 1] = base end
  end
  sort(names)
  local daemons, seen = {}, {}
  for _, base in ipairs(names) do
    local file = dir .. "/daemons/" .. base .. ".lua"
    local ok, D = pcall(require, "daemons." .. base)
    if not ok then boot_error(tostring(D)) end
    if not Daemon.is_daemon(D) then
      boot_error(format('%s: must return a daemon (Daemon:extend("Name")), got %s', file, type(D)))
    end
    if rawget(D, "name") == nil then D.name = base end
    if D.scope ~= "node" and D.scope ~= "worker" then
      boot_error(format('%s: scope must be "node" or "worker", got %s', file, tostring(D.scope)))
    end
    if D.perform == Daemon.perform then boot_error(file .. ": the daemon has no perform method") end
    if seen[D.name] then
      boot_error(format("%s and %s both name their daemon '%s'", seen[D.name], file, D.name))
    end
    seen[D.name] = file
    daemons[#daemons + 1] = D
  end
  return daemons
end

-- Every APP/<sub>/*.lua in file name order, each required as "<sub>.<base>" and checked by
-- is_ok (what it must return, for the error). Returns the modules and their file names.
local function load_each(dir, sub, is_ok, what)
  local entries, err, code = fs.list(dir .. "/" .. sub)
  if not entries then
    if code == "ENOENT" then return {} end
    boot_error(format("cannot list %s/%s: %s", dir, sub, tostring(err)))
  end
  local names = {}
  for _, e in ipairs(entries) do
    local base = e.type ~= "dir" and e.name:match("^([^.].*)%.lua$")
    if base and base:find(".", 1, true) then
      boot_error(format("%s/%s/%s: the file's name cannot contain '.' (require reads it as a "
                        .. "directory)", dir, sub, e.name))
    end
    if base then names[#names + 1] = base end
  end
  sort(names)
  local mods = {}
  for _, base in ipairs(names) do
    local ok, m = pcall(require, sub .. "." .. base)
    if not ok then boot_error(tostring(m)) end
    if not is_ok(m) then
      boot_error(format("%s/%s/%s.lua: must return %s, got %s", dir, sub, base, what, type(m)))
    end
    mods[#mods + 1] = m
  end
  return mods
end

-- APP/events, APP/tasks (task classes), then APP/subscribers: the subscribers declare their subscriptions
-- as they load, so the whole event graph is known at boot (fibril events APP prints it).
local function load_subscribers(dir)
  local events = require "fibril.events"
  local Subscriber = require "fibril.subscriber"
  local Task = require "fibril.task"
  load_each(dir, "events", events.is_class, 'an event class (events.define(...))')
  local tasks = load_each(dir, "tasks", Task.is_task, 'a task class (Task:extend("Name"))')
  -- A subscriber file that fails leaves the old subscriptions in place (a reload keeps the
  -- old code running).
  local saved = events.reset_subscriptions()
  local ok, subs = pcall(load_each, dir, "subscribers", Subscriber.is_subscriber,
                         'a subscriber (Subscriber:extend("Name"))')
  if not ok then
    events.restore_subscriptions(saved)
    error(subs, 0)
  end
  local seen = {}
  for _, S in ipairs(subs) do
    if seen[S.name] then boot_error(format("%s: two subscribers are named '%s'", dir, S.name)) end
    seen[S.name] = true
    if S.call == Subscriber.call then
      boot_error(format("%s/subscribers: subscriber %s has no call method", dir, S.name))
    end
  end
  return subs, tasks
end

--- Loads the app at dir for env; overrides are command-line settings ({ port = 4000 }).
---@return table app { dir, env, config, router, controllers, daemons, subscribers, tasks, public }
function M.load(dir, env, overrides)
  if type(dir) ~= "string" or not is_dir(dir) then
    boot_error(format("no app directory at '%s'", tostring(dir)))
  end
  dir = dir:gsub("/+$", "")
  add_paths(dir)
  local ok, cfg = pcall(config.load, dir, env or "development", overrides)
  if not ok then boot_error(tostring(cfg)) end
  config.set_current(cfg)
  local router = load_routes(dir)
  local controllers = {}
  for _, route in ipairs(router:routes()) do
    local name = route.controller
    if name and not controllers[name] then controllers[name] = load_controller(dir, name) end
    if name and not Controller.has_action(controllers[name], route.action) then
      boot_error(format("%s/routes.lua: %s %s -> %s, but controllers/%s.lua has no action '%s'",
                        dir, route.method, route.path, route.target, name, route.action))
    end
  end
  local daemons = load_daemons(dir)
  local subscribers, tasks = load_subscribers(dir)
  local public = dir .. "/public"
  return {
    dir = dir, env = cfg.env, config = cfg, router = router, controllers = controllers,
    daemons = daemons, subscribers = subscribers, tasks = tasks,
    overrides = overrides,
    public = is_dir(public) and public or nil,
  }
end

--- True when err came from M.load (a message for a person, without a traceback).
function M.is_boot_error(err) return type(err) == "table" and err.boot == true end

return M
