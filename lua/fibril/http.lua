--- fibril.http: an HTTP/1.1 client for fibers, with TLS, a keep-alive pool per origin,
--- redirects and optional gzip. Each call suspends only its own fiber, so fan-out is
--- `fibril.schedule` + `fibril.await` (or `fibril.map` with a concurrency cap):
---   local res = http.get("https://api.example/repos/x/issues/1", { timeout = 5 })
---   local issue = res:json()
--- Failures raise error objects ({ code, message }) naming the method and URL; an HTTP error
--- status is not a failure (check res.status). docs/http-client.md is the guide.
local core = require "fibril.core.http_client"
local fcore = require "fibril.core.fiber"
local message = require "fibril.http.message"
local pool_mod = require "fibril.http.pool"
local json = require "fibril.json"
local url = require "fibril.url"

local type, error, tostring, pairs, setmetatable, rawget, getmetatable, pcall =
      type, error, tostring, pairs, setmetatable, rawget, getmetatable, pcall
local lower, upper, find, sub = string.lower, string.upper, string.find, string.sub
local has_inflate, inflate = pcall(require, "fibril.core.inflate")
local concat, min, floor = table.concat, math.min, math.floor
local m = core.methods
local cconnect, crequest, cread = core.connect, m.request, m.read
local now, new_error, ERROR_MT = fcore.now, fcore.error, fcore.error_metatable

local M = {}

--- Defaults of every option; the app's `http_client` config section overrides them.
M.DEFAULTS = {
  timeout = 30,              -- whole request, redirects included
  connect_timeout = 5,       -- resolving, TCP and TLS
  per_origin = 16,           -- connections open to one origin
  max_connections = 256,     -- connections open in total
  idle_timeout = 30,         -- a parked connection closes after this
  max_body = 16777216,       -- bytes of (decoded) body
  max_header_bytes = 65536,  -- bytes of response head
  max_redirects = 5,
}
--- True when fibril was built with zlib: requests then ask for gzip and decode it.
M.gzip = has_inflate

local USER_AGENT = "fibril/" .. require("fibril.core.vm").version
local DEFAULT_EXTRA = { ["User-Agent"] = USER_AGENT, ["Accept-Encoding"] = has_inflate and "gzip" or nil }
local IDEMPOTENT = { GET = true, HEAD = true, PUT = true, DELETE = true, OPTIONS = true, TRACE = true }
local REDIRECT = { [301] = true, [302] = true, [303] = true, [307] = true, [308] = true }
local SENSITIVE = { authorization = true, cookie = true, ["proxy-authorization"] = true }

-- ---- settings and the default pool ---------------------------------------------------------

local function settings()
  local cfg = require("fibril.config").current()
  local c = cfg and cfg.http_client or {}
  local s = {}
  for k, v in pairs(M.DEFAULTS) do s[k] = c[k] == nil and v or c[k] end
  s.ca_file = c.ca_file
  return s
end

local default_pool, default_settings, overrides

local function pool_and_settings()
  if not default_pool then
    default_settings = settings()
    for k, v in pairs(overrides or {}) do default_settings[k] = v end
    default_pool = pool_mod.new(default_settings)
  end
  return default_pool, default_settings
end

--- Overrides settings of the default pool for this process (a script, a spec, a benchmark):
--- any key of M.DEFAULTS, and ca_file. Idle connections of the old pool are closed.
---@param opts table e.g. { per_origin = 100, timeout = 10 }
function M.configure(opts)
  if type(opts) ~= "table" then error("http.configure: options must be a table", 2) end
  for k, v in pairs(opts) do
    if M.DEFAULTS[k] == nil and k ~= "ca_file" then
      error("http.configure: unknown setting '" .. tostring(k) .. "'", 2)
    end
    if k == "ca_file" then
      if type(v) ~= "string" then error("http.configure: ca_file must be a path", 2) end
    elseif type(v) ~= "number" or not (v > 0 or (v == 0 and k == "max_redirects")) then
      error("http.configure: " .. k .. " must be a positive number", 2)
    end
  end
  overrides = opts
  M.reset()
end

--- The default pool's counters: { open, idle, opened, reused }.
function M.pool_stats() return (pool_and_settings()):stats() end

--- Closes the idle connections of the default pool and forgets it (the next request makes
--- a new one, re-reading the settings).
function M.reset()
  if default_pool then default_pool:close_idle() end
  default_pool = nil
end

--- Open connections and requests in flight in the whole process (both return to 0).
M.live = core.live

