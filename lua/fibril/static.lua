--- fibril.static: serves the files of APP/public/ for GET and HEAD, before routes are
--- consulted: validators (ETag, Last-Modified) and 304s, single byte ranges, large files
--- streamed in chunks. A path that could leave public/ is never served; static.serve then
--- declines and the router answers (404 unless a route matches). docs/static.md is the guide.
local fs = require "fibril.core.fs"
local now = require("fibril.core.fiber").now

local byte, char, find, sub, gsub, lower, match, format =
      string.byte, string.char, string.find, string.sub, string.gsub, string.lower, string.match,
      string.format
local tonumber, error, pcall, tostring, ipairs, floor, min, max, concat, os_date =
      tonumber, error, pcall, tostring, ipairs, math.floor, math.min, math.max, table.concat,
      os.date
local stderr = io.stderr

local M = {}

--- Bytes read and written per step when a body is streamed.
M.CHUNK = 65536
--- Bodies up to this many bytes are read whole and sent with Content-Length; larger ones are
--- streamed with res:start (Content-Length)/res:write, so memory per request stays at one CHUNK.
M.SMALL = 262144

--- Content-Type by lowercased file extension; an app may add entries
--- (`require("fibril.static").types.avif = "image/avif"`). Anything else is
--- application/octet-stream.
---@type table
M.types = {
  html = "text/html; charset=utf-8", htm = "text/html; charset=utf-8",
  css = "text/css; charset=utf-8",
  js = "text/javascript; charset=utf-8", mjs = "text/javascript; charset=utf-8",
  json = "application/json", map = "application/json",
  txt = "text/plain; charset=utf-8",
  xml = "application/xml",
  svg = "image/svg+xml",
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif",
  webp = "image/webp", ico = "image/x-icon",
  wasm = "application/wasm",
  woff = "font/woff", woff2 = "font/woff2",
  pdf = "application/pdf",
}
local DEFAULT_TYPE = "application/octet-stream"

-- Failures that mean "no such file to serve here": static.serve declines, the router answers.
local DECLINE = { ENOENT = true, ENOTDIR = true, ELOOP = true, ENAMETOOLONG = true,
                  EACCES = true, EPERM = true }

local SLASH, DOT = 47, 46

local function log_warn(msg, fields)
  local parts = { "ts=" .. os_date("!%Y-%m-%dT%H:%M:%SZ"), "level=warn", "sub=static",
                  format("msg=%q", msg) }
  for _, kv in ipairs(fields) do parts[#parts + 1] = kv[1] .. "=" .. format("%q", tostring(kv[2])) end
  stderr:write((gsub(concat(parts, " "), "\\\n", "\\n")), "\n")
end

--- The Content-Type for a file name, from its extension.
---@param name string a file name or path
---@return string
function M.content_type(name)
  local ext = match(name, "%.([^./]+)$")
  return ext and M.types[lower(ext)] or DEFAULT_TYPE
end

-- ---- paths: from the request target to a path under public/, or nothing ----------------

local function hex_char(h) return char(tonumber(h, 16)) end

-- Turns the raw request path into a relative path of plain segments ("css/app.css", "" for
-- the root) and whether it ended in "/". Returns nil for anything that is not such a path:
-- a malformed escape; an encoded "/", "\", NUL or "%" (so double encoding never decodes
-- into a dot segment); after decoding, a control byte or "\"; an empty segment ("//"); or a
-- segment starting with "." (".", "..", and hidden files such as .env).
local function clean(path)
  if byte(path, 1) ~= SLASH then return nil end
  if find(path, "%", 2, true) then
    if find((gsub(path, "%%%x%x", "")), "%", 1, true) then return nil end   -- a bad escape
    local l = lower(path)
    if find(l, "%2f", 1, true) or find(l, "%5c", 1, true) or find(l, "%00", 1, true)
       or find(l, "%25", 1, true) then
      return nil
    end
    path = gsub(path, "%%(%x%x)", hex_char)
  end
  if find(path, "[%c\\]") then return nil end
  local len = #path
  local slash = byte(path, len) == SLASH
  local i = 2
  while i <= len do
    local j = find(path, "/", i, true) or len + 1
    if j == i or byte(path, i) == DOT then return nil end   -- "//" or a dot segment
    i = j + 1
  end
  return sub(path, 2, slash and len - 1 or len), slash
end

