--- fibril.server: serves an app over HTTP: each request in its own fiber, routed, given to
--- its controller, errors turned into 500s; SIGTERM/SIGINT drain the server.
local core_http = require "fibril.core.http"
local signal = require "fibril.core.signal"
local fibril = require "fibril"
local Controller = require "fibril.controller"
local static = require "fibril.static"
local executor = require "fibril.executor"

local tostring, tonumber, pairs, pcall, setmetatable, rawset, rawget, concat, format, os_getenv =
      tostring, tonumber, pairs, pcall, setmetatable, rawset, rawget, table.concat, string.format,
      os.getenv
local stderr = io.stderr

local M = {}

local function log(level, msg, fields)
  local parts = { "ts=" .. os.date("!%Y-%m-%dT%H:%M:%SZ"), "level=" .. level, "sub=server",
                  format("msg=%q", msg) }
  for k, v in pairs(fields or {}) do parts[#parts + 1] = k .. "=" .. format("%q", tostring(v)) end
  stderr:write((concat(parts, " "):gsub("\\\n", "\\n")), "\n")
end
M.log = log

local TEXT = { ["Content-Type"] = "text/plain" }
local token_send, token_response, token_remote = core_http.send, core_http.response,
                                                 core_http.remote

-- The server listens with tokens (M.listen): each request comes with a number that names it,
-- in req._res too, and a controller's response is sent through it (core.http.send), so no
-- response userdata is made per request (runtime/http_token.c says why). What needs the
-- response object (a stream, a static file, a function route) gets it here, made once.
-- A server without tokens (core.http.listen in specs) hands the object itself.
local function response(req)
  local res = rawget(req, "_res")
  if type(res) == "number" then
    res = token_response(res)
    rawset(req, "_res", res)
  end
  return res
end
M.response = response

-- Made when first read: req.remote_addr and req.remote_port (getpeername), and req.id for a
-- generated id, which the server hands over as its counter in _id (runtime/http_request.c):
-- most requests never read their id, and its string would be one more object to collect.
local id_string = core_http.id_string
local request_mt = { __index = function(req, k)
  if k == "id" then
    local id = rawget(req, "_id")
    if type(id) == "number" then id = id_string(id) end
    rawset(req, "id", id)
    return id
  elseif k == "remote_addr" or k == "remote_port" then
    local res = rawget(req, "_res")
    local ip, port
    if type(res) == "number" then ip, port = token_remote(res) else ip, port = res:remote() end
    rawset(req, "remote_addr", ip)
    rawset(req, "remote_port", port)
    return rawget(req, k)
  end
end }

local respond = Controller.respond
local SENT = {}                -- serve() returns it when send has answered the request

-- res: a token or a response object.
local function send(res, status, headers, body)
  if type(res) == "number" then return token_send(res, status, headers, body) end
  return res:send(status, headers, body)
end

local function plain(res, status, body, headers)
  send(res, status, headers or TEXT, body)
  return SENT
end

--- The function given to the HTTP server: handler(req, res), run in a fiber per request.
---@param app table from fibril.app.load
---@return function
function M.handler(app)
  local development = app.env == "development" or app.env == "test"

  -- Read from app for every request: the reloader swaps router and controllers in place.
  -- res: the request's token, or its response object (module comment above).
  local function serve(req, res)
    if app.load_error then
      -- The changed code does not load: say where, until the file is fixed.
      return plain(res, 500, format("Internal Server Error (request %s)\n\nthe app's code does not "
                                    .. "load:\n%s\n", req.id, app.load_error))
    end
    local router = app.router
    if app.public and (req.method == "GET" or req.method == "HEAD")
       and static.serve(app, req, response) then return end
    local route, params, allowed = router:match(req.method, req.path)
    if not route then
      if params == 405 then
        local allow = concat(allowed, ", ")
        return plain(res, 405, "Method Not Allowed\n", { ["Content-Type"] = "text/plain", Allow = allow })
      end
      return plain(res, 404, "Not Found\n")
    end
    if route.handler then return route.handler(req, response(req), params) end
    local status, headers, body, stream = respond(app.controllers[route.controller], route.action,
                                                  req, params, route.controller)
    if stream then
      require("fibril.sse").serve(req, response(req), stream, headers)
      return SENT
    end
    send(res, status, headers, body)
    return SENT
  end

  -- Each request is one unit of work (docs/executor.md), tagged with its request id, in the
  -- fiber the HTTP server spawned for it: a generated id's counter, made a string only if
  -- the unit logs a line (not the request itself: a fiber the unit starts may outlive it).
  local call = executor.call_new_fiber
  return function(req, res)
    if rawget(req, "_res") == nil then req._res = res end   -- a request table made in Lua
    setmetatable(req, request_mt)
    local ok, err = call(serve, rawget(req, "_id") or req.id, req, res)   -- err: serve's result
    if ok and err == SENT then return end      -- answered (or the client left) by send
    res = response(req)                        -- the object: whatever the route left undone
    if ok then
      -- A function route that forgot to answer must not leave the client waiting forever.
      if not res:started() then
        log("error", "handler returned without a response", { req = req.id, path = req.path })
        plain(res, 500, format("Internal Server Error (request %s)\n", req.id))
      elseif not res:closed() then
        res:finish()
      end
      return
    end
    log("error", "request failed", { req = req.id, method = req.method, path = req.path,
                                     err = tostring(err) })
    if res:started() then
      res:abort()             -- a half-sent response cannot be completed: the client must see it cut
      return
    end
    if development then
      plain(res, 500, format("Internal Server Error (request %s)\n\n%s\n", req.id, tostring(err)))
    else
      plain(res, 500, format("Internal Server Error (request %s)\n", req.id))
    end
  end
end

--- Listens for app with its config's http settings; returns the core server object.
---@return userdata server
function M.listen(app, handler)
  local cfg, http = app.config, app.config.http
  local server, err = core_http.listen{
    host = cfg.host, port = cfg.port, handler = handler or M.handler(app), tokens = true,
    reuseport = cfg.workers > 1 or app.reuseport == true, access_log = cfg.log.access ~= false,
    max_header_bytes = http.max_header_bytes, max_body_bytes = http.max_body_bytes,
    max_url_bytes = http.max_url_bytes, header_timeout = http.header_timeout,
    body_timeout = http.body_timeout, body_deadline = http.body_deadline,
    keepalive_timeout = http.keepalive_timeout,
    send_timeout = http.send_timeout,
    max_connections = http.max_connections, write_high_water = http.write_high_water,
  }
  if not server then error(err, 0) end
  return server
end

--- Waits for SIGTERM or SIGINT, then drains: stops accepting, lets requests in flight finish
--- for up to drain_timeout seconds, and returns. on_signal(name), when given, is called as
--- the signal arrives, before the drain (the daemons start stopping meanwhile).
function M.drain_on_signal(app, server, on_signal)
  local name = signal.wait("SIGTERM", "SIGINT")
  if on_signal then on_signal(name) end
  local deadline = fibril.now() + app.config.http.drain_timeout
  log("info", "draining", { signal = name, connections = server:connections() })
  server:close()
  require("fibril.sse").shutdown()   -- streams end cleanly; their clients reconnect elsewhere
  while server:connections() > 0 and fibril.now() < deadline do fibril.sleep(0.02) end
  if server:connections() > 0 then
    log("warn", "drain timeout: closing connections still open", { connections = server:connections() })
  end
end

--- Runs the app in this process until a signal drains it: the server, the reloader in
--- development, the daemons that belong here. Returns the exit status.
function M.run(app)
  -- The collector's pace for a serving process (docs/gc.md): a least growth between cycles
  -- and gentle steps, worked out again after every cycle.
  local gc = app.config.gc
  require("fibril.gc").pace{ pause = gc.pause, stepmul = gc.stepmul, min_growth = gc.min_growth_bytes }
  require("fibril.log").configure(app.config.log)
  require("fibril.sse").configure(app.config.sse)
  require("fibril.pg").configure(app.config.database)   -- connects on first use only
  -- Deferred tasks: each process runs the tasks of its own journal, journal-<worker>.log
  -- (docs/deferred.md: why no task runs twice with --workers N). The journal is replayed
  -- (read at once) before the port opens, so no connection waits on a loop busy replaying.
  local worker = tonumber(os_getenv("FIBRIL_WORKER") or "")
  local deferred = require "fibril.deferred"
  deferred.boot(app, worker or 1, tonumber(os_getenv("FIBRIL_WORKERS") or "") or 1)
  local server = M.listen(app)
  app.port = server:port()                  -- the bound port (config may say 0), for daemons
  local reloading = app.config.reload and app.env ~= "production"
                    and require("fibril.reloader").start(app)
  -- Daemons: docs/daemons.md (node-scoped ones run in worker 1 or the single process).
  local daemons = require("fibril.daemon").start(app, { worker = worker })
  log("info", "listening", { url = format("http://%s:%d", app.config.host, server:port()),
                             env = app.env, pid = os_getenv("FIBRIL_WORKER") or "main",
                             reload = reloading and "on" or "off" })
  -- On the signal, the daemons stop (cleanup) while the server drains: both within drain_timeout.
  local stopping
  M.drain_on_signal(app, server, function() stopping = fibril.schedule(daemons.stop, daemons) end)
  pcall(fibril.await, stopping)
  -- After the drain (requests may publish until it ends): running tasks get what is left of
  -- drain_timeout, then the journal is flushed and closed.
  deferred.stop(math.max(1, app.config.http.drain_timeout))
  if reloading then reloading.stop() end
  require("fibril.pubsub").use(nil)        -- its reader and relay fibers end with the server
  return 0
end

return M