-- ---- errors -------------------------------------------------------------------------------

local function raise(code, msg, where)
  error(new_error(code, "http: " .. msg .. " (" .. where .. ")"), 0)
end

-- Raises for C's (nil, msg, code) or the scheduler's timeout/cancel error object. what says
-- which wait ran out, for a timeout message a person can act on.
local function fail(msg, code, where, what)
  if getmetatable(msg) == ERROR_MT then
    if msg.code == "timeout" then raise("timeout", what, where) end
    msg.message = "http: " .. tostring(msg.message) .. " (" .. where .. ")"
    error(msg, 0)
  end
  if code == "ECONNREFUSED" then msg = "connection refused"
  elseif code == "ECONNRESET" then msg = "connection reset by peer"
  elseif type(code) == "string" and sub(code, 1, 4) == "EAI_" then
    msg = "cannot resolve host: " .. tostring(msg)
  end
  raise(code or "http", tostring(msg), where)
end

local function timeout_msg(r) return "request timed out after " .. r.timeout .. " s" end

-- "GET http://host/path": what error messages name. Built only when one is raised.
local function where_of(method, u) return method .. " " .. u.origin .. sub(u.target, 1, 200) end

-- ---- responses ----------------------------------------------------------------------------

local HEADERS_MT = { __index = function(t, k)
  if type(k) == "string" then return rawget(t, lower(k)) end
end }

local Response = {}
Response.__index = Response

--- The body decoded as JSON (raises on invalid JSON).
function Response:json()
  if self.body == nil then self:read_all() end
  return json.decode(self.body)
end

--- A header's value (case-insensitive; repeated headers joined with ", ").
function Response:header(name) return self.headers[name] end

-- Gives the connection back (reusable or not) once the body is over or abandoned.
local function release(self, reusable)
  local conn = self._conn
  if not conn then return end
  self._conn = nil
  self._pool:checkin(self._key, conn, reusable)
end

-- The next raw body bytes: a string, or nil at the end (the connection is then released).
local function next_raw(self)
  local rest = self._rest
  if rest then
    self._rest = nil
    return rest
  end
  local conn = self._conn
  if not conn then return nil end
  local r = self._r
  local left = r.deadline - now()
  if left <= 0 then
    release(self, false)
    raise("timeout", timeout_msg(r), where_of(self._method, self._u))
  end
  local t = min(left, r.read_timeout)
  local chunk, extra, code = cread(conn, t)
  if chunk == false then
    release(self, extra)
    return nil
  elseif chunk == nil then
    release(self, false)
    fail(extra, code, where_of(self._method, self._u), t == left and timeout_msg(r)
         or ("no data for " .. r.read_timeout .. " s while reading the body"))
  end
  return chunk
end

--- Streaming: the next chunk of the body, or nil at its end (the connection then returns
--- to the pool). Raises on timeout, limits and broken connections.
---@return string|nil
function Response:read()
  while true do
    local chunk = next_raw(self)
    local d = self._inflater
    if chunk == nil then
      if d then d:close(); self._inflater = nil end
      return nil
    end
    if not d then
      if chunk ~= "" then return chunk end
    else
      local decoded = self._decoded or 0
      local out, ended = d:feed(chunk, self._r.max_body - decoded)
      if not out then
        release(self, false)
        raise("body_too_large", ended, where_of(self._method, self._u))
      end
      self._decoded = decoded + #out
      if out ~= "" then return out end
    end
  end
end

--- Streaming: an iterator over the body's chunks (`for chunk in res:chunks() do`).
function Response:chunks() return Response.read, self end

--- Reads the rest of the body into res.body and returns it.
---@return string
function Response:read_all()
  if self.body ~= nil then return self.body end
  if not self._conn and not self._inflater then       -- the whole body came with the head
    self.body = self._rest or ""
    self._rest = nil
    return self.body
  end
  local parts, n = {}, 0
  for chunk in self:chunks() do n = n + 1; parts[n] = chunk end
  self.body = concat(parts)
  return self.body
end

--- Streaming: stops reading; the connection is closed, not reused (idempotent).
function Response:close() release(self, false) end

-- ---- requests -----------------------------------------------------------------------------

local function opt_number(v, name, default)
  if v == nil then return default end
  if type(v) ~= "number" or not (v >= 0) then
    error("http: " .. name .. " must be a non-negative number, got " .. tostring(v), 4)
  end
  return v
end

