--- fibril.pg: PostgreSQL for fibers (libpq's asynchronous API on the loop). The module is
--- itself the app's default pool, configured from config/app.lua's `database` section (or
--- DATABASE_URL): `pg:query(sql, ...)`, `pg:exec`, `pg:transaction`, `pg:listen`.
--- `pg.connect(url)` gives one connection, `pg.pool{...}` another pool. docs/postgres.md.
local core = require "fibril.core.pg"
local fcore = require "fibril.core.fiber"
local types = require "fibril.pg.types"
local Conn = require "fibril.pg.conn"
local Pool = require "fibril.pg.pool"

local type, error, getenv = type, error, os.getenv

local M = {}

--- SQL NULL in rows and parameters: a NULL lightuserdata, the same value as fibril.json.null,
--- so a row keeps every key and encodes to JSON with null.
M.null = types.null
--- Marks a value to be sent as JSON text: pg:query("insert ... values ($1)", pg.json(t)).
M.json = types.json
--- Default bound on the bytes of one result's rows (64 MiB).
M.MAX_RESULT_BYTES = core.MAX_RESULT_BYTES

--- Opens one connection (raises on failure). It runs one query at a time: share a pool
--- between fibers, not a connection.
---@param url string "postgresql://user:password@host:port/db?sslmode=..." or "host=... dbname=..."
---@param opts table|nil { connect_timeout = 5, statement_timeout = s, timeout = s,
---   max_result_bytes = n, prepare = true }
---@return table conn with :query, :exec, :transaction, :close, :pid, :state
function M.connect(url, opts)
  if opts ~= nil and type(opts) ~= "table" then error("pg.connect: opts must be a table", 2) end
  return Conn.open(url, opts)
end

--- Creates a pool: pg.pool{ url = ..., size = 10, checkout_timeout = 5, statement_timeout = 30 }
--- or pg.pool(url, { size = 10, ... }).
---@return table pool with :query, :exec, :transaction, :listen, :pin, :stats, :close
function M.pool(url, opts)
  if type(url) == "string" then
    local o = {}
    for k, v in pairs(opts or {}) do o[k] = v end
    o.url = url
    return Pool.new(o)
  end
  return Pool.new(url)
end

-- ---- the default pool ----------------------------------------------------------------

local settings, default

--- Sets the default pool's settings (the server calls this with the app's `database`
--- section); the current default pool, if any, is closed and made again on next use.
---@param db table|nil { url, pool, checkout_timeout, statement_timeout, max_result_bytes }
function M.configure(db)
  settings = db
  if default then
    default:close()
    default = nil
  end
end

--- The URL the default pool uses: database.url, else DATABASE_URL; nil when neither is set.
---@return string|nil
function M.url()
  local url = settings and settings.url or getenv("DATABASE_URL")
  if url == "" then return nil end
  return url
end

--- The default pool, made on first use.
---@return table pool
function M.default()
  if default then return default end
  local url = M.url()
  if not url then
    error(fcore.error("not_configured", "pg: no database configured: set database.url in "
                      .. "config/app.lua, or DATABASE_URL"), 0)
  end
  local s = settings or {}
  default = Pool.new{ url = url, size = s.pool, checkout_timeout = s.checkout_timeout,
                      statement_timeout = s.statement_timeout, connect_timeout = s.connect_timeout,
                      max_result_bytes = s.max_result_bytes }
  return default
end

-- pg:query(...) and the rest on the module run on the default pool.
for _, name in ipairs({ "query", "exec", "batch", "transaction", "listen", "unlisten", "pin", "unpin",
                        "checkout", "release", "stats" }) do
  M[name] = function(self, ...)
    if self ~= M then error("pg: use pg:" .. name .. "(...), with a colon", 2) end
    local pool = M.default()
    return pool[name](pool, ...)
  end
end

--- Closes the default pool (idle connections now, the others as they come back).
function M.close(self)
  if self ~= M then error("pg: use pg:close()", 2) end
  M.configure(settings)
end

--- Connection structs plus poll handles, and operations in flight (queries, connects,
--- cancel requests): both return to their baseline when nothing leaks.
---@return integer conns, integer requests
M.live = core.live

return M
