local config = require "fibril.config"
local support = require "spec.support"

-- Writes APP/config/app.lua under a fresh app dir; returns the app dir and the file's path.
local count = 0
local function app(source)
  count = count + 1
  local dir = support.tmpdir() .. "/apps/app" .. count
  return dir, support.write("apps/app" .. count .. "/config/app.lua", source)
end

-- The message load raises for this file, or fails the spec when it raises nothing.
local function load_error(source, env, overrides)
  local dir, path = app(source)
  local ok, err = pcall(config.load, dir, env, overrides)
  assert.is_false(ok, "expected an error from:\n" .. source)
  assert.is_string(err)
  return err, path
end

local function validate_error(tbl)
  local ok, err = pcall(config.validate, tbl, "apps/x/config/app.lua")
  assert.is_false(ok)
  return err
end

local DESIGN_DEFAULTS = {
  host = "127.0.0.1", port = 3000, workers = 1,
  reload = true,
  log = { level = "info", format = "text", access = true },
  gc = { pause = 200, stepmul = 25, min_growth_bytes = 8388608 },
  http = {
    max_header_bytes = 16384,
    max_body_bytes   = 1048576,
    max_url_bytes    = 8192,
    header_timeout   = 10,
    body_timeout     = 30,
    body_deadline    = 60,
    keepalive_timeout = 5,
    send_timeout = 30,
    max_connections  = 10000,
    drain_timeout    = 30,
    write_high_water = 262144,
  },
  sse = { heartbeat = 15, replay = 0, max_buffer = 262144 },
  pubsub = { adapter = "local", retention = 300, stream = "fibril:pubsub" },
  redis = { pool = 10, connect_timeout = 5, timeout = 5 },
  database = { url = nil, pool = 10, checkout_timeout = 5, statement_timeout = 30,
               connect_timeout = 5, max_result_bytes = 67108864 },   -- the last two: issue 7
  http_client = { timeout = 30, connect_timeout = 5, per_origin = 16, ca_file = nil,
                  max_connections = 256, idle_timeout = 30, max_body = 16777216,
                  max_header_bytes = 65536, max_redirects = 5 },
  deferred = { backend = "journal", path = "storage/deferred", concurrency = 16,
               retries = 20, fsync = "always",
               -- docs/deferred.md
               fsync_interval = 0.1, backoff_min = 1, backoff_max = 600, max_pending = 100000,
               enqueue_timeout = 5, poll_interval = 1, table = "fibril_deferred", lease = 300, schedule = nil },
  daemons = { backoff_min = 0.1, backoff_max = 30, reset_after = 60 },   -- docs/daemons.md
}

describe("config.defaults", function()
  it("returns every key with the default DESIGN.md gives it", function()
    assert.are.same(DESIGN_DEFAULTS, config.defaults())
  end)

  it("returns a fresh copy each time, so changing one leaves the next untouched", function()
    local a = config.defaults()
    a.http.max_body_bytes = 1
    a.port = 1
    local b = config.defaults()
    assert.are.equal(1048576, b.http.max_body_bytes)
    assert.are.equal(3000, b.port)
    assert.are_not.equal(a.http, b.http)
  end)

  it("passes its own validation", function()
    assert.is_true(config.validate(config.defaults(), "defaults"))
  end)

  it("knows the keys whose default is nil", function()
    assert.is_true(config.validate({
      database = { url = "postgres://localhost/app" },
      http_client = { ca_file = "/etc/ssl/ca.pem" },
      pubsub = { adapter = "redis", url = "redis://10.0.0.2:6379/1", retention = 60 },
    }, "apps/x/config/app.lua"))
  end)
end)