-- A new connection for r's request to u (the pool calls it when it may open one).
local function connect(r, u, method)
  local left = r.deadline - now()
  if left <= 0 then raise("timeout", timeout_msg(r), where_of(method, u)) end
  local t = min(left, r.connect_timeout)
  local c, msg, code = cconnect(u.host, u.port, t, u.scheme == "https", r.verify, r.ca_file)
  if not c then
    fail(msg, code, where_of(method, u), t == left and timeout_msg(r)
         or ("connect timed out after " .. r.connect_timeout .. " s"))
  end
  return c
end

-- One exchange on one connection: returns a Response whose body may still be to read.
local function exchange(r, u, method, req_bytes)
  local key = u.origin                             -- TLS settings are part of an origin's key
  if not r.verify or r.ca_file then
    key = key .. (r.verify and "" or " noverify") .. (r.ca_file and " ca=" .. r.ca_file or "")
  end
  local pool = r.pool
  for attempt = 1, 2 do
    local conn, reused = pool:checkout(key, r.deadline, connect, r, u, method)
    local left = r.deadline - now()
    local t = min(left, r.read_timeout)
    local status, headers, body, reusable = nil, nil, nil, nil
    if left > 0 then
      status, headers, body, reusable = crequest(conn, req_bytes, method == "HEAD",
                                                 r.max_header_bytes, r.max_body, t)
    end
    if status then
      local res = setmetatable({ status = status, headers = setmetatable(headers, HEADERS_MT),
        url = u.url, ok = status >= 200 and status < 300,
        _r = r, _u = u, _method = method, _pool = pool, _key = key }, Response)
      if body then                                 -- complete already: the connection is free
        res._rest = body
        pool:checkin(key, conn, reusable)
      else
        res._conn = conn
      end
      local enc = rawget(headers, "content-encoding")
      if enc and r.decompress and has_inflate and method ~= "HEAD" then
        enc = lower(enc)
        if enc == "gzip" or enc == "x-gzip" or enc == "deflate" then res._inflater = inflate.new() end
      end
      return res
    end
    local code = body
    pool:checkin(key, conn, false)                   -- closed: never reused after a failure
    -- A parked connection the server closed meanwhile: once more on a fresh one, when the
    -- server provably got nothing it could act on twice.
    local stale = reused and (code == "closed" or code == "ECONNRESET" or code == "EPIPE")
    if not (stale and IDEMPOTENT[method] and attempt == 1) then
      if left <= 0 then raise("timeout", timeout_msg(r), where_of(method, u)) end
      fail(headers, code, where_of(method, u), t == left and timeout_msg(r)
           or ("no response for " .. r.read_timeout .. " s"))
    end
  end
end

