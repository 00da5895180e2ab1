--- fibril.cli: the app commands of the fibril binary: run, routes, new. runtime/main.c calls
--- main(command, args...) in the main fiber; each command returns through fibril.exit.
local fibril = require "fibril"

local stderr, format, tonumber = io.stderr, string.format, tonumber

local M = {}

local function die(msg, status)
  stderr:write("fibril: ", msg, "\n")
  fibril.exit(status or 1)
end

-- Parses "APP [--flag value]..." per spec: { ["--port"] = "number", ["--reload"] = true }.
local function parse(command, args, spec)
  local app, opts, i = nil, {}, 1
  while i <= #args do
    local a = args[i]
    local kind = spec[a]
    if kind == true then
      opts[a] = true
    elseif kind then
      local v = args[i + 1]
      if v == nil then die(format("%s: %s needs a value", command, a), 2) end
      if kind == "number" then
        v = tonumber(v)
        if not v then die(format("%s: %s needs a number, got '%s'", command, a, args[i + 1]), 2) end
      end
      opts[a] = v
      i = i + 1
    elseif a:sub(1, 2) == "--" then
      die(format("%s: unknown option %s", command, a), 2)
    elseif app then
      die(format("%s: one app directory only (got '%s' and '%s')", command, app, a), 2)
    else
      app = a
    end
    i = i + 1
  end
  if not app then die(format("%s: which app? (fibril %s APP)", command, command), 2) end
  return app, opts
end

local function load_app(app_dir, env, overrides)
  local App = require "fibril.app"
  local ok, app = pcall(App.load, app_dir, env, overrides)
  if not ok then
    die(App.is_boot_error(app) and app.message or tostring(app), 1)
  end
  return app
end

local RUN_FLAGS = { ["--host"] = "string", ["--port"] = "number", ["--workers"] = "number",
                    ["--env"] = "string", ["--reload"] = true, ["--no-reload"] = true,
                    ["--reuseport-worker"] = true }   -- set by fibril.workers' master only

--- fibril run APP [--host H] [--port P] [--workers N] [--env E] [--reload|--no-reload]
function M.run(args)
  local app_dir, o = parse("run", args, RUN_FLAGS)
  local env = o["--env"] or os.getenv("FIBRIL_ENV") or "development"
  local overrides = { host = o["--host"], port = o["--port"], workers = o["--workers"] }
  if o["--reload"] then overrides.reload = true elseif o["--no-reload"] then overrides.reload = false end
  local app = load_app(app_dir, env, overrides)
  local server = require "fibril.server"
  if o["--reuseport-worker"] then
    return fibril.exit(require("fibril.workers").worker(app))
  end
  if app.config.workers > 1 then
    return fibril.exit(require("fibril.workers").run(app))
  end
  local ok, err = pcall(server.run, app)
  if not ok then die(tostring(err), 1) end
  fibril.exit(err)
end

--- fibril routes APP: the route table.
function M.routes(args)
  local app_dir = parse("routes", args, {})
  local app = load_app(app_dir, os.getenv("FIBRIL_ENV") or "development")
  local rows, widths = {}, { 6, 4 }
  for _, r in ipairs(app.router:routes()) do
    local target = r.target or (r.controller and (r.controller .. "#" .. r.action)) or "(function)"
    rows[#rows + 1] = { r.method, r.path, target }
    if #r.method > widths[1] then widths[1] = #r.method end
    if #r.path > widths[2] then widths[2] = #r.path end
  end
  local line = "%-" .. widths[1] .. "s  %-" .. widths[2] .. "s  %s\n"
  io.stdout:write(format(line, "METHOD", "PATH", "TARGET"))
  for _, row in ipairs(rows) do io.stdout:write(format(line, row[1], row[2], row[3])) end
  fibril.exit(0)
end

--- fibril new NAME: scaffolds a working app.
function M.new(args)
  local name = parse("new", args, {})
  require("fibril.scaffold").create(name, die)
  io.stdout:write(format("created %s: run it with `fibril run %s`\n", name, name))
  fibril.exit(0)
end

function M.main(command, ...)
  local args = { ... }
  local cmd = M[command]
  if type(cmd) ~= "function" or command == "main" then
    die("unknown command '" .. tostring(command) .. "'", 2)
  end
  return cmd(args)
end

return M
