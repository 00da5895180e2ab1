--- fibril.router: maps (method, path) to a route. Routes live in a trie of path segments
--- (per node: a hash of static children, one :param child, one *splat child), so the cost of
--- a match grows with the depth of the path, never with the number of routes.
--- Precedence is static > :param > *splat at every segment, with backtracking.
--- docs/routing.md is the guide; every public function here is documented there.
local type, error, setmetatable, getmetatable, pairs, ipairs, next, tostring, tonumber, pcall, require =
      type, error, setmetatable, getmetatable, pairs, ipairs, next, tostring, tonumber, pcall, require
local find, sub, byte, gsub, char, match, format =
      string.find, string.sub, string.byte, string.gsub, string.char, string.match, string.format
local sort = table.sort
local getinfo = debug.getinfo

local ok_new, new_tab = pcall(require, "table.new")
if not ok_new then new_tab = function() return {} end end

local SLASH = 47  -- "/"

local M = {}
local mt = { __index = M }

--- The params table returned by match for a route without path params. It is shared by every
--- such match and read-only: writing a key raises (rawset would bypass that; don't).
---@type table
M.EMPTY = setmetatable({}, {
  __newindex = function(_, k)
    error("router: params of a route without path params are read-only (setting "
          .. tostring(k) .. ")", 2)
  end,
  __metatable = false,
})
local EMPTY = M.EMPTY

-- The seven Rails-style resource actions, in definition order: action, method, suffix.
local RESOURCE_ACTIONS = {
  { "index",   "GET",    "" },
  { "new",     "GET",    "/new" },
  { "create",  "POST",   "" },
  { "show",    "GET",    "/:id" },
  { "edit",    "GET",    "/:id/edit" },
  { "update",  "PATCH",  "/:id" },
  { "update",  "PUT",    "/:id" },
  { "destroy", "DELETE", "/:id" },
}
local RESOURCE_ACTION_SET = {}
for _, a in ipairs(RESOURCE_ACTIONS) do RESOURCE_ACTION_SET[a[1]] = true end

local function hex_char(h) return char(tonumber(h, 16)) end

-- Percent-decodes s; the caller has already checked that every '%' starts a valid escape.
local function decode(s)
  if not find(s, "%", 1, true) then return s end
  return (gsub(s, "%%(%x%x)", hex_char))
end

-- True when every '%' in path[from..len] is followed by two hex digits within len.
local function valid_escapes(path, from, len)
  local p = from
  while p and p <= len do
    if p + 2 > len or not find(path, "^%x%x", p + 1) then return false end
    p = find(path, "%", p + 3, true)
  end
  return true
end

-- A trie node. depth counts the :param and *splat segments on the way from the root, so a
-- param node knows which of a route's param_names it fills.
local function new_node(depth)
  return { static = {}, param = nil, splat = nil, routes = nil, depth = depth }
end

-- Walks the trie from node for path[i..len], looking for a route for method. Returns route,
-- params; params is filled on the way back up, so nothing is allocated for a branch that fails.
local function walk(node, path, i, len, method, pct)
  if i > len then
    local routes = node.routes
    local route = routes and routes[method]
    if not route then return nil end
    if route.nparams == 0 then return route, EMPTY end
    return route, new_tab(0, route.nparams)
  end
  local j = find(path, "/", i, true)
  local last = (j and j <= len) and j - 1 or len
  local seg = sub(path, i, last)
  if pct then seg = decode(seg) end
  local nexti = last + 2

  local child = node.static[seg]
  if child then
    local route, params = walk(child, path, nexti, len, method, pct)
    if route then return route, params end
  end
  child = node.param
  if child then
    local route, params = walk(child, path, nexti, len, method, pct)
    if route then
      params[route.param_names[child.depth]] = seg
      return route, params
    end
  end
  child = node.splat
  if child then
    local route = child.routes[method]
    if route then
      local params = new_tab(0, route.nparams)
      local rest = sub(path, i, len)
      if pct then rest = decode(rest) end
      params[route.param_names[child.depth]] = rest
      return route, params
    end
  end
  return nil
end

-- Like walk, but gathers into set the methods of every route whose path matches (for 405).
local function collect(node, path, i, len, pct, set)
  if i > len then
    if node.routes then
      for m in pairs(node.routes) do set[m] = true end
    end
    return
  end
  local j = find(path, "/", i, true)
  local last = (j and j <= len) and j - 1 or len
  local seg = sub(path, i, last)
  if pct then seg = decode(seg) end
  local child = node.static[seg]
  if child then collect(child, path, last + 2, len, pct, set) end
  if node.param then collect(node.param, path, last + 2, len, pct, set) end
  if node.splat then
    for m in pairs(node.splat.routes) do set[m] = true end
  end
end

local function check_router(self, who)
  if getmetatable(self) ~= mt then
    error("router: call r:" .. who .. "(...) with a colon, on a router from Router.new()", 3)
  end
end

-- Parses a route path into its segments; raises (at level) naming the path when it is bad.
-- Returns a list of { kind = "static"|"param"|"splat", value = text or name }.
local function parse_path(method, path, level)
  if type(path) ~= "string" then
    error("router: " .. method .. " path must be a string, got " .. type(path), level)
  end
  if byte(path, 1) ~= SLASH then
    error(format("router: path %q must start with '/'", path), level)
  end
  if find(path, "[?#%%]") then
    error(format("router: path %q must not contain '?', '#' or '%%' (write characters as "
                 .. "they are; requests are percent-decoded before matching)", path), level)
  end
  local trimmed = path
  if #path > 1 and byte(path, #path) == SLASH then trimmed = sub(path, 1, #path - 1) end
  local segs, names = {}, {}
  if trimmed == "/" then return segs, trimmed end
  local i, n = 2, #trimmed
  while i <= n + 1 do
    local j = find(trimmed, "/", i, true) or n + 1
    local seg = sub(trimmed, i, j - 1)
    if seg == "" then error(format("router: path %q has an empty segment ('//')", path), level) end
    local first = byte(seg, 1)
    if first == 58 or first == 42 then                 -- ':' or '*'
      local name = sub(seg, 2)
      if not match(name, "^[%a_][%w_]*$") then
        error(format("router: path %q: %q is not a valid parameter name", path, name), level)
      end
      if names[name] then
        error(format("router: path %q uses the parameter %q twice", path, name), level)
      end
      names[name] = true
      if first == 42 and j <= n then
        error(format("router: path %q: a splat (*%s) must be the last segment", path, name), level)
      end
      segs[#segs + 1] = { kind = first == 58 and "param" or "splat", value = name }
    else
      segs[#segs + 1] = { kind = "static", value = seg }
    end
    i = j + 1
  end
  return segs, trimmed
end

-- Splits "controller#action"; raises naming the target when it is not exactly that.
local function parse_target(method, path, target, level)
  if type(target) == "function" then return nil, nil end
  if type(target) ~= "string" then
    error(format("router: %s %s: target must be \"controller#action\" or a function, got %s",
                 method, path, type(target)), level)
  end
  local controller, action = match(target, "^([^#]+)#([^#]+)$")
  if not controller then
    error(format("router: %s %s: bad target %q, expected \"controller#action\"",
                 method, path, target), level)
  end
  return controller, action
end

-- Defines one route. level is the stack level of the application's call for error(): define
-- is always called directly from a public method, so that is 3.
local function define(self, method, path, target, level)
  local segs, trimmed = parse_path(method, path, level + 1)        -- one frame deeper
  local controller, action = parse_target(method, trimmed, target, level + 1)
  local node, param_names, exact = self.root, {}, true
  for k = 1, #segs do
    local s = segs[k]
    if s.kind == "static" then
      local child = node.static[s.value]
      if not child then
        child = new_node(node.depth)
        node.static[s.value] = child
      end
      node = child
    elseif s.kind == "param" then
      exact = false
      if not node.param then node.param = new_node(node.depth + 1) end
      node = node.param
      param_names[#param_names + 1] = s.value
    else
      exact = false
      if not node.splat then node.splat = new_node(node.depth + 1) end
      node = node.splat
      param_names[#param_names + 1] = s.value
    end
  end
  node.routes = node.routes or {}
  local existing = node.routes[method]
  if existing then
    local same = existing.path == trimmed and "is already defined"
                 or "conflicts with " .. existing.method .. " " .. existing.path
    error(format("router: %s %s %s (%s)", method, trimmed, same, existing.where), level)
  end
  local info = getinfo(level, "Sl")
  local route = {
    method = method, path = trimmed, controller = controller, action = action,
    target = target, handler = type(target) == "function" and target or nil,
    param_names = param_names, nparams = #param_names,
    where = info and (info.short_src .. ":" .. tostring(info.currentline)) or "?",
  }
  node.routes[method] = route
  if exact then self.exact[trimmed] = node end
  self.list[#self.list + 1] = route
  return route
end

--- Creates an empty router.
---@return table router with get/post/put/patch/delete/options, resources, match, routes
function M.new()
  return setmetatable({ root = new_node(0), list = {}, exact = {} }, mt)
end

--- Creates a router and lets fn define its routes: the shape of an app's routes.lua, which
--- returns `function(r) r:get("/", "home#index") end`.
---@param fn function called as fn(router)
---@return table router
function M.load(fn)
  if type(fn) ~= "function" then
    error("router: Router.load expects the function routes.lua returns, got " .. type(fn), 2)
  end
  local r = M.new()
  fn(r)
  return r
end

-- Each verb method calls define directly (not as a tail call, which would drop this frame):
-- define raises and records `where` at stack level 3, the application's line.

--- Routes GET requests for path to target; HEAD requests are served by GET routes too.
---   r:get("/statuses/:id", "statuses#show")      -- params.id, one segment
---   r:get("/files/*path", "files#show")          -- params.path: the rest, '/' included
---   r:get("/health", function(req) ... end)       -- route.handler = the function
---@param path string starting with '/'; ":name" matches one segment, "*name" (last) the rest
---@param target string|function "controller#action", or a function (route.handler)
---@return table route { method, path, controller, action, target, handler, param_names, where }
function M:get(path, target)
  check_router(self, "get")
  local route = define(self, "GET", path, target, 3)
  return route
end

--- Routes POST requests for path to target (as r:get).
---@param path string
---@param target string|function
---@return table route
function M:post(path, target)
  check_router(self, "post")
  local route = define(self, "POST", path, target, 3)
  return route
end

--- Routes PUT requests for path to target (as r:get).
---@param path string
---@param target string|function
---@return table route
function M:put(path, target)
  check_router(self, "put")
  local route = define(self, "PUT", path, target, 3)
  return route
end

--- Routes PATCH requests for path to target (as r:get).
---@param path string
---@param target string|function
---@return table route
function M:patch(path, target)
  check_router(self, "patch")
  local route = define(self, "PATCH", path, target, 3)
  return route
end

--- Routes DELETE requests for path to target (as r:get).
---@param path string
---@param target string|function
---@return table route
function M:delete(path, target)
  check_router(self, "delete")
  local route = define(self, "DELETE", path, target, 3)
  return route
end

--- Routes OPTIONS requests for path to target (as r:get). Without an OPTIONS route, an
--- OPTIONS request gets 405 and the allowed list, from which the server can answer.
---@param path string
---@param target string|function
---@return table route
function M:options(path, target)
  check_router(self, "options")
  local route = define(self, "OPTIONS", path, target, 3)
  return route
end

--- Defines the Rails-style routes of a resource, controller `name`:
--- GET /name index, GET /name/new new, POST /name create, GET /name/:id show,
--- GET /name/:id/edit edit, PATCH and PUT /name/:id update, DELETE /name/:id destroy.
---@param name string the path segment and the controller, e.g. "photos"
---@param opts table|nil { only = { actions } } or { except = { actions } }
---@return table the routes defined, in order
function M:resources(name, opts)
  check_router(self, "resources")
  if type(name) ~= "string" or not match(name, "^[%w_%-]+$") then
    error("router: resources name must be a word such as \"photos\", got "
          .. format("%q", tostring(name)), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("router: resources " .. name .. ": options must be a table ({ only = {...} } or "
          .. "{ except = {...} })", 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "only" and k ~= "except" then
      error("router: resources " .. name .. ": unknown option " .. format("%q", tostring(k))
            .. " (only, except)", 2)
    end
  end
  if opts.only and opts.except then
    error("router: resources " .. name .. ": give only or except, not both", 2)
  end
  local list = opts.only or opts.except
  local chosen
  if list then
    if type(list) ~= "table" then
      error("router: resources " .. name .. ": only/except must be a list of actions", 2)
    end
    chosen = {}
    for _, a in ipairs(list) do
      if not RESOURCE_ACTION_SET[a] then
        error("router: resources " .. name .. ": unknown action " .. format("%q", tostring(a))
              .. " (index, new, create, show, edit, update, destroy)", 2)
      end
      chosen[a] = true
    end
  end
  local defined = {}
  for _, a in ipairs(RESOURCE_ACTIONS) do
    local action, method, suffix = a[1], a[2], a[3]
    local take = not chosen or (opts.only and chosen[action]) or (opts.except and not chosen[action])
    if take then
      defined[#defined + 1] = define(self, method, "/" .. name .. suffix, name .. "#" .. action, 3)
    end
  end
  return defined
end

--- Finds the route for a request. HEAD is served by GET routes. path is the request target
--- without the query string (anything from '?' on is ignored anyway); one trailing '/' is
--- ignored, except for "/" itself. Each segment is percent-decoded after splitting, so "%2F"
--- stays inside its segment. Invalid percent-encoding and empty segments ("//") match nothing.
---@param method string "GET", "POST", ...
---@param path string e.g. "/statuses/7"
---@return table|nil route (nil when nothing matched)
---@return table|integer params (path params, decoded; Router.EMPTY when the route has none),
---        or 404 (no route for the path) or 405 (the path has routes, but not for method)
---@return table|nil for 405, the allowed methods, sorted, HEAD included wherever GET is
function M:match(method, path)
  if type(method) ~= "string" then
    error("router: match: method must be a string, got " .. type(method), 2)
  end
  if type(path) ~= "string" then
    error("router: match: path must be a string, got " .. type(path), 2)
  end
  if byte(path, 1) ~= SLASH then return nil, 404 end
  local len = #path
  local q = find(path, "?", 2, true)
  if q then len = q - 1 end
  local dbl = find(path, "//", 1, true)
  if dbl and dbl < len then return nil, 404 end
  if len > 1 and byte(path, len) == SLASH then len = len - 1 end
  local pct = find(path, "%", 2, true)
  if pct and pct > len then pct = nil end
  if pct and not valid_escapes(path, pct, len) then return nil, 404 end
  local m = method == "HEAD" and "GET" or method

  if not pct then       -- fast path: a fully static route is looked up by its whole path
    local node = self.exact[len == #path and path or sub(path, 1, len)]
    local route = node and node.routes[m]
    if route then return route, EMPTY end
  end
  local route, params = walk(self.root, path, 2, len, m, pct and true)
  if route then return route, params end

  local set = {}
  collect(self.root, path, 2, len, pct and true, set)
  if next(set) == nil then return nil, 404 end
  local allowed = {}
  for verb in pairs(set) do allowed[#allowed + 1] = verb end
  if set.GET then allowed[#allowed + 1] = "HEAD" end
  sort(allowed)
  return nil, 405, allowed
end

--- Every route in definition order (a new list; the routes themselves are shared), for
--- `fibril routes APP`: print route.method, route.path and route.target.
---@return table list of routes
function M:routes()
  check_router(self, "routes")
  local out = {}
  for i = 1, #self.list do out[i] = self.list[i] end
  return out
end

--- A route's target as text: "controller#action", or "function (file:line)" for a function.
---@param route table a route from match or routes
---@return string
function M.describe(route)
  if route.handler then return "function (" .. route.where .. ")" end
  return route.target
end

return M
