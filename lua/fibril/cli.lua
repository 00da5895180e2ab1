--- fibril.cli: the app commands of the fibril binary: run, routes, events, deferred, new.
--- runtime/main.c calls main(command, args...) in the main fiber; each command returns
--- through fibril.exit.
local fibril = require "fibril"

local stderr, format, tonumber, unpack = io.stderr, string.format, tonumber, unpack

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

--- fibril events APP: every event class with its subscribers, deferred ones marked, as a
--- tree; the app is loaded (subscribers declare themselves) but not served.
function M.events(args)
  local app_dir = parse("events", args, {})
  load_app(app_dir, os.getenv("FIBRIL_ENV") or "development")
  local out = {}
  for _, line in ipairs(require("fibril.events").tree()) do out[#out + 1] = line .. "\n" end
  io.stdout:write(table.concat(out))
  fibril.exit(0)
end

-- One deferred subcommand: returns the text to print, or nil, an error and the exit status.
local function deferred_command(app, sub, ids)
  local admin = require "fibril.deferred.admin"
  if sub == "list" then return admin.format_list(admin.dead(app)) end
  if sub == "pending" then return admin.format_pending(admin.pending(app)) end
  if sub == "retry" then
    if #ids == 0 then return nil, "deferred retry: which task? (fibril deferred APP retry ID...)", 2 end
    local found = {}
    for _, id in ipairs(admin.retry(app, ids)) do found[id] = true end
    for _, id in ipairs(ids) do
      if not found[id] then return nil, format("deferred retry: no dead task '%s'", id), 1 end
    end
    return format("queued again: %d task(s)\n", #ids)
  end
  if sub == "retry-all" then return format("queued again: %d task(s)\n", #admin.retry(app, nil)) end
  return nil, format("deferred: unknown subcommand '%s' (list, pending, retry ID, retry-all)", sub), 2
end

--- fibril deferred APP [list|pending|retry ID...|retry-all]: the dead (or pending) deferred
--- tasks of the app
--- (journal backend: APP/storage/deferred/dead.log; postgres: the queue table), and queuing
--- them again (a running server picks them up within a second; else the next boot does).
function M.deferred(args)
  local app_dir, sub = args[1], args[2] or "list"
  if not app_dir or app_dir:sub(1, 2) == "--" then
    die("deferred: which app? (fibril deferred APP [list|pending|retry ID|retry-all])", 2)
  end
  local app = load_app(app_dir, os.getenv("FIBRIL_ENV") or "development")
  local ok, text, msg, status = pcall(deferred_command, app, sub, { unpack(args, 3) })
  if not ok then die(tostring(text), 1) end
  if not text then die(msg, status) end
  io.stdout:write(text)
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