describe("config.load", function()
  it("gives the defaults, env and app_dir when the app has no config/app.lua", function()
    local dir = support.tmpdir() .. "/apps/without_config"
    os.execute("mkdir -p '" .. dir .. "'")
    local cfg = config.load(dir, "test")
    assert.are.equal("test", cfg.env)
    assert.are.equal(dir, cfg.app_dir)
    cfg.env, cfg.app_dir = nil, nil
    assert.are.same(DESIGN_DEFAULTS, cfg)
  end)

  it("picks the table of the environment asked for", function()
    local dir = app([[
      return {
        development = { port = 3001 },
        test        = { port = 3002, log = { level = "warn" } },
        production  = { port = 3003, workers = 8 },
      }
    ]])
    assert.are.equal(3001, config.load(dir, "development").port)
    local t = config.load(dir, "test")
    assert.are.equal(3002, t.port)
    assert.are.equal("warn", t.log.level)
    local p = config.load(dir, "production")
    assert.are.equal(3003, p.port)
    assert.are.equal(8, p.workers)
    assert.are.equal(1, config.load(dir, "development").workers)
  end)

  it("uses development when no environment is given", function()
    local dir = app("return { development = { port = 3100 }, test = { port = 3200 } }")
    local cfg = config.load(dir)
    assert.are.equal("development", cfg.env)
    assert.are.equal(3100, cfg.port)
  end)

  it("gives the defaults for an environment the file has no table for", function()
    local dir = app("return { production = { port = 80, workers = 4 } }")
    local cfg = config.load(dir, "test")
    cfg.env, cfg.app_dir = nil, nil
    assert.are.same(DESIGN_DEFAULTS, cfg)
  end)

  it("accepts an environment name of the app's own, such as staging", function()
    local dir = app("return { staging = { host = '0.0.0.0' }, production = {} }")
    local cfg = config.load(dir, "staging")
    assert.are.equal("0.0.0.0", cfg.host)
    assert.are.equal("staging", cfg.env)
  end)

  it("merges nested tables key by key, keeping the defaults the file leaves out", function()
    local dir = app([[
      return { development = {
        http = { max_body_bytes = 2048 },
        log = { format = "json" },
        database = { url = "postgres://127.0.0.1/dev" },
      } }
    ]])
    local cfg = config.load(dir, "development")
    assert.are.equal(2048, cfg.http.max_body_bytes)
    assert.are.equal(16384, cfg.http.max_header_bytes)
    assert.are.equal(10, cfg.http.header_timeout)
    assert.are.equal(262144, cfg.http.write_high_water)
    assert.are.equal("json", cfg.log.format)
    assert.are.equal("info", cfg.log.level)
    assert.are.equal("postgres://127.0.0.1/dev", cfg.database.url)
    assert.are.equal(10, cfg.database.pool)
    assert.are.equal(3000, cfg.port)
  end)

  it("lets command-line overrides win over the file, nested ones included", function()
    local dir = app([[
      return { development = { port = 3001, workers = 3, reload = true,
                               http = { max_body_bytes = 2048, body_timeout = 9 } } }
    ]])
    local cfg = config.load(dir, "development",
                            { port = 4000, reload = false, http = { body_timeout = 12 } })
    assert.are.equal(4000, cfg.port)
    assert.are.equal(3, cfg.workers)
    assert.is_false(cfg.reload)
    assert.are.equal(12, cfg.http.body_timeout)
    assert.are.equal(2048, cfg.http.max_body_bytes)
  end)

  it("turns reload off in production whatever the file and the flags say", function()
    local dir = app("return { production = { reload = true }, development = { reload = true } }")
    assert.is_false(config.load(dir, "production").reload)
    assert.is_false(config.load(dir, "production", { reload = true }).reload)
    assert.is_true(config.load(dir, "development").reload)
    local missing = support.tmpdir() .. "/apps/no_such_app"
    assert.is_false(config.load(missing, "production").reload)
  end)

  it("keeps reload off in development when the file turns it off", function()
    local dir = app("return { development = { reload = false } }")
    assert.is_false(config.load(dir, "development").reload)
  end)

  it("lets the file read environment variables with os.getenv", function()
    local home = os.getenv("HOME")
    assert.is_string(home)
    local dir = app([[
      return { development = {
        database = { url = os.getenv("HOME") },
        port = tonumber(os.getenv("FIBRIL_SPEC_SURELY_UNSET_VAR") or "4100"),
      } }
    ]])
    local cfg = config.load(dir, "development")
    assert.are.equal(home, cfg.database.url)
    assert.are.equal(4100, cfg.port)
  end)

  it("finds the file when the app dir is given with a trailing slash", function()
    local dir = app("return { development = { port = 3456 } }")
    assert.are.equal(3456, config.load(dir .. "/", "development").port)
  end)

  it("rejects arguments of the wrong type as a programming error", function()
    assert.has_error(function() config.load(nil, "test") end,
                     "config.load: app_dir must be a string, got nil")
    assert.has_error(function() config.load("apps/x", "test", 5) end,
                     "config.load: overrides must be a table, got number")
    assert.has_error(function() config.load("apps/x", "") end,
                     "config.load: env must be a non-empty string")
  end)
end)

