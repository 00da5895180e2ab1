--- fibril.http.message: the bytes of an HTTP/1.1 request and the parts of a URL. Nothing a
--- caller passes is spliced into the request unchecked: header names must be tokens, values
--- and targets may not hold CR, LF or NUL.
local url = require "fibril.url"

local type, error, tostring, tonumber, pairs, ipairs = type, error, tostring, tonumber, pairs, ipairs
local find, sub, lower, match, format = string.find, string.sub, string.lower, string.match,
                                        string.format
local concat, sort = table.concat, table.sort

local M = {}

local DEFAULT_PORT = { http = 80, https = 443 }
local NONE = {}

-- Parsed URLs by string: services call the same few URLs again and again. Bounded: emptied
-- when full. Entries are shared, so callers never modify what parse_url returns.
local cache, cached, CACHE_MAX = {}, 0, 512

--- Splits an absolute http(s) URL. Raises (at the caller's caller) when it is not one.
--- The table returned is shared: read it, never modify it.
---@param s string
---@return table { scheme, host, port, target (path and query), hostport, origin, url }
function M.parse_url(s, level)
  local hit = cache[s]
  if hit then return hit end
  level = (level or 1) + 1
  if type(s) ~= "string" then error("http: url must be a string, got " .. type(s), level) end
  local scheme, rest = match(s, "^(%a[%w+.-]*)://(.*)$")
  scheme = scheme and lower(scheme)
  if not DEFAULT_PORT[scheme] then
    error("http: url must start with http:// or https://, got '" .. sub(s, 1, 100) .. "'", level)
  end
  if find(s, "[%z\1-\32\127]") then
    error("http: url contains spaces or control characters: '" .. sub(s, 1, 100) .. "'", level)
  end
  local authority, target = match(rest, "^([^/?#]*)(.*)$")
  target = match(target, "^([^#]*)")                    -- the fragment stays with the client
  if find(authority, "@", 1, true) then
    error("http: credentials in URLs are not supported; send an Authorization header", level)
  end
  local host, port = match(authority, "^%[([%x:.]+)%]:?(%d*)$")   -- [::1]:8080
  local v6 = host ~= nil
  if not host then host, port = match(authority, "^([%w.%-_]+):?(%d*)$") end
  if not host or host == "" then
    error("http: url has no valid host: '" .. sub(s, 1, 100) .. "'", level)
  end
  port = port ~= "" and tonumber(port) or DEFAULT_PORT[scheme]
  if port < 1 or port > 65535 then error("http: url port out of range: '" .. s .. "'", level) end
  if target == "" then target = "/"
  elseif sub(target, 1, 1) == "?" then target = "/" .. target end
  host = lower(host)
  local hostport = v6 and "[" .. host .. "]" or host
  if port ~= DEFAULT_PORT[scheme] then hostport = hostport .. ":" .. port end
  local origin = scheme .. "://" .. hostport
  local u = { scheme = scheme, host = host, port = port, target = target, hostport = hostport,
              origin = origin, url = origin .. target }
  if cached >= CACHE_MAX then cache, cached = {}, 0 end
  cache[s], cached = u, cached + 1
  return u
end

--- Resolves a Location header against the URL it came from (RFC 3986, the common cases).
---@return string an absolute URL
function M.resolve(base, location)
  if match(location, "^%a[%w+.-]*://") then return location end
  if sub(location, 1, 2) == "//" then return base.scheme .. ":" .. location end
  if sub(location, 1, 1) == "/" then return base.origin .. location end
  if sub(location, 1, 1) == "?" then return base.origin .. match(base.target, "^[^?]*") .. location end
  local dir = match(match(base.target, "^[^?]*"), "^(.*/)") or "/"
  return base.origin .. dir .. location
end

-- RFC 9110 token characters.
local function is_token(s) return type(s) == "string" and s ~= "" and not find(s, "[^%w!#$%%&'*+.^_`|~-]") end

local function check_value(name, v)
  v = tostring(v)
  if find(v, "[%z\r\n]") then
    error("http: header '" .. name .. "' contains CR, LF or NUL", 5)
  end
  return v
end

--- u with a query table appended to its target ("/p" + { a = 1 } -> "/p?a=1"), as a copy.
function M.add_query(u, query)
  if query == nil then return u end
  if type(query) ~= "table" then error("http: query must be a table", 4) end
  local q = url.build_query(query)
  if q == "" then return u end
  local c = {}
  for k, v in pairs(u) do c[k] = v end
  c.requests = nil                                  -- cached request bytes: the old target's
  c.target = u.target .. (find(u.target, "?", 1, true) and "&" or "?") .. q
  c.url = c.origin .. c.target
  return c
end

--- The request head (and body) as one string.
---@param method string
---@param u table from parse_url
---@param headers table|nil name -> value (a list value sends the header once per item)
---@param body string|nil
---@param extra table defaults added unless headers has them: { ["accept-encoding"] = "gzip" }
---@return string
function M.build(method, u, headers, body, extra)
  local out, n = { method, " ", u.target, " HTTP/1.1\r\n" }, 4
  local seen, host = headers and {} or NONE, nil
  if headers ~= nil then
    if type(headers) ~= "table" then error("http: headers must be a table", 4) end
    local names = {}
    for k in pairs(headers) do
      if not is_token(k) then error("http: invalid header name " .. format("%q", tostring(k)), 4) end
      names[#names + 1] = k
    end
    sort(names)                                       -- a stable order: easier to debug
    for _, k in ipairs(names) do
      local lk = lower(k)
      seen[lk] = true
      if lk == "host" then host = check_value(k, headers[k])     -- a virtual host of the caller's
      elseif lk ~= "content-length" and lk ~= "transfer-encoding" then
        local v = headers[k]
        if type(v) == "table" then
          for _, item in ipairs(v) do
            out[n + 1], out[n + 2], out[n + 3], out[n + 4] = k, ": ", check_value(k, item), "\r\n"
            n = n + 4
          end
        else
          out[n + 1], out[n + 2], out[n + 3], out[n + 4] = k, ": ", check_value(k, v), "\r\n"
          n = n + 4
        end
      end
    end
  end
  out[n + 1], out[n + 2], out[n + 3] = "Host: ", host or u.hostport, "\r\n"
  n = n + 3
  for k, v in pairs(extra) do                       -- a header of the caller's name wins
    if not seen[lower(k)] then
      out[n + 1], out[n + 2], out[n + 3], out[n + 4] = k, ": ", v, "\r\n"
      n = n + 4
    end
  end
  if body then
    out[n + 1], out[n + 2], out[n + 3] = "Content-Length: ", #body, "\r\n"
    n = n + 3
  end
  out[n + 1] = "\r\n"
  out[n + 2] = body
  return concat(out)
end

return M
