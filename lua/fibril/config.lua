--- fibril.config: loads APP/config/app.lua, picks one environment and merges it over the
--- defaults. SCHEMA below is the one list of keys: a key added there is known, defaulted,
--- type-checked and documented (docs/configuration.md) in one line. Every error is one line
--- naming the key and the file.
local type, error, pairs, tostring, pcall, loadfile =
      type, error, pairs, tostring, pcall, loadfile
local open, sort, concat = io.open, table.sort, table.concat
local floor, min, huge = math.floor, math.min, math.huge
local format, find, sub, gsub = string.format, string.find, string.sub, string.gsub

local M = {}

-- Checks: each returns nil when the value is fine, else what it must be ("a positive
-- integer"), which the error message completes with what it got.
local function integer(v) return v == floor(v) and v > -huge and v < huge end

local function positive_integer(v)
  if not (integer(v) and v >= 1) then return "a positive integer" end
end

local function non_negative_integer(v)
  if not (integer(v) and v >= 0) then return "an integer >= 0" end
end

local function port_number(v)   -- 0: any free port (tests, --workers picks one for all)
  if not (integer(v) and v >= 0 and v <= 65535) then return "an integer from 0 to 65535" end
end

local function seconds(v)   -- NaN and inf fail too: every timeout is a real deadline
  if not (v > 0 and v < huge) then return "a positive number of seconds" end
end

local function gc_pause(v)     -- collectgarbage("setpause"): below 100 a cycle never rests
  if not (integer(v) and v >= 100 and v <= 10000) then return "a whole number from 100 to 10000" end
end

local function gc_stepmul(v)   -- the least collectgarbage("setstepmul") (fibril.gc raises it)
  if not (integer(v) and v >= 10 and v <= 10000) then return "a whole number from 10 to 10000" end
end

local function non_empty(v)
  if v == "" then return "a non-empty string" end
end

local function one_of(...)
  local names, set = { ... }, {}
  for i = 1, #names do set[names[i]] = true end
  local want = "one of " .. concat(names, ", ")
  return function(v)
    if not set[v] then return want end
  end
end

local function schedule(v)   -- a list of { every = seconds, task = "Name", args = {...} }
  for i, e in pairs(v) do
    if type(i) ~= "number" or type(e) ~= "table" or type(e.task) ~= "string"
       or type(e.every) ~= "number" or seconds(e.every) or (e.args ~= nil and type(e.args) ~= "table") then
      return "a list of { every = seconds, task = \"Name\", args = {...} }"
    end
    for k in pairs(e) do
      if k ~= "every" and k ~= "task" and k ~= "args" then return "entries with every, task, args only" end
    end
  end
end

-- Every key: dotted name -> { type, default, check }. A default of nil still makes the key
-- known. Each prefix of a dotted name ("http") is a section: a table of its keys.
-- Times in seconds, sizes in bytes, as in DESIGN.md "Configuration".
local SCHEMA = {
  ["host"]                   = { "string",  "127.0.0.1", non_empty },
  ["port"]                   = { "number",  3000,        port_number },
  ["workers"]                = { "number",  1,           positive_integer },
  ["reload"]                 = { "boolean", true },       -- forced false in production
  ["log.level"]              = { "string",  "info",      one_of("debug", "info", "warn", "error") },
  ["log.format"]             = { "string",  "text",      one_of("text", "json") },
  ["log.access"]             = { "boolean", true },       -- one line per HTTP request on stdout
  ["gc.pause"]               = { "number",  200,         gc_pause },    -- fibril run only
  ["gc.stepmul"]             = { "number",  25,          gc_stepmul },  -- (lua/fibril/gc.lua)
  ["gc.min_growth_bytes"]    = { "number",  8388608,     non_negative_integer },
  ["http.max_header_bytes"]  = { "number",  16384,       positive_integer },
  ["http.max_body_bytes"]    = { "number",  1048576,     positive_integer },
  ["http.max_url_bytes"]     = { "number",  8192,        positive_integer },
  ["http.header_timeout"]    = { "number",  10,          seconds },
  ["http.body_timeout"]      = { "number",  30,          seconds },
  ["http.body_deadline"]     = { "number",  60,          seconds },   -- the whole body, total
  ["http.keepalive_timeout"] = { "number",  5,           seconds },
  ["http.send_timeout"]      = { "number",  30,          seconds },   -- a client that stops reading
  ["http.max_connections"]   = { "number",  10000,       positive_integer },
  ["http.drain_timeout"]     = { "number",  30,          seconds },
  ["http.write_high_water"]  = { "number",  262144,      positive_integer },
  ["sse.heartbeat"]          = { "number",  15,          seconds },
  ["sse.replay"]             = { "number",  0,           non_negative_integer },
  ["sse.max_buffer"]         = { "number",  262144,      positive_integer },
  ["pubsub.adapter"]         = { "string",  "local",     one_of("local", "redis") },
  ["pubsub.url"]             = { "string",  nil,         non_empty },  -- nil: redis.url
  ["pubsub.retention"]       = { "number",  300,         seconds },
  ["pubsub.stream"]          = { "string",  "fibril:pubsub", non_empty },  -- the redis adapter's key
  ["redis.url"]              = { "string",  nil,         non_empty },  -- nil: REDIS_URL or local
  ["redis.pool"]             = { "number",  10,          positive_integer },
  ["redis.connect_timeout"]  = { "number",  5,           seconds },
  ["redis.timeout"]          = { "number",  5,           seconds },
  ["database.url"]           = { "string",  nil,         non_empty },
  ["database.pool"]          = { "number",  10,          positive_integer },
  ["database.checkout_timeout"]  = { "number", 5,        seconds },
  ["database.statement_timeout"] = { "number", 30,       seconds },
  ["database.connect_timeout"]   = { "number", 5,        seconds },
  ["database.max_result_bytes"]  = { "number", 67108864, positive_integer },  -- one result's rows
  ["http_client.timeout"]    = { "number",  30,          seconds },
  ["http_client.connect_timeout"] = { "number", 5,       seconds },
  ["http_client.per_origin"] = { "number",  16,          positive_integer },
  ["http_client.ca_file"]    = { "string",  nil,         non_empty },
  ["http_client.max_connections"] = { "number", 256,     positive_integer },
  ["http_client.idle_timeout"] = { "number", 30,         seconds },
  ["http_client.max_body"]   = { "number",  16777216,    positive_integer },
  ["http_client.max_header_bytes"] = { "number", 65536,  positive_integer },
  ["http_client.max_redirects"] = { "number", 5,         non_negative_integer },
  ["daemons.backoff_min"]    = { "number",  0.1,         seconds },   -- first restart delay
  ["daemons.backoff_max"]    = { "number",  30,          seconds },   -- the delay doubles up to it
  ["daemons.reset_after"]    = { "number",  60,          seconds },   -- a run this long resets it
  ["deferred.backend"]       = { "string",  "journal",   one_of("journal", "postgres") },
  ["deferred.path"]          = { "string",  "storage/deferred", non_empty },
  ["deferred.concurrency"]   = { "number",  16,          positive_integer },
  ["deferred.retries"]       = { "number",  20,          non_negative_integer },
  ["deferred.fsync"]         = { "string",  "always",    one_of("always", "batch", "never") },
  ["deferred.fsync_interval"] = { "number", 0.1,         seconds },   -- fsync = "batch": how often
  ["deferred.backoff_min"]   = { "number",  1,           seconds },   -- first retry delay (before jitter)
  ["deferred.backoff_max"]   = { "number",  600,         seconds },   -- the delay doubles up to it
  ["deferred.max_pending"]   = { "number",  100000,      positive_integer },  -- tasks per process
  ["deferred.enqueue_timeout"] = { "number", 5,          seconds },   -- wait past max_pending
  ["deferred.poll_interval"] = { "number",  1,           seconds },   -- postgres: idle poll
  ["deferred.table"]         = { "string",  "fibril_deferred", non_empty },  -- postgres queue table
  ["deferred.lease"]         = { "number",  300,         seconds },   -- postgres: a claim (renewed at 1/3)
  ["deferred.schedule"]      = { "table",   nil,         schedule },  -- { { every = s, task = "Name" } }
}

-- Derived once from SCHEMA: SECTIONS[""] and SECTIONS["http"] list the names known at that
-- level (what "did you mean" chooses from); a name that is itself a section maps to true.
local SECTIONS = { [""] = {} }
for key in pairs(SCHEMA) do
  local prefix, rest = "", key
  while true do
    local dot = find(rest, ".", 1, true)
    local name = dot and sub(rest, 1, dot - 1) or rest
    local full = prefix == "" and name or prefix .. "." .. name
    SECTIONS[prefix][name] = dot ~= nil
    if not dot then break end
    SECTIONS[full] = SECTIONS[full] or {}
    prefix, rest = full, sub(rest, dot + 1)
  end
end

-- Optimal string alignment distance (Levenshtein plus adjacent swaps: "prot" is 1 from
-- "port"). Stops early and returns limit + 1 once the distance must exceed limit.
local function distance(a, b, limit)
  local la, lb = #a, #b
  if la - lb > limit or lb - la > limit then return limit + 1 end
  local prev2, prev, cur = {}, {}, {}
  for j = 0, lb do prev[j] = j end
  for i = 1, la do
    cur[0] = i
    local row_min = i
    local ca = sub(a, i, i)
    for j = 1, lb do
      local cb = sub(b, j, j)
      local cost = ca == cb and 0 or 1
      local d = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
      if i > 1 and j > 1 and ca == sub(b, j - 1, j - 1) and sub(a, i - 1, i - 1) == cb then
        d = min(d, prev2[j - 2] + 1)
      end
      cur[j] = d
      if d < row_min then row_min = d end
    end
    if row_min > limit then return limit + 1 end
    prev2, prev, cur = prev, cur, prev2
  end
  return prev[lb]
end

-- The closest known name at the level of prefix, within distance 2; ties go to the first
-- name in sorted order, so the suggestion never depends on hash order.
local function suggest(prefix, name)
  if type(name) ~= "string" then return nil end
  local names = {}
  for known in pairs(SECTIONS[prefix]) do names[#names + 1] = known end
  sort(names)
  local best, best_d = nil, 3
  for i = 1, #names do
    local d = distance(name, names[i], 2)
    if d < best_d then best, best_d = names[i], d end
  end
  return best
end

local function join(prefix, name)
  if type(name) ~= "string" then
    return prefix .. "[" .. tostring(name) .. "]"
  end
  return prefix == "" and name or prefix .. "." .. name
end

local function show(v)
  if type(v) == "string" then return "'" .. v .. "'" end
  if type(v) == "number" then return format("%.14g", v) end
  return tostring(v)
end

-- Raises the one-line message every check ends in: "config: <msg> in <source>[ (<hint>)]".
local function fail(msg, source, hint)
  error("config: " .. msg .. " in " .. source .. (hint and " (" .. hint .. ")" or ""), 0)
end

-- Keys in a stable order (strings sorted first, then the rest by their text), so that "the
-- first problem" is the same one on every run.
local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  sort(keys, function(a, b)
    local sa, sb = type(a) == "string", type(b) == "string"
    if sa ~= sb then return sa end
    return tostring(a) < tostring(b)
  end)
  return keys
end

local function check_section(tbl, prefix, source)
  local known = SECTIONS[prefix]
  local keys = sorted_keys(tbl)
  for i = 1, #keys do
    local name = keys[i]
    local key, value = join(prefix, name), tbl[name]
    local is_section = known[name]
    if is_section == nil then
      local close = suggest(prefix, name)
      fail(format("unknown key '%s'", key), source,
           close and format("did you mean '%s'?", join(prefix, close)))
    elseif is_section then
      if type(value) ~= "table" then
        fail(format("'%s' must be a table, got %s", key, type(value)), source)
      end
      check_section(value, key, source)
    else
      local spec = SCHEMA[key]
      if type(value) ~= spec[1] then
        fail(format("'%s' must be a %s, got %s", key, spec[1], type(value)), source)
      end
      local want = spec[3] and spec[3](value)
      if want then
        fail(format("'%s' must be %s, got %s", key, want, show(value)), source)
      end
    end
  end
end

--- Returns a fresh table with every key set to its default (DESIGN.md "Configuration").
--- Keys whose default is nil (database.url, http_client.ca_file, pubsub.url) are absent
--- from it but known: setting them is allowed.
---@return table cfg e.g. `config.defaults().http.max_body_bytes == 1048576`
function M.defaults()
  local cfg = {}
  for key, spec in pairs(SCHEMA) do
    local t, rest = cfg, key
    local dot = find(rest, ".", 1, true)
    while dot do
      local name = sub(rest, 1, dot - 1)
      t[name] = t[name] or {}
      t, rest = t[name], sub(rest, dot + 1)
      dot = find(rest, ".", 1, true)
    end
    t[rest] = spec[2]
  end
  return cfg
end

--- Checks one table of settings (an environment's table from config/app.lua, or the flags'
--- overrides): every key known, every value of its type and in its range.
--- Raises `config: <problem> in <source>` on the first problem, in sorted key order.
---@param tbl table settings shaped like defaults(), any subset of it
---@param source string where tbl came from, named in the error (a file, "command-line flags")
---@return boolean true
function M.validate(tbl, source)
  source = source or "configuration"
  if type(tbl) ~= "table" then
    fail(format("settings must be a table, got %s", type(tbl)), source)
  end
  check_section(tbl, "", source)
  return true
end

-- Copies the leaves of src over dst, section by section (validated first, so a section in
-- src is a table and so is the one in dst, since defaults() creates every section).
local function merge(dst, src)
  for k, v in pairs(src) do
    -- A table-valued key (deferred.schedule) has no table below it: it is copied whole.
    if type(v) == "table" and type(dst[k]) == "table" then merge(dst[k], v) else dst[k] = v end
  end
end

-- Lua shortens a long chunk name to "...tail" in its messages; put the whole path back so
-- the message names the file in full. Errors raised elsewhere (a required lib) keep their
-- own location and say which file was being loaded.
local function locate(msg, path)
  if type(msg) ~= "string" then msg = tostring(msg) end
  if sub(msg, 1, #path + 1) == path .. ":" then return msg end
  local tail, rest = msg:match("^%.%.%.(.-)(:%d+:.*)$")
  if tail and #tail > 0 and sub(path, -#tail) == tail then return path .. rest end
  return msg .. " (loading " .. path .. ")"
end

-- Runs the file; returns the table it returns, or nil when there is no file.
local function read_file(path)
  local f = open(path, "r")
  if not f then return nil end
  f:close()
  local chunk, err = loadfile(path)
  if not chunk then error("config: " .. locate(err, path), 0) end
  local ok, result = pcall(chunk)
  if not ok then error("config: " .. locate(result, path), 0) end
  if type(result) ~= "table" then
    error(format("config: %s must return a table of environments "
                 .. "({ development = {...}, production = {...} }), got %s",
                 path, type(result)), 0)
  end
  return result
end

--- Loads APP/config/app.lua and returns the settings for one environment: the defaults,
--- under the file's table for env, under overrides. A missing file, or a file without a
--- table for env, gives the defaults. Every environment in the file is checked, not only
--- env, so a mistake in production fails in development too. In production, reload is
--- false whatever the file or the flags say.
---@param app_dir string the application directory
---@param env string|nil "development" (when nil), "test", "production" or any name in the file
---@param overrides table|nil settings from command-line flags, e.g. `{ port = 4000 }`
---@return table cfg like defaults(), plus cfg.env and cfg.app_dir
function M.load(app_dir, env, overrides)
  if type(app_dir) ~= "string" then
    error("config.load: app_dir must be a string, got " .. type(app_dir), 2)
  end
  env = env or "development"
  if type(env) ~= "string" or env == "" then
    error("config.load: env must be a non-empty string", 2)
  end
  if overrides ~= nil and type(overrides) ~= "table" then
    error("config.load: overrides must be a table, got " .. type(overrides), 2)
  end
  local path = gsub(app_dir, "/+$", "") .. "/config/app.lua"
  local file = read_file(path)
  local cfg = M.defaults()
  if file then
    local names = sorted_keys(file)
    for i = 1, #names do
      local name = names[i]
      if SECTIONS[""][name] ~= nil then   -- `return { port = 3000 }`: no environment level
        fail(format("top-level key '%s' is a setting, not an environment", name), path,
             format("put it inside one: { development = { %s = ... } }", name))
      end
      if type(file[name]) ~= "table" then
        fail(format("environment %s must be a table of settings, got %s",
                    show(name), type(file[name])), path)
      end
      M.validate(file[name], path)
    end
    if file[env] then merge(cfg, file[env]) end
  end
  if overrides then
    M.validate(overrides, "command-line flags")
    merge(cfg, overrides)
  end
  if env == "production" then cfg.reload = false end
  cfg.env, cfg.app_dir = env, app_dir
  return cfg
end

-- The settings of the app this process runs (set by fibril.app.load), for the modules whose
-- default instance reads them (require "fibril.redis" is a pool configured from `redis`).
local current

--- The loaded app's settings, or nil when no app is loaded (a script, a spec).
---@return table|nil
function M.current() return current end

--- Makes cfg the loaded app's settings (fibril.app.load calls this).
---@param cfg table|nil
function M.set_current(cfg) current = cfg end

return M
