--- fibril.controller: controllers for HTTP requests. A controller is a class made with
--- `Controller:extend()`; each action is a method; one instance serves one request.
---
---   local Controller = require "fibril.controller"
---   local C = Controller:extend()
---   C:before_action("require_user", { except = { "index" } })
---   function C:show() self:render{ json = { id = self.params.id } } end
---   return C
local json = require "fibril.json"
local url = require "fibril.url"
local executor = require "fibril.executor"

local type, error, pairs, ipairs, next, setmetatable, rawget, tostring, xpcall =
      type, error, pairs, ipairs, next, setmetatable, rawget, tostring, xpcall
local find, gsub, lower, format, match = string.find, string.gsub, string.lower,
                                         string.format, string.match
local concat = table.concat

local Controller = {}
Controller.__index = Controller
Controller._before, Controller._after, Controller._rescue = {}, {}, {}

local function copy_list(t)
  local c = {}
  for i = 1, #t do c[i] = t[i] end
  return c
end

--- Makes a subclass. Filters and rescues of the parent are inherited (copied: adding to the
--- subclass never changes the parent).
---@param name string|nil a name for messages (default: set by the app loader from the file)
---@return table the controller class
function Controller:extend(name)
  local C = setmetatable({}, self)
  C.__index = C
  C._before = copy_list(rawget(self, "_before") or {})
  C._after = copy_list(rawget(self, "_after") or {})
  C._rescue = copy_list(rawget(self, "_rescue") or {})
  C.name = name
  return C
end

local function set_of(list, who)
  if list == nil then return nil end
  if type(list) == "string" then list = { list } end
  if type(list) ~= "table" then error(who .. ": only/except must be a list of action names", 4) end
  local s = {}
  for _, a in ipairs(list) do s[a] = true end
  return s
end