--- Sends one request and returns the response, following redirects.
---@param opts table { method = "GET", url, headers = {}, body = string, json = value,
---   form = table, query = table, timeout = s (whole request), connect_timeout = s,
---   read_timeout = s (idle, per read), max_body = bytes, follow_redirects = true|false|n,
---   stream = false (then read with res:read()/res:chunks()), verify = true, ca_file,
---   decompress = true }
---@return table response { status, headers (case-insensitive), body, url, ok } with
---   res:json(), res:header(name), and for streams res:read(), res:chunks(), res:close()
---@usage local res = http.request{ method = "POST", url = u, json = { a = 1 }, timeout = 5 }
local function request(opts, level)
  local u = message.parse_url(opts.url, level)
  local pool, s = pool_and_settings()
  local method = opts.method and upper(tostring(opts.method)) or nil
  if method and not find(method, "^[A-Z]+$") then error("http: invalid method '" .. method .. "'", level) end
  local headers = opts.headers
  if headers ~= nil and type(headers) ~= "table" then error("http: headers must be a table", level) end
  local body = opts.body
  local ctype
  if opts.json ~= nil then body, ctype = json.encode(opts.json), "application/json"
  elseif opts.form ~= nil then
    if type(opts.form) ~= "table" then error("http: form must be a table", level) end
    body, ctype = url.build_query(opts.form), "application/x-www-form-urlencoded"
  end
  if body ~= nil and type(body) ~= "string" then error("http: body must be a string", level) end
  method = method or (body and "POST" or "GET")
  if body == nil and (method == "POST" or method == "PUT" or method == "PATCH") then body = "" end
  local timeout = opt_number(opts.timeout, "timeout", s.timeout)
  local verify = opts.verify
  if verify == nil then verify = true
  elseif type(verify) ~= "boolean" then error("http: verify must be true or false", level) end
  local redirects = opts.follow_redirects
  if redirects == nil or redirects == true then redirects = s.max_redirects
  elseif redirects == false then redirects = 0
  elseif type(redirects) ~= "number" or redirects < 0 or redirects ~= floor(redirects) then
    error("http: follow_redirects must be a boolean or a count", level)
  end
  local r = {
    pool = pool, verify = verify, ca_file = opts.ca_file or s.ca_file,
    connect_timeout = opt_number(opts.connect_timeout, "connect_timeout", s.connect_timeout),
    read_timeout = opt_number(opts.read_timeout, "read_timeout", timeout),
    max_body = opt_number(opts.max_body, "max_body", s.max_body),
    max_header_bytes = opt_number(opts.max_header_bytes, "max_header_bytes", s.max_header_bytes),
    deadline = now() + timeout, timeout = timeout,
    decompress = opts.decompress ~= false,
  }
  if r.ca_file ~= nil and type(r.ca_file) ~= "string" then error("http: ca_file must be a path", level) end
  local extra = DEFAULT_EXTRA
  if ctype or not r.decompress then
    extra = { ["User-Agent"] = USER_AGENT }
    if has_inflate and r.decompress then extra["Accept-Encoding"] = "gzip" end
    if ctype then extra["Content-Type"] = ctype end
  end
  u = message.add_query(u, opts.query)
  -- The bytes of a request with nothing of the caller's in them are the same every time.
  local plain = headers == nil and body == nil and extra == DEFAULT_EXTRA
  local hops = 0
  while true do
    local bytes
    if plain then                                    -- no headers, body or query of the caller's
      local cache = u.requests
      bytes = cache and cache[method]
      if not bytes then
        bytes = message.build(method, u, nil, nil, extra)
        if not cache then cache = {}; u.requests = cache end
        cache[method] = bytes
      end
    else
      bytes = message.build(method, u, headers, body, extra)
    end
    local res = exchange(r, u, method, bytes)
    local loc = REDIRECT[res.status] and res.headers.location
    if not loc or redirects == 0 then
      res.redirects = hops
      if not opts.stream then res:read_all() end
      return res
    end
    res:read_all()                                   -- drained: the connection can be reused
    hops = hops + 1
    if hops > redirects then
      raise("too_many_redirects", "more than " .. redirects .. " redirects", where_of(method, u))
    end
    local okp, nu = pcall(message.parse_url, message.resolve(u, loc))
    if not okp then                                  -- the server's Location, not the caller's
      raise("protocol", "invalid redirect Location '" .. sub(loc, 1, 200) .. "'", where_of(method, u))
    end
    if u.scheme == "https" and nu.scheme == "http" then
      raise("redirect_downgrade", "refusing a redirect from https to http: " .. sub(loc, 1, 200),
            where_of(method, u))
    end
    if nu.origin ~= u.origin and headers then        -- credentials stay with their origin
      local kept = {}
      for k, v in pairs(headers) do
        if not SENSITIVE[lower(k)] then kept[k] = v end
      end
      headers = kept
    end
    if res.status == 303 or ((res.status == 301 or res.status == 302) and method == "POST") then
      if method ~= "HEAD" then method = "GET" end
      body = nil
      if extra["Content-Type"] then
        extra = { ["User-Agent"] = USER_AGENT, ["Accept-Encoding"] = extra["Accept-Encoding"] }
      end
    end
    u = nu
  end
end

function M.request(opts)
  if type(opts) ~= "table" then error("http.request: options must be a table", 2) end
  return (request(opts, 3))      -- level 3: request's errors name the caller of M.request
end

local function shortcut(method)
  return function(u, opts)
    local o = {}
    if opts ~= nil then
      if type(opts) ~= "table" then error("http." .. lower(method) .. ": options must be a table", 2) end
      for k, v in pairs(opts) do o[k] = v end
    end
    o.method, o.url = method, u
    return (request(o, 3))
  end
end

--- http.get(url, opts), http.head, http.post, http.put, http.patch, http.delete: request()
--- with that method; opts as for request (body, json, form, headers, timeout...).
M.get = shortcut("GET")
M.head = shortcut("HEAD")
M.post = shortcut("POST")
M.put = shortcut("PUT")
M.patch = shortcut("PATCH")
M.delete = shortcut("DELETE")

--- Query-string and form encoding: { a = 1, b = { 2, 3 } } -> "a=1&b=2&b=3" (sorted keys).
M.encode_query = url.build_query
M.encode_form = url.build_query
M.decode_query = url.parse_query

return M
