-- examples/pg_notes.lua: fibril.pg in one script: the default pool (DATABASE_URL), parameters,
-- NULL, a transaction that rolls back, LISTEN/NOTIFY, and ten fibers querying at once.
-- Needs DATABASE_URL (scripts/with-services sets one); without it, it says so and exits 0.
--   scripts/with-services build/fibril examples/pg_notes.lua
local fibril = require "fibril"
local pg = require "fibril.pg"

if not pg.url() then
  print("pg_notes: DATABASE_URL is not set; skipping (try scripts/with-services build/fibril "
        .. "examples/pg_notes.lua)")
  return
end

pg:exec("create table if not exists example_notes (id serial primary key, body text, tag text)")
pg:exec("truncate example_notes")

-- Parameters travel apart from the SQL: this body is stored as it is, quote and all.
pg:exec("insert into example_notes (body, tag) values ($1, $2), ($3, $4)",
        "it's fine'); drop table example_notes; --", "odd", "plain note", nil)
for _, row in ipairs(pg:query("select id, body, tag from example_notes order by id")) do
  print(row.id, row.body, row.tag == pg.null and "(no tag)" or row.tag)
end

-- A transaction rolls back when its function raises; the error comes back out.
local ok, err = pcall(pg.transaction, pg, function(tx)
  tx:exec("insert into example_notes (body) values ($1)", "never stored")
  error("changed my mind")
end)
print("transaction:", ok, (tostring(err):match("changed my mind")))
assert(#pg:query("select 1 from example_notes where body = 'never stored'") == 0)

-- LISTEN/NOTIFY: the handler runs in a fiber of its own for each notification.
local heard = fibril.channel(1)
local sub = pg:listen("example_notes", function(payload) heard:send(payload) end)
pg:query("select pg_notify('example_notes', $1)", "hello from NOTIFY")
print("heard:", heard:receive({ timeout = 5 }))
sub.unlisten()

-- Ten fibers, each a query of 0.1 s: about 0.1 s in all, the pool opening 10 connections.
local t0 = fibril.now()
local fibers = {}
for i = 1, 10 do
  fibers[i] = fibril.schedule(function()
    return pg:query("select $1::int * 2 as v, pg_sleep(0.1)", i)[1].v
  end)
end
local doubled = fibril.await_all(fibers)
print(("10 queries of 0.1 s in %.2f s: %s"):format(fibril.now() - t0, table.concat(doubled, " ")))

pg:exec("drop table example_notes")
pg:close()