-- True when rel (a path below public/'s real path) has a segment starting with ".".
local function hidden(rel)
  return byte(rel, 1) == DOT or find(rel, "/.", 1, true) ~= nil
end

local roots = {}   -- public dir as configured -> its real path

local function real_root(public)
  local root = roots[public]
  if root then return root end
  root = fs.realpath(public)
  if root then roots[public] = root end
  return root
end

-- Whether public/ has an entry named as the path's first segment, remembered for a second:
-- most GETs of an app with public/ go on to a route (/api/users/1), and without this each
-- would first wait for a realpath on the thread pool that can only fail. At most MAX_SEEN
-- names are remembered per second (the rest are looked up each time), so bad URLs cannot
-- grow it. A file added under a new top-level name is served within a second.
local MAX_SEEN = 512
local seen, seen_at, nseen = {}, 0, 0        -- seen[root][name] = exists

local function first_entry_exists(root, rel)
  local first = match(rel, "^[^/]+")
  if not first then return true end          -- the root itself
  local t = now()
  if t - seen_at >= 1 then seen, seen_at, nseen = {}, t, 0 end
  local names = seen[root]
  local known = names and names[first]
  if known ~= nil then return known end
  local st, _, code = fs.lstat(root .. "/" .. first)   -- a link counts: realpath decides
  if not st and code ~= "ENOENT" and code ~= "ENOTDIR" then
    return true                              -- not known to be absent: realpath will say
  end
  if nseen < MAX_SEEN then
    if not names then names = {}; seen[root] = names end
    names[first], nseen = st ~= nil, nseen + 1
  end
  return st ~= nil
end

-- ---- dates and validators ------------------------------------------------------------------

local DAYS = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" }
local MONTHS = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                 "Dec" }
local MONTH = {}
for i, m in ipairs(MONTHS) do MONTH[m] = i end

--- An IMF-fixdate (RFC 9110 5.6.7) for a time in seconds: "Sun, 06 Nov 1994 08:49:37 GMT".
---@param t number seconds since the epoch
---@return string
function M.http_date(t)
  local d = os_date("!*t", t)
  return format("%s, %02d %s %04d %02d:%02d:%02d GMT", DAYS[d.wday], d.day, MONTHS[d.month],
                d.year, d.hour, d.min, d.sec)
end

-- Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (H. Hinnant's algorithm).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * (m > 2 and m - 3 or m + 9) + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

--- Parses an HTTP date in any of the three forms RFC 9110 makes recipients accept
--- (IMF-fixdate, RFC 850, asctime); nil when it is none of them.
---@param s string
---@return number|nil seconds since the epoch
function M.parse_http_date(s)
  local d, mon, y, hh, mm, ss = match(s, "^%a%a%a, (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT$")
  if not d then
    d, mon, y, hh, mm, ss = match(s, "^%a+, (%d%d)%-(%a%a%a)%-(%d%d) (%d%d):(%d%d):(%d%d) GMT$")
    if y then y = tonumber(y) < 70 and "20" .. y or "19" .. y end
  end
  if not d then
    mon, d, hh, mm, ss, y = match(s, "^%a%a%a (%a%a%a) +(%d%d?) (%d%d):(%d%d):(%d%d) (%d%d%d%d)$")
  end
  local m = mon and MONTH[mon]
  if not m then return nil end
  return days_from_civil(tonumber(y), m, tonumber(d)) * 86400
         + tonumber(hh) * 3600 + tonumber(mm) * 60 + tonumber(ss)
end

-- If-None-Match against our (strong) ETag, by weak comparison as RFC 9110 13.1.2 says.
local function none_match(header, etag)
  for tag in header:gmatch("[^,]+") do
    tag = match(tag, "^%s*(.-)%s*$")
    if tag == "*" or tag == etag or tag == "W/" .. etag then return true end
  end
  return false
end

-- ---- ranges ----------------------------------------------------------------------------

--- Reads a Range header for a body of size bytes. Returns first, last (inclusive) for one
--- satisfiable range; false when unsatisfiable (416); nil when the header is to be ignored
--- (not bytes, malformed, or several ranges: the whole body is sent with 200).
---@param header string
---@param size number
---@return number|boolean|nil first, number last
function M.parse_range(header, size)
  local set = match(header, "^%s*[Bb][Yy][Tt][Ee][Ss]%s*=%s*(.-)%s*$")
  if not set or find(set, ",", 1, true) then return nil end
  local a, b = match(set, "^(%d+)%s*%-%s*(%d*)$")
  if a then
    local first, last = tonumber(a), b ~= "" and tonumber(b) or nil
    if last and last < first then return nil end
    if first >= size then return false end
    return first, min(last or size - 1, size - 1)
  end
  local n = match(set, "^%-%s*(%d+)$")
  if not n then return nil end
  n = tonumber(n)
  if n == 0 or size == 0 then return false end
  return max(0, size - n), size - 1
end

-- ---- bodies ----------------------------------------------------------------------------

-- Reads exactly len bytes at off; nil when the file ended first (it shrank under us).
local function read_exact(file, off, len, path)
  local parts, got = {}, 0
  while got < len do
    local data, err = file:read(min(len - got, fs.READ_MAX), off + got)
    if not data then error(format("static: cannot read %s: %s", path, err), 0) end
    if data == "" then return nil end
    parts[#parts + 1] = data
    got = got + #data
  end
  return concat(parts)
end

-- Streams len bytes from off, CHUNK at a time; res:write suspends while the client is slow.
local function stream(req, res, file, status, headers, off, len, path)
  res:start(status, headers, len)
  if req.method == "HEAD" then return res:finish() end
  local stop = off + len
  while off < stop do
    local data, err = file:read(min(M.CHUNK, stop - off), off)
    if not data or data == "" then
      -- The head is out, so no status can say so: drop the connection, and the client sees
      -- fewer bytes than Content-Length promised.
      log_warn(data and "file shrank while being sent" or "read failed while sending",
               { { "req", req.id }, { "path", path }, { "sent", off }, { "err", err or "EOF" } })
      return res:abort()
    end
    if not res:write(data) then return end   -- the client went away
    off = off + #data
  end
  res:finish()
end

local function send_file(req, res, file, st, path, name)
  local size, h = st.size, req.headers
  local etag = format('"%x-%x-%x"', size, st.mtime, st.mtime_nsec)
  local modified = M.http_date(st.mtime)
  local inm, ims = h["if-none-match"], h["if-modified-since"]
  local fresh
  if inm then fresh = none_match(inm, etag)   -- it wins over If-Modified-Since (RFC 9110 13.2.2)
  elseif ims then
    local t = M.parse_http_date(ims)
    fresh = t ~= nil and st.mtime <= t
  end
  if fresh then
    res:send(304, { ETag = etag, ["Last-Modified"] = modified, ["Cache-Control"] = "no-cache" })
    return
  end
  local headers = {
    ["Content-Type"] = M.content_type(name), ETag = etag, ["Last-Modified"] = modified,
    ["Accept-Ranges"] = "bytes", ["Cache-Control"] = "no-cache",
    ["X-Content-Type-Options"] = "nosniff",
  }
  local status, off, len = 200, 0, size
  local range = h.range
  if range then
    local ifr = h["if-range"]     -- a range of a representation the client no longer has
    if ifr and ifr ~= etag and ifr ~= modified then range = nil end
  end
  if range then
    local first, last = M.parse_range(range, size)
    if first == false then
      res:send(416, { ["Content-Type"] = "text/plain", ["Content-Range"] = format("bytes */%d", size),
                      ["Accept-Ranges"] = "bytes", ETag = etag }, "Range Not Satisfiable\n")
      return
    elseif first then
      status, off, len = 206, first, last - first + 1
      headers["Content-Range"] = format("bytes %d-%d/%d", first, last, size)
    end
  end
  if len > M.SMALL then return stream(req, res, file, status, headers, off, len, path) end
  local body = len > 0 and read_exact(file, off, len, path) or ""
  if not body then error(format("static: %s shrank while being read", path), 0) end
  res:send(status, headers, body)
end

--- Answers req from app.public when it names a file there (GET and HEAD only). Returns true
--- when it answered, false to let routing continue: not GET/HEAD, no such file, a directory
--- without index.html, or a path refused by the rules in docs/static.md. Raises on an I/O
--- error other than "not found" (the server turns it into a 500).
---@param app table from fibril.app.load (uses app.public)
---@param req table the request (method, path, query, headers)
---@param response_of function response_of(req) -> the response object: made only when a file
--- is answered, so a request routed on to a controller makes none (docs/architecture.md,
--- "Request tokens")
---@return boolean answered
function M.serve(app, req, response_of)
  local method = req.method
  if (method ~= "GET" and method ~= "HEAD") or not app.public then return false end
  local rel, slash = clean(req.path)
  if not rel then return false end
  local root = real_root(app.public)
  if not root or not first_entry_exists(root, rel) then return false end
  local name = rel == "" and root or root .. "/" .. rel
  if slash then name = name .. "/index.html" end

  local real, err, code = fs.realpath(name)
  if not real then
    if DECLINE[code] then return false end
    error(format("static: %s (%s)", err, name), 0)
  end
  -- A link may point anywhere: what counts is where it lands. Outside public/ (or on a hidden
  -- file inside it) is "not here", the same answer as a missing file, so nothing leaks.
  if sub(real, 1, #root + 1) ~= root .. "/" or hidden(sub(real, #root + 2)) then return false end
  local file
  file, err, code = fs.open(real, "nofollow")   -- real has no links; one swapped in fails
  if not file then
    if DECLINE[code] then return false end
    error(format("static: %s (%s)", err, real), 0)
  end
  local ok, answered = pcall(function()
    local st, serr = file:stat()
    if not st then error(format("static: %s (%s)", serr, real), 0) end
    if st.type == "directory" then
      if slash then return false end
      local index = fs.stat(real .. "/index.html")
      if not index or index.type ~= "file" then return false end
      local location = req.path .. "/" .. (req.query and "?" .. req.query or "")
      response_of(req):send(301, { Location = location, ["Content-Type"] = "text/plain" },
                            "Moved Permanently\n")
      return true
    end
    if st.type ~= "file" then return false end
    send_file(req, response_of(req), file, st, real, name)
    return true
  end)
  file:close()
  if not ok then error(answered, 0) end
  return answered
end

return M