describe("config.load errors in config/app.lua", function()
  it("names the file and line of a syntax error", function()
    local err, path = load_error("return {\n  development = {\n    port = = 3000,\n  },\n}\n")
    assert.are.equal("config: " .. path .. ":3:", err:sub(1, #path + 11))
    assert.matches("unexpected symbol near '='", err, 1, true)
    assert.is_nil(err:find("\n"))
  end)

  it("names the file and line of an error raised while running it", function()
    local err, path = load_error("local x = nil\nreturn { development = { port = x.port } }\n")
    assert.are.equal("config: " .. path .. ":2: attempt to index local 'x' (a nil value)", err)
    err, path = load_error("\n\nerror('missing SECRET')\n")
    assert.are.equal("config: " .. path .. ":3: missing SECRET", err)
  end)

  it("names the file in full even when the path is longer than Lua's chunk names", function()
    local long = "apps/" .. string.rep("a_very_long_directory_name/", 4) .. "deep"
    local path = support.write(long .. "/config/app.lua", "return {\n development = = 1 }\n")
    local ok, err = pcall(config.load, support.tmpdir() .. "/" .. long, "development")
    assert.is_false(ok)
    assert.is_true(#path > 60)
    assert.are.equal("config: " .. path .. ":2:", err:sub(1, #path + 11))
  end)

  it("names the file being loaded when the error carries no location", function()
    local err, path = load_error("error('no location here', 0)")
    assert.are.equal("config: no location here (loading " .. path .. ")", err)
  end)

  it("says the file must return a table when it returns something else", function()
    local err, path = load_error("return 42")
    assert.are.equal("config: " .. path .. " must return a table of environments "
                     .. "({ development = {...}, production = {...} }), got number", err)
    err, path = load_error("local t = { development = {} }")
    assert.are.equal("config: " .. path .. " must return a table of environments "
                     .. "({ development = {...}, production = {...} }), got nil", err)
  end)

  it("rejects an environment that is not a table", function()
    local err, path = load_error("return { development = {}, production = 'fast' }", "development")
    assert.are.equal("config: environment 'production' must be a table of settings, got string in "
                     .. path, err)
  end)

  it("rejects settings written at the top, outside any environment", function()
    local err, path = load_error("return { port = 3000 }")
    assert.are.equal("config: top-level key 'port' is a setting, not an environment in " .. path
                     .. " (put it inside one: { development = { port = ... } })", err)
  end)

  it("names the full dotted key of a misspelt key and suggests the close one", function()
    local err, path = load_error("return { development = { http = { max_header_byte = 1 } } }")
    assert.are.equal("config: unknown key 'http.max_header_byte' in " .. path
                     .. " (did you mean 'http.max_header_bytes'?)", err)
  end)

  it("suggests a key two edits away, and one with two letters swapped", function()
    local err, path = load_error("return { development = { wrokers = 2 } }")
    assert.are.equal("config: unknown key 'wrokers' in " .. path .. " (did you mean 'workers'?)", err)
    err = load_error("return { development = { redis = { pol = 2 } } }")
    assert.matches("(did you mean 'redis.pool'?)", err, 1, true)
    err = load_error("return { development = { deferred = { retires = 2 } } }")
    assert.matches("(did you mean 'deferred.retries'?)", err, 1, true)
  end)

  it("offers no suggestion when no known key at that level is close", function()
    local err, path = load_error("return { development = { http = { colour = 'red' } } }")
    assert.are.equal("config: unknown key 'http.colour' in " .. path, err)
    -- port is a known key, but at the top level, not inside http
    err, path = load_error("return { development = { http = { port = 80 } } }")
    assert.are.equal("config: unknown key 'http.port' in " .. path, err)
    err, path = load_error("return { development = { timezone = 'UTC' } }")
    assert.are.equal("config: unknown key 'timezone' in " .. path, err)
  end)

  it("names a list entry where a key belongs", function()
    local err, path = load_error("return { development = { log = { 'debug' } } }")
    assert.are.equal("config: unknown key 'log[1]' in " .. path, err)
  end)

  it("checks every environment, not only the one loaded", function()
    local err, path = load_error([[
      return { development = { port = 3000 }, production = { sse = { hearbeat = 5 } } }
    ]], "development")
    assert.are.equal("config: unknown key 'sse.hearbeat' in " .. path
                     .. " (did you mean 'sse.heartbeat'?)", err)
  end)

  it("names the key, the expected type and the type it got", function()
    local err, path = load_error("return { development = { http = { max_body_bytes = '1mb' } } }")
    assert.are.equal("config: 'http.max_body_bytes' must be a number, got string in " .. path, err)
    err, path = load_error("return { development = { reload = 'no' } }")
    assert.are.equal("config: 'reload' must be a boolean, got string in " .. path, err)
    err, path = load_error("return { development = { host = 127 } }")
    assert.are.equal("config: 'host' must be a string, got number in " .. path, err)
    err, path = load_error("return { development = { redis = 'redis://x' } }")
    assert.are.equal("config: 'redis' must be a table, got string in " .. path, err)
  end)

  it("rejects a port number outside 0..65535 or not whole", function()
    for _, v in ipairs({ "65536", "-1", "80.5" }) do
      local err, path = load_error("return { development = { port = " .. v .. " } }")
      assert.are.equal("config: 'port' must be an integer from 0 to 65535, got " .. v
                       .. " in " .. path, err)
    end
    assert.are.equal(65535, config.load((app("return { development = { port = 65535 } }"))).port)
    assert.are.equal(0, config.load((app("return { development = { port = 0 } }"))).port)
  end)

  it("rejects sizes, counts and timeouts that are not positive", function()
    local cases = {
      { "workers = 0", "'workers' must be a positive integer, got 0" },
      { "http = { max_header_bytes = -1 }",
        "'http.max_header_bytes' must be a positive integer, got -1" },
      { "http = { max_url_bytes = 10.5 }", "'http.max_url_bytes' must be a positive integer, got 10.5" },
      { "http = { header_timeout = 0 }",
        "'http.header_timeout' must be a positive number of seconds, got 0" },
      { "redis = { pool = 0 }", "'redis.pool' must be a positive integer, got 0" },
      { "database = { checkout_timeout = -5 }",
        "'database.checkout_timeout' must be a positive number of seconds, got -5" },
      { "http_client = { timeout = 1/0 }",
        "'http_client.timeout' must be a positive number of seconds, got inf" },
      { "sse = { replay = -1 }", "'sse.replay' must be an integer >= 0, got -1" },
      { "deferred = { concurrency = 0 }", "'deferred.concurrency' must be a positive integer, got 0" },
      { "deferred = { retries = -2 }", "'deferred.retries' must be an integer >= 0, got -2" },
    }
    for _, c in ipairs(cases) do
      local err, path = load_error("return { development = { " .. c[1] .. " } }")
      assert.are.equal("config: " .. c[2] .. " in " .. path, err)
    end
  end)

  it("accepts zero where zero means none, and fractions of a second", function()
    local cfg = config.load((app([[
      return { development = { sse = { replay = 0 }, deferred = { retries = 0 },
                               http = { keepalive_timeout = 0.5 } } }
    ]])))
    assert.are.equal(0, cfg.sse.replay)
    assert.are.equal(0, cfg.deferred.retries)
    assert.are.equal(0.5, cfg.http.keepalive_timeout)
  end)

  it("names the allowed values of each enumerated key", function()
    local cases = {
      { "log = { level = 'verbose' }", "'log.level' must be one of debug, info, warn, error, got 'verbose'" },
      { "log = { format = 'xml' }", "'log.format' must be one of text, json, got 'xml'" },
      { "pubsub = { adapter = 'nats' }", "'pubsub.adapter' must be one of local, redis, got 'nats'" },
      { "deferred = { backend = 'sqlite' }",
        "'deferred.backend' must be one of journal, postgres, got 'sqlite'" },
      { "deferred = { fsync = 'sometimes' }",
        "'deferred.fsync' must be one of always, batch, never, got 'sometimes'" },
    }
    for _, c in ipairs(cases) do
      local err, path = load_error("return { development = { " .. c[1] .. " } }")
      assert.are.equal("config: " .. c[2] .. " in " .. path, err)
    end
    local cfg = config.load((app([[
      return { development = { log = { level = "debug", format = "json" },
                               pubsub = { adapter = "redis" },
                               deferred = { backend = "postgres", fsync = "batch" } } }
    ]])))
    assert.are.same({ "debug", "json", "redis", "postgres", "batch" },
                    { cfg.log.level, cfg.log.format, cfg.pubsub.adapter,
                      cfg.deferred.backend, cfg.deferred.fsync })
  end)

  it("checks the overrides too, naming the command-line flags as their source", function()
    local dir = app("return {}")
    local ok, err = pcall(config.load, dir, "development", { port = 70000 })
    assert.is_false(ok)
    assert.are.equal("config: 'port' must be an integer from 0 to 65535, got 70000 "
                     .. "in command-line flags", err)
    ok, err = pcall(config.load, dir, "development", { worker = 2 })
    assert.are.equal("config: unknown key 'worker' in command-line flags (did you mean 'workers'?)", err)
  end)
end)

describe("config.validate", function()
  it("returns true for any valid subset of the settings", function()
    assert.is_true(config.validate({}, "x"))
    assert.is_true(config.validate({ http = {}, port = 1 }, "x"))
  end)

  it("reports the first problem in sorted key order, the same one every time", function()
    local t = { zeta = 1, alpha = 1, http = { max_body_bytes = "x" } }
    assert.are.equal("config: unknown key 'alpha' in apps/x/config/app.lua", validate_error(t))
    assert.are.equal("config: unknown key 'alpha' in apps/x/config/app.lua", validate_error(t))
  end)

  it("rejects settings that are not a table", function()
    assert.are.equal("config: settings must be a table, got string in apps/x/config/app.lua",
                     validate_error("port=3000"))
  end)
end)
