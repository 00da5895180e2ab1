-- GET /sleep: one `select pg_sleep(0.1)` through the default pool (bench/pg.sh, spec/pg_spec.lua:
-- 100 requests, 20 at a time, take about 5 x 0.1 s with a pool of 20, not 100 x 0.1 s).
-- Without a database configured the app still boots; this action then answers 503.
local Controller = require "fibril.controller"
local pg = require "fibril.pg"

local C = Controller:extend()

function C:sleep()
  if not pg.url() then
    return self:render{ text = "no database configured (set DATABASE_URL)\n", status = 503 }
  end
  pg:query("select pg_sleep(0.1)")
  self:render{ text = "slept 0.1 s\n", content_type = "text/plain" }
end

return C