local function add_filter(list, who, fn, opts)
  if type(fn) ~= "string" and type(fn) ~= "function" then
    error(who .. ": expected a method name or a function", 3)
  end
  opts = opts or {}
  list[#list + 1] = { fn = fn, only = set_of(opts.only, who), except = set_of(opts.except, who) }
end

--- Runs fn (a method name or a function(self)) before the actions; rendering in it halts the
--- request (the action and the remaining before actions do not run).
---@param opts table|nil { only = {...} } or { except = {...} }
function Controller:before_action(fn, opts) add_filter(self._before, "before_action", fn, opts) end

--- Runs fn after the action (not when a before action halted).
function Controller:after_action(fn, opts) add_filter(self._after, "after_action", fn, opts) end

--- Handles errors raised by actions or filters: matcher is an error code (matched against
--- err.code, or found in a string error), or a function(err) -> boolean; handler(self, err)
--- usually renders. Later declarations are tried first.
function Controller:rescue_from(matcher, handler)
  if type(matcher) ~= "string" and type(matcher) ~= "function" then
    error("rescue_from: matcher must be an error code string or a function", 2)
  end
  if type(handler) ~= "function" and type(handler) ~= "string" then
    error("rescue_from: handler must be a function or a method name", 2)
  end
  self._rescue[#self._rescue + 1] = { matcher = matcher, handler = handler }
end

-- ---- rendering ---------------------------------------------------------------------------

local function check_not_rendered(self)
  if self._status then
    error(format("controller %s#%s rendered twice", self.controller_name or "?",
                 self.action_name or "?"), 3)
  end
end

-- The response is kept in the instance's own fields, _status, _headers, _body, _ctype and
-- _sse (no table of its own: one object fewer per request for the collector to free). The
-- headers are never written to; _ctype, when set, is a Content-Type to add to them.
-- response_headers puts them together when the response is sent.
-- A response is set only while none is (check_not_rendered): fresh, or cleared by a rescue.
-- So a nil needs no store, and none is made: a nil stored under a key the table lacks still
-- adds the key, and the instance's hash part would grow on every request.
local function set_response(self, status, headers, body, ctype, sse)
  self._status, self._body = status, body
  if headers then self._headers = headers end
  if ctype then self._ctype = ctype end
  if sse then self._sse = sse end
end

local function clear_response(self)   -- rare: a rescue_from handler decides the response
  self._status, self._headers, self._body, self._ctype, self._sse = nil, nil, nil, nil, nil
end

--- Sets the response. Exactly one body kind: json, text, html or body (a string);
--- status (default 200), headers (a table), content_type override. Or sse = sse.stream(...):
--- an event stream that lasts until the client leaves (docs/sse.md).
function Controller:render(opts)
  check_not_rendered(self)
  if type(opts) ~= "table" then error("render: expected a table ({ json = ... }, { text = ... })", 2) end
  local body, ctype
  if opts.sse ~= nil then        -- a stream: fibril.sse serves it once the action returns
    if type(opts.sse) ~= "table" or not (opts.sse.channels or opts.sse.fn) then
      error("render: sse expects sse.stream(channel, ...) or sse.stream(function(stream) ... end)", 2)
    end
    set_response(self, 200, opts.headers, "", nil, opts.sse)
    return
  elseif opts.json ~= nil then
    body, ctype = json.encode(opts.json), "application/json"
  elseif opts.text ~= nil then
    body, ctype = tostring(opts.text), "text/plain; charset=utf-8"
  elseif opts.html ~= nil then
    body, ctype = tostring(opts.html), "text/html; charset=utf-8"
  elseif opts.body ~= nil then
    body, ctype = tostring(opts.body), "application/octet-stream"
  else
    body = ""
  end
  if ctype then ctype = opts.content_type or ctype end
  local headers = opts.headers
  if headers then                    -- a copy: the app may change its table afterwards
    local h = {}
    for k, v in pairs(headers) do h[k] = v end
    if ctype and not h["Content-Type"] then h["Content-Type"] = ctype end
    headers, ctype = h, nil
  end
  set_response(self, opts.status or 200, headers, body, ctype)
end

--- Responds with a status and no body.
function Controller:head(status, headers)
  check_not_rendered(self)
  set_response(self, status or 200, headers, "")
end

--- Redirects to a URL (status 302 by default; 301, 303, 307, 308 as given).
function Controller:redirect_to(location, status)
  check_not_rendered(self)
  if type(location) ~= "string" or find(location, "[\r\n%z]") then
    error("redirect_to: the location must be a string without CR, LF or NUL", 2)
  end
  set_response(self, status or 302, { Location = location }, "")
end

---@return boolean whether the action has rendered (or redirected, or headed)
function Controller:rendered() return self._status ~= nil end

--- Adds a Set-Cookie header. opts: path (default "/"), domain, max_age (seconds), expires
--- (a preformatted date), secure, http_only (default true), same_site ("Lax" default).
function Controller:set_cookie(name, value, opts)
  opts = opts or {}
  if type(name) ~= "string" or not match(name, "^[%w!#$%%&'*+%-.^_`|~]+$") then
    error("set_cookie: invalid cookie name", 2)
  end
  local parts = { name .. "=" .. url.encode(tostring(value)) }
  parts[#parts + 1] = "Path=" .. (opts.path or "/")
  if opts.domain then parts[#parts + 1] = "Domain=" .. opts.domain end
  if opts.max_age then parts[#parts + 1] = "Max-Age=" .. math.floor(opts.max_age) end
  if opts.expires then parts[#parts + 1] = "Expires=" .. opts.expires end
  if opts.secure then parts[#parts + 1] = "Secure" end
  if opts.http_only ~= false then parts[#parts + 1] = "HttpOnly" end
  parts[#parts + 1] = "SameSite=" .. (opts.same_site or "Lax")
  local cookie = concat(parts, "; ")
  if find(cookie, "[\r\n%z]") then error("set_cookie: CR, LF or NUL in a cookie attribute", 2) end
  local list = self._set_cookies
  if not list then list = {}; self._set_cookies = list end
  list[#list + 1] = cookie
end

--- Deletes a cookie (an expired Set-Cookie for the same name and path).
function Controller:delete_cookie(name, opts)
  opts = opts or {}
  self:set_cookie(name, "", { path = opts.path, domain = opts.domain, max_age = 0 })
end

-- ---- one request -------------------------------------------------------------------------

-- Requests without cookies share one empty, read-only table (set_cookie is the way to write).
local NO_COOKIES = setmetatable({}, { __newindex = function()
  error("controller: self.cookies holds the request's cookies; use self:set_cookie to set one", 2)
end })

local function parse_cookies(header)
  if not header then return NO_COOKIES end
  local t = {}
  for pair in (header .. ";"):gmatch("%s*([^;]*);") do
    local k, v = match(pair, "^([^=]+)=(.*)$")
    if k then
      k = gsub(k, "%s+$", "")
      if t[k] == nil then t[k] = url.decode(gsub(v, "^\"(.*)\"$", "%1")) end
    end
  end
  return t
end

local function header_index(t, k)
  if type(k) == "string" then return rawget(t, lower(k)) end
end
local headers_mt = { __index = header_index }

--- Builds params: path params, then the query string, then a form or JSON body.
---@return table|nil params, string|nil error (an unparsable body)
local function build_params(req, path_params)
  local params = {}
  if next(path_params) ~= nil then           -- (a loop that never runs stops the JIT's trace)
    for k, v in pairs(path_params) do params[k] = v end
  end
  local query = rawget(req, "query")         -- (no __index call for the usual absent query)
  if query then url.parse_query(query, params) end
  local body = req.body
  if body and body ~= "" then
    local ctype = req.headers["content-type"] or ""
    if find(ctype, "application/x-www-form-urlencoded", 1, true) then
      url.parse_query(body, params)
    elseif find(ctype, "json", 1, true) then
      local value, err = json.try_decode(body)
      if err then return nil, "invalid JSON body: " .. err end
      if type(value) == "table" and value[1] == nil then
        for k, v in pairs(value) do if params[k] == nil then params[k] = v end end
      else
        params._json = value
      end
    end
  end
  return params
end

local function applies(filter, action)
  if filter.only then return filter.only[action] == true end
  if filter.except then return not filter.except[action] end
  return true
end

local function call_filter(self, fn)
  if type(fn) == "string" then
    local m = self[fn]
    if type(m) ~= "function" then
      error(format("controller %s: filter '%s' is not a method", self.controller_name or "?", fn), 0)
    end
    return m(self)
  end
  return fn(self)
end

-- Numeric loops: most controllers have no filters, and a loop that never runs keeps the JIT
-- from tracing this function as ipairs does.
local function run_action(self, C, action)
  local before, after = C._before, C._after
  for i = 1, #before do
    local f = before[i]
    if applies(f, action) then
      call_filter(self, f.fn)
      if self._status then return end            -- a before action rendered: halt
    end
  end
  C[action](self)
  for i = 1, #after do
    local f = after[i]
    if applies(f, action) then call_filter(self, f.fn) end
  end
end

local function rescue_matches(matcher, err)
  if type(matcher) == "function" then return matcher(err) end
  if type(err) ~= "table" then return false end
  return err.code == matcher or (type(err.message) == "string" and find(err.message, matcher, 1, true) ~= nil)
end

local with_traceback = executor.with_traceback
Controller.with_traceback = with_traceback

local function finish(self, C, ok, err)
  if not ok then
    local rescues = C._rescue
    for i = #rescues, 1, -1 do
      local r = rescues[i]
      if rescue_matches(r.matcher, err) then
        clear_response(self)                      -- the handler decides the response
        if type(r.handler) == "string" then self[r.handler](self, err) else r.handler(self, err) end
        return
      end
    end
    error(err, 0)
  end
end

local PLAIN = "text/plain"

-- Runs the request; returns the controller instance, its response set.
local function run(C, action, req, path_params, controller_name)
  setmetatable(req.headers, headers_mt)
  local params, perr = build_params(req, path_params)
  local self = setmetatable({
    request = req, params = params or {}, action_name = action,
    controller_name = controller_name or C.name,
    cookies = parse_cookies(rawget(req.headers, "cookie")),
  }, C)
  if perr then
    set_response(self, 400, nil, perr .. "\n", PLAIN)
    return self
  end
  finish(self, C, xpcall(run_action, with_traceback, self, C, action))
  if not self._status then set_response(self, 204, nil, "") end
  return self
end

-- Headers of a response with only a Content-Type (most of them) are rendered once per content
-- type (at most 64 of them) by core.http.head_lines, which res:send copies as they are: no
-- table walk and no header checks per response.
local by_type, ntypes, NO_HEADERS = {}, 0, {}
local head_lines = require("fibril.core.http").head_lines

-- The response headers: the app's, plus Content-Type unless it gave one, plus Set-Cookie.
-- shared: may return a shared table or head_lines (for the server's res:send only).
local function response_headers(self, cookies, shared)
  local given, ctype = self._headers, self._ctype
  if shared and not given and not cookies then
    if not ctype then return NO_HEADERS end
    local h = by_type[ctype]
    if h then return h end
    if ntypes < 64 then
      h = head_lines({ ["Content-Type"] = ctype })
      by_type[ctype], ntypes = h, ntypes + 1
      return h
    end
  end
  local headers = {}
  if given then for k, v in pairs(given) do headers[k] = v end end
  if ctype and not headers["Content-Type"] then headers["Content-Type"] = ctype end
  if cookies then headers["Set-Cookie"] = cookies end
  return headers
end

--- Serves one request with controller class C's action. Returns the response table
--- { status, headers, body }; raises what no rescue_from handled.
---@return table
function Controller.dispatch(C, action, req, path_params, controller_name)
  local self = run(C, action, req, path_params, controller_name)
  return { status = self._status, headers = response_headers(self, self._set_cookies, false),
           body = self._body, sse = self._sse }
end

--- Like dispatch, for the server: returns status, headers, body and, for render{ sse = ... },
--- the stream's description; the headers may be a table shared between responses or rendered
--- head lines (core.http.head_lines), for res:send only.
function Controller.respond(C, action, req, path_params, controller_name)
  local self = run(C, action, req, path_params, controller_name)
  return self._status, response_headers(self, self._set_cookies, true), self._body, self._sse
end

--- True when C (a class made by extend) has a method named action.
function Controller.has_action(C, action)
  return type(C[action]) == "function" and Controller[action] == nil
end

return Controller
