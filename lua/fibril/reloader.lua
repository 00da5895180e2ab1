--- fibril.reloader: hot code reload in development. A fiber watches the app directory tree
--- (runtime/fswatch.c: one inotify watch per directory, new ones included); a change to a .lua
--- file marks the code stale, and the next unit of work, before it starts, unloads the app's
--- modules and loads the app again. Units already running finish on the code they started
--- with. A file that does not load keeps the old code running and is reported, once per
--- change, until it is fixed. docs/reloading.md.
local fswatch = require "fibril.core.fswatch"
local fibril = require "fibril"
local executor = require "fibril.executor"
local log = require "fibril.log"

local pairs, ipairs, pcall, tostring, type, find, sub = pairs, ipairs, pcall, tostring, type,
                                                        string.find, string.sub
local searchpath = package.searchpath

local M = {}

local DEBOUNCE = 0.05        -- seconds of quiet that end a burst of file events

-- Lua 5.1 has no package.searchpath; LuaJIT 2.1 does, but keep a fallback.
local function find_in(name, path)
  if searchpath then return searchpath(name, path) end
  local file = name:gsub("%.", "/")
  for template in path:gmatch("[^;]+") do
    local candidate = template:gsub("%?", file)
    local f = io.open(candidate)
    if f then f:close() return candidate end
  end
end

--- The package.path entries that reach into the app directory (set by fibril.app).
local function app_path(dir)
  return dir .. "/?.lua;" .. dir .. "/?/init.lua;" .. dir .. "/lib/?.lua;" .. dir .. "/lib/?/init.lua"
end

--- Unloads every module that was loaded from the app directory; never fibril's own modules
--- or system modules. Returns how many were unloaded.
function M.unload_app_modules(dir)
  local path, n = app_path(dir), 0
  for name in pairs(package.loaded) do
    if type(name) == "string" and not find(name, "^fibril") and find_in(name, path) then
      package.loaded[name] = nil
      n = n + 1
    end
  end
  return n
end

-- Swaps a freshly loaded app's parts into the live app table, in place: handlers read
-- app.router and app.controllers for every request.
local function adopt(app, fresh)
  for _, k in ipairs({ "config", "router", "controllers", "daemons", "subscribers", "tasks",
                       "public" }) do
    app[k] = fresh[k]
  end
  app.load_error = nil
end

--- Reloads now: unload, load, to_prepare. On a load error the app keeps its old code and
--- app.load_error says why (file:line: message).
function M.reload(app)
  local App = require "fibril.app"
  local t0 = fibril.now()
  local n = M.unload_app_modules(app.dir)
  local ok, fresh = pcall(App.load, app.dir, app.env, app.overrides)
  if not ok then
    local msg = App.is_boot_error(fresh) and fresh.message or tostring(fresh)
    if msg ~= app.load_error then log.error("reload failed: the old code keeps running", { err = msg }) end
    app.load_error = msg
    return false
  end
  adopt(app, fresh)
  executor.prepare()
  log.info("code reloaded", { modules = n, ms = ("%.1f"):format((fibril.now() - t0) * 1000) })
  return true
end

-- A .lua file, "*" (the watcher lost count), or a directory moved or removed (a name with no
-- extension): any of them may change what the app loads.
local function is_code(path)
  return path == "*" or sub(path, -4) == ".lua" or not find(path:match("[^/]*$"), ".", 1, true)
end

--- Starts watching app.dir (development); returns a handle with stop(). Before each unit of
--- work, executor calls the check that reloads when something changed; an app with daemons
--- reloads as soon as the burst of changes ends.
function M.start(app)
  local watcher, err = fswatch.watch(app.dir)
  if not watcher then error(tostring(err), 0) end
  local state = { stale = false, watcher = watcher, changes = 0 }

  executor.set_before_unit(function()
    if state.stale then
      state.stale = false
      M.reload(app)
    end
  end)

  state.fiber = fibril.schedule(function()
    while true do
      local changed = watcher:next()
      if not changed then return end                        -- closed
      local code = false
      for _, p in ipairs(changed) do code = code or is_code(p) end
      -- The rest of the burst: events until DEBOUNCE passes without one.
      while true do
        local more = watcher:next(DEBOUNCE)
        if not more then break end
        for _, p in ipairs(more) do code = code or is_code(p) end
      end
      if code then
        state.changes = state.changes + 1
        state.stale = true
        log.debug("code changed", { changes = state.changes })
        -- Daemons may not start a unit of work for a long while (a BLPOP waits): with
        -- daemons running, reload now, and they restart on the new code (docs/daemons.md).
        if app.daemons and #app.daemons > 0 then
          state.stale = false
          M.reload(app)
        end
      end
    end
  end)

  function state.stop()
    executor.set_before_unit(nil)
    watcher:close()
  end
  return state
end

return M
