-- spec/pg_spec.lua: fibril.pg against the real PostgreSQL 15 that scripts/with-services starts
-- (DATABASE_URL); FIBRIL_PG_CTL restarts it and FIBRIL_PG_DATA gets a pg_hba.conf line for a
-- role that must give a password. Nothing here is mocked.
local fibril = require "fibril"
local pg = require "fibril.pg"
local executor = require "fibril.executor"
local process = require "fibril.process"
local support = require "spec.support"

local url = support.service_env("DATABASE_URL")
local user, host, port, dbname = url:match("^postgresql://([^@]+)@([^:]+):(%d+)/(.+)$")

local function live()
  local conns, requests = pg.live()
  return conns .. "/" .. requests
end

-- Waits (polling, no fixed sleep) until fn() is true; returns its last value.
local eventually = support.eventually

local function utf8len(s)
  local _, n = s:gsub("[^\128-\191]", "")
  return n
end

local baseline

describe("fibril.pg", function()
  setup(function()
    assert.is_string(url, "DATABASE_URL is not set: run the specs through scripts/with-services")
    pg.configure({ url = url, pool = 10 })
    baseline = support.settled(live, "0/0")
    pg:exec("drop table if exists pg_spec_items")
    pg:exec([[create table pg_spec_items (
      id serial primary key, name text unique, qty int2, n int4, big int8, price numeric,
      ratio float8, ok bool, data bytea, doc jsonb, j json, tags text[], nums int4[],
      at timestamptz, day date)]])
  end)

  teardown(function()
    pcall(pg.exec, pg, "drop table if exists pg_spec_items")
    pg:close()
  end)

  describe("connections", function()
    it("connects from a URL and from a keyword string, and says where", function()
      local a = pg.connect(url)
      assert.are.equal(host .. ":" .. port, a:where())
      assert.are.equal(1, a:query("select 1 as one")[1].one)
      local b = pg.connect(("host=%s port=%s user=%s dbname=%s"):format(host, port, user, dbname))
      assert.are.equal(dbname, b:query("select current_database() as db")[1].db)
      assert.are_not.equal(a:pid(), b:pid())
      a:close(); b:close()
      a:close()                                   -- idempotent
      local ok, err = pcall(a.query, a, "select 1")
      assert.is_false(ok)
      assert.matches("connection is closed", tostring(err))
    end)

    it("fails with a clear error when nothing listens", function()
      local res = process.reserve_port("127.0.0.1", 0)   -- bound, not listening: refused
      local p = res:port()
      local ok, err = pcall(pg.connect, ("postgresql://%s@127.0.0.1:%d/x"):format(user, p))
      res:close()
      assert.is_false(ok)
      assert.are.equal("connect_failed", err.code)
      assert.matches('pg: connection to server at "127.0.0.1", port ' .. p .. " failed: Connection refused",
                     err.message, 1, true)
    end)

    it("times out a connect to a server that never answers, within connect_timeout", function()
      local child = io.popen("python3 -c 'import socket,time,sys; s=socket.socket(); "
        .. "s.bind((\"127.0.0.1\",0)); s.listen(); print(s.getsockname()[1]); sys.stdout.flush(); "
        .. "time.sleep(5)'")
      local p = tonumber(child:read("*l"))
      local t0 = fibril.now()
      local ok, err = pcall(pg.connect, ("postgresql://%s@127.0.0.1:%d/x"):format(user, p),
                            { connect_timeout = 0.3 })
      local took = fibril.now() - t0
      child:close()
      assert.is_false(ok)
      assert.are.equal("timeout", err.code)
      assert.matches("pg: connect timed out after 0.3 s (127.0.0.1:" .. p .. ")", err.message, 1, true)
      assert.is_true(took < 3, "took " .. took)
    end)

    it("rejects a wrong password with code auth", function()
      local data = support.service_env("FIBRIL_PG_DATA")
      pg:exec("drop role if exists spec_pw")
      pg:exec("create role spec_pw login password 'right-one'")
      local hba = data .. "/pg_hba.conf"
      local f = assert(io.open(hba))
      local old = f:read("*a")
      f:close()
      if not old:find("spec_pw", 1, true) then
        f = assert(io.open(hba, "w"))
        f:write("host all spec_pw 127.0.0.1/32 scram-sha-256\n", old)
        f:close()
        pg:query("select pg_reload_conf()")
        fibril.sleep(0.2)
      end
      local base = ("127.0.0.1:%s/%s"):format(port, dbname)
      local ok, err = pcall(pg.connect, "postgresql://spec_pw:wrong@" .. base)
      assert.is_false(ok)
      assert.are.equal("auth", err.code)
      assert.matches('password authentication failed for user "spec_pw"', err.message, 1, true)
      local conn = pg.connect("postgresql://spec_pw:right-one@" .. base)
      assert.are.equal("spec_pw", conn:query("select current_user as u")[1].u)
      conn:close()
    end)
  end)

  describe("queries and types", function()
    it("round-trips every supported type through parameters", function()
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local blob = table.concat(bytes) .. "\0\0"
      local rows = pg:query([[insert into pg_spec_items
        (name, qty, n, big, price, ratio, ok, data, doc, j, tags, nums, at, day)
        values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) returning *]],
        "types", 7, -2147483648, "9007199254740993", "12345678901234567890.123", 0.1, true, blob,
        { a = { 1, 2 }, b = "x" }, pg.json({ 1, "two" }), { "a b", 'q"uote', "back\\slash", pg.null },
        { 1, 2, 3 }, "2026-11-25 10:04:05.12+00", "2026-11-25")
      local r = rows[1]
      assert.are.equal("types", r.name)
      assert.are.equal(7, r.qty)
      assert.are.equal(-2147483648, r.n)
      assert.are.equal("9007199254740993", r.big)          -- past 2^53: a string, every digit
      assert.are.equal("12345678901234567890.123", r.price) -- numeric: a string
      assert.are.equal(0.1, r.ratio)
      assert.is_true(r.ok)
      assert.are.equal(blob, r.data)
      assert.are.same({ a = { 1, 2 }, b = "x" }, r.doc)
      assert.are.same({ 1, "two" }, r.j)
      assert.are.same({ "a b", 'q"uote', "back\\slash", pg.null }, r.tags)
      assert.are.same({ 1, 2, 3 }, r.nums)
      assert.are.equal("2026-11-25 10:04:05.12+00", r.at)
      assert.are.equal("2026-11-25", r.day)
      local small = pg:query("select $1::int8 as a, $2::int8 as b, 'NaN'::float8 as nan, "
                             .. "'-Infinity'::float8 as ninf", 9007199254740992, -42)[1]
      assert.are.equal(9007199254740992, small.a)         -- within 2^53: a number
      assert.are.equal(-42, small.b)
      assert.is_true(small.nan ~= small.nan)
      assert.are.equal(-math.huge, small.ninf)
    end)

    it("converts arrays of every simple type, nested ones too", function()
      local r = pg:query([[select $1::float8[] as f, $2::bool[] as b, $3::bytea[] as by,
        $4::jsonb[] as j, $5::int[][] as nested, '{}'::int[] as empty, $6::int8[] as big,
        '[0:1]={7,8}'::int[] as bounded, array['2026-11-25'::date] as days]],
        { 1.5, -2, pg.null }, { true, false }, { "\\x00ff" }, { '{"a":1}', "[2]" },
        { { 1, 2 }, { 3, 4 } }, { 1, "9007199254740993" })[1]
      assert.are.same({ 1.5, -2, pg.null }, r.f)
      assert.are.same({ true, false }, r.b)
      assert.are.same({ "\0\255" }, r.by)
      assert.are.same({ { a = 1 }, { 2 } }, r.j)
      assert.are.same({ { 1, 2 }, { 3, 4 } }, r.nested)
      assert.are.same({}, r.empty)
      assert.are.same({ 1, "9007199254740993" }, r.big)
      assert.are.same({ 7, 8 }, r.bounded)
      assert.are.same({ "2026-11-25" }, r.days)
    end)

    it("gives NULL as pg.null, so a row keeps every key, for nil and pg.null parameters", function()
      local r = pg:query("select $1::text as a, $2::int as b, null::jsonb as c, 1 as d", nil, pg.null)[1]
      assert.are.equal(pg.null, r.a)
      assert.are.equal(pg.null, r.b)
      assert.are.equal(pg.null, r.c)
      assert.are.equal(1, r.d)
      local keys = 0
      for _ in pairs(r) do keys = keys + 1 end
      assert.are.equal(4, keys)
      assert.are.equal(require("fibril.json").null, pg.null)
    end)

    it("keeps unicode text intact", function()
      local s = "héllo wörld ✓ 日本語 🎉 \u{10FFFF}"
      assert.are.equal(s, pg:query("select $1::text as s", s)[1].s)
      assert.are.equal(utf8len(s), pg:query("select length($1::text) as n", s)[1].n)
    end)

    it("stores SQL injection attempts through parameters verbatim", function()
      local evil = { "'; drop table pg_spec_items; --", "\\'; select 1; --", "$1", "' or '1'='1",
                     "robert'); DROP TABLE students;--" }
      for i, s in ipairs(evil) do
        pg:exec("insert into pg_spec_items (name) values ($1)", "inj" .. i .. s)
      end
      for i, s in ipairs(evil) do
        local rows = pg:query("select name from pg_spec_items where name = $1", "inj" .. i .. s)
        assert.are.equal(1, #rows)
        assert.are.equal("inj" .. i .. s, rows[1].name)
      end
      assert.are.equal(1, #pg:query("select 1 from pg_spec_items where name = 'types'"))
    end)

    it("returns the affected row count from exec, and rows from query", function()
      pg:exec("insert into pg_spec_items (name, n) values ($1, 1), ($2, 1), ($3, 1)", "e1", "e2", "e3")
      assert.are.equal(3, pg:exec("update pg_spec_items set n = n + 1 where name like 'e_'"))
      assert.are.equal(0, pg:exec("update pg_spec_items set n = 0 where false"))
      local rows, affected, status = pg:query("delete from pg_spec_items where name like 'e_' returning name")
      assert.are.equal(3, #rows)
      assert.are.equal(3, affected)
      assert.are.equal("DELETE 3", status)
      assert.are.same({}, pg:query("select 1 where false"))
    end)

    it("raises errors carrying SQLSTATE, message, detail, position and the app line", function()
      local ok, err = pcall(pg.query, pg, "select * from pg_spec_nosuch")
      assert.is_false(ok)
      assert.are.equal("pg_error", err.code)
      assert.are.equal("42P01", err.sqlstate)
      assert.are.equal(15, err.position)
      assert.matches('^pg: relation "pg_spec_nosuch" does not exist %(query at spec/pg_spec.lua:%d+%)$',
                     err.message)
      pg:exec("insert into pg_spec_items (name) values ('dup')")
      local ok2, err2 = pcall(pg.exec, pg, "insert into pg_spec_items (name) values ($1)", "dup")
      assert.is_false(ok2)
      assert.are.equal("23505", err2.sqlstate)
      assert.are.equal("Key (name)=(dup) already exists.", err2.detail)
      assert.are.equal("pg_spec_items_name_key", err2.constraint)
      assert.are.equal("pg_spec_items", err2.table)
      assert.are.equal("ERROR", err2.severity)
      assert.matches("duplicate key value", err2.message)
      local ok3, err3 = pcall(pg.query, pg, "select 1 frm x")   -- "frm" is taken as an alias
      assert.is_false(ok3)
      assert.are.equal("42601", err3.sqlstate)
      assert.are.equal(14, err3.position)
      assert.are.equal(1, pg:query("select 1 as x")[1].x)     -- the pool goes on
    end)

    it("rejects several statements in one query, and COPY, with clear errors", function()
      local ok, err = pcall(pg.query, pg, "select 1; select 2")
      assert.is_false(ok)
      assert.matches("cannot insert multiple commands into a prepared statement", err.message)
      local conn = pg.connect(url)
      local ok2, err2 = pcall(conn.query, conn, "copy pg_spec_items (name) from stdin")
      assert.is_false(ok2)
      assert.are.equal("unsupported", err2.code)
      assert.matches("COPY is not supported", err2.message)
      assert.are.equal(1, conn:query("select 1 as x")[1].x)     -- COPY FROM: still usable
      local ok3, err3 = pcall(conn.query, conn, "copy pg_spec_items to stdout")
      assert.is_false(ok3)
      assert.are.equal("unsupported", err3.code)
      assert.is_true(conn:is_closed())                         -- COPY TO: dropped
      conn:close()
    end)

    it("prepares repeated SQL on each connection, once", function()
      local conn = pg.connect(url)
      local sql = "select $1::int + 1 as v"
      for i = 1, 5 do assert.are.equal(i + 1, conn:query(sql, i)[1].v) end
      local prepared = conn:query("select name, statement from pg_prepared_statements")
      assert.are.equal(1, #prepared)
      assert.are.equal(sql, prepared[1].statement)
      local plain = pg.connect(url, { prepare = false })
      for i = 1, 3 do plain:query(sql, i) end
      assert.are.equal(0, #plain:query("select 1 from pg_prepared_statements"))
      conn:close(); plain:close()
    end)

    it("re-prepares a cached statement whose result type an ALTER TABLE changed", function()
      local conn = pg.connect(url)
      conn:exec("create temp table pg_spec_alter (a int)")
      conn:exec("insert into pg_spec_alter values (1)")
      for _ = 1, 3 do assert.are.same({ { a = 1 } }, conn:query("select * from pg_spec_alter")) end
      conn:exec("alter table pg_spec_alter add column b text default 'x'")
      assert.are.same({ { a = 1, b = "x" } }, conn:query("select * from pg_spec_alter"))
      assert.are.same({ { a = 1, b = "x" } }, conn:query("select * from pg_spec_alter"))
      assert.are.equal(1, #conn:query("select 1 from pg_prepared_statements"))
      local by_a = "select a from pg_spec_alter where a = $1"
      for _ = 1, 3 do assert.are.same({ { a = 1 } }, conn:query(by_a, 1)) end
      conn:exec("deallocate all")                   -- the server forgets every statement
      assert.are.same({ { a = 1 } }, conn:query(by_a, 1))
      assert.are.same({ { a = 1 } }, conn:query(by_a, 1))
      conn:close()
    end)

    it("bounds the bytes of a result and closes the connection past the bound", function()
      local conn = pg.connect(url, { max_result_bytes = 4096 })
      assert.are.equal(10, #conn:query("select repeat('x', 100) from generate_series(1, 10)"))
      local ok, err = pcall(conn.query, conn, "select repeat('x', 100) from generate_series(1, 1000)")
      assert.is_false(ok)
      assert.are.equal("limit", err.code)
      assert.matches("result exceeds max_result_bytes %(4096%)", err.message)
      assert.is_true(conn:is_closed())
      conn:close()
    end)

    it("refuses a second query on a busy connection, naming the fix", function()
      local conn = pg.connect(url)
      local f = fibril.schedule(function() return conn:query("select pg_sleep(0.2)") end)
      fibril.sleep(0.05)
      local ok, err = pcall(conn.query, conn, "select 1")
      assert.is_false(ok)
      assert.matches("connection is busy %(one query at a time per connection: use a pool", err)
      fibril.await(f)
      conn:close()
    end)
  end)

  describe("batches (pipeline mode)", function()
    it("sends statements in one round trip and returns rows and counts in order", function()
      local results, counts = pg:batch(function(b)
        b:query("select $1::int as a, $2::text as t", 1, "one")
        b:query("insert into pg_spec_items (name) values ($1), ($2)", "batch-1", "batch-2")
        b:query("select name from pg_spec_items where name like 'batch-%' order by name")
        b:query("select '{1,NULL}'::int[] as arr, '{\"k\":true}'::jsonb as j, null::text as n")
      end)
      assert.are.equal(4, #results)
      assert.are.same({ { a = 1, t = "one" } }, results[1])
      assert.are.same({}, results[2])
      assert.are.equal(2, counts[2])
      assert.are.same({ { name = "batch-1" }, { name = "batch-2" } }, results[3])
      assert.are.same({ 1, pg.null }, results[4][1].arr)
      assert.is_true(results[4][1].j.k)
      assert.are.equal(pg.null, results[4][1].n)
      assert.are.same({}, pg:batch(function() end))
    end)

    it("keeps none of a batch's changes when a statement fails, and raises the first error", function()
      local ok, err = pcall(pg.batch, pg, function(b)
        b:query("insert into pg_spec_items (name) values ('batch-gone')")
        b:query("select * from pg_spec_nosuch")
        b:query("insert into pg_spec_items (name) values ('batch-gone-2')")
      end)
      assert.is_false(ok)
      assert.are.equal("42P01", err.sqlstate)
      assert.matches('^pg: relation "pg_spec_nosuch" does not exist %(query at spec/pg_spec.lua:%d+%)$', err.message)
      assert.are.equal(0, #pg:query("select 1 from pg_spec_items where name like 'batch-gone%'"))
      assert.are.equal(1, pg:query("select 1 as x")[1].x)
    end)

    it("prepares repeated SQL inside batches, and runs in a transaction", function()
      local conn = pg.connect(url)
      for i = 1, 3 do
        local r = conn:batch(function(b)
          b:query("select $1::int * 2 as v", i)
          b:query("select $1::int * 2 as v", i + 1)
        end)
        assert.are.equal(i * 2, r[1][1].v)
        assert.are.equal((i + 1) * 2, r[2][1].v)
      end
      assert.are.equal(1, #conn:query("select 1 from pg_prepared_statements"))
      local ok = pcall(conn.transaction, conn, function(tx)
        tx:batch(function(b) b:query("insert into pg_spec_items (name) values ('batch-tx')") end)
        error("undo")
      end)
      assert.is_false(ok)
      assert.are.equal(0, #conn:query("select 1 from pg_spec_items where name = 'batch-tx'"))
      conn:close()
    end)
  end)

  describe("transactions", function()
    it("commits, and rolls back on error, re-raising it", function()
      local pid_in
      local r = pg:transaction(function(tx)
        tx:exec("insert into pg_spec_items (name) values ('tx-commit')")
        pid_in = tx:query("select pg_backend_pid() as p")[1].p
        assert.are.equal(pid_in, pg:query("select pg_backend_pid() as p")[1].p)  -- pinned
        return "done", 2
      end)
      assert.are.equal("done", r)
      assert.are.equal(1, #pg:query("select 1 from pg_spec_items where name = 'tx-commit'"))
      local ok, err = pcall(pg.transaction, pg, function(tx)
        tx:exec("insert into pg_spec_items (name) values ('tx-rollback')")
        error({ mine = true })
      end)
      assert.is_false(ok)
      assert.is_true(err.mine)
      assert.are.equal(0, #pg:query("select 1 from pg_spec_items where name = 'tx-rollback'"))
    end)

    it("nests with savepoints", function()
      pg:transaction(function(tx)
        tx:exec("insert into pg_spec_items (name) values ('sp-outer')")
        local ok = pcall(tx.transaction, tx, function(inner)
          inner:exec("insert into pg_spec_items (name) values ('sp-inner-1')")
          error("inner fails")
        end)
        assert.is_false(ok)
        tx:transaction(function(inner)
          inner:exec("insert into pg_spec_items (name) values ('sp-inner-2')")
          pg:transaction(function(deeper)      -- the module's own call nests as well
            deeper:exec("insert into pg_spec_items (name) values ('sp-inner-3')")
          end)
        end)
      end)
      local rows = pg:query("select name from pg_spec_items where name like 'sp-%' order by name")
      assert.are.same({ { name = "sp-inner-2" }, { name = "sp-inner-3" }, { name = "sp-outer" } }, rows)
    end)

    it("raises at COMMIT when a statement failed inside and the function went on", function()
      local ok, err = pcall(pg.transaction, pg, function(tx)
        tx:exec("insert into pg_spec_items (name) values ('tx-swallowed')")
        pcall(tx.query, tx, "select * from pg_spec_nosuch")
      end)
      assert.is_false(ok)
      assert.are.equal("rolled_back", err.code)
      assert.are.equal(0, #pg:query("select 1 from pg_spec_items where name = 'tx-swallowed'"))
    end)

    it("keeps the connection to the fiber: another fiber cannot use the tx", function()
      pg:transaction(function(tx)
        local ok, err = fibril.await(fibril.schedule(function() return pcall(tx.query, tx, "select 1") end))
        assert.is_false(ok)
        assert.matches("pinned to the fiber that began it", err)
      end)
    end)
  end)

  describe("the pool", function()
    it("shares a pool of 10 among 500 fibers, never one connection in two fibers at once", function()
      local pool = pg.pool{ url = url, size = 10, checkout_timeout = 30 }
      local busy, pids, overlaps, max_open = {}, {}, 0, 0
      local fibers = {}
      for i = 1, 500 do
        fibers[i] = fibril.schedule(function()
          pool:transaction(function(tx)
            local pid = tx:query("select pg_backend_pid() as p")[1].p
            if busy[pid] then overlaps = overlaps + 1 end
            busy[pid] = true
            pids[pid] = true
            tx:query("select $1::int as i", i)
            fibril.sleep(0)
            busy[pid] = nil
          end)
          local open = pool:stats().open
          if open > max_open then max_open = open end
          return pool:query("select $1::int as i", i)[1].i
        end)
      end
      local results = fibril.await_all(fibers)
      for i = 1, 500 do assert.are.equal(i, results[i]) end
      assert.are.equal(0, overlaps)
      local n = 0
      for _ in pairs(pids) do n = n + 1 end
      assert.is_true(n <= 10, n .. " connections")
      assert.is_true(max_open <= 10)
      pool:close()
    end)

    it("makes a fiber wait for a connection, then raises checkout_timeout", function()
      local pool = pg.pool(url, { size = 2, checkout_timeout = 0.5 })
      local holders, go = {}, false
      for i = 1, 2 do
        holders[i] = fibril.schedule(function()
          pool:transaction(function(tx)
            tx:query("select 1")
            while not go do fibril.sleep(0.01) end
          end)
        end)
      end
      fibril.sleep(0.1)
      assert.are.equal(2, pool:stats().open)
      local ok, err = pcall(pool.query, pool, "select 1")
      assert.is_false(ok)
      assert.are.equal("checkout_timeout", err.code)
      assert.matches("no connection free in the pool within 0.5 s %(pool of 2", err.message)
      local waiter = fibril.schedule(function() return pool:query("select 7 as x")[1].x end)
      fibril.sleep(0.02)
      go = true
      fibril.await_all(holders)
      assert.are.equal(7, fibril.await(waiter))      -- a waiter gets the first one given back
      assert.are.equal(2, pool:stats().open)
      pool:close()
    end)

    it("runs 40 pg_sleep(0.2) at once through a pool of 40, not one after another", function()
      local pool = pg.pool{ url = url, size = 40 }
      local fibers = {}
      for i = 1, 40 do fibers[i] = fibril.schedule(function() return pool:query("select pg_sleep(0.2)") end) end
      fibril.await_all(fibers)        -- the connections are open now: time the second round
      local t0 = fibril.now()
      for i = 1, 40 do fibers[i] = fibril.schedule(function() return pool:query("select pg_sleep(0.2)") end) end
      fibril.await_all(fibers)
      local took = fibril.now() - t0
      assert.is_true(took < 2, ("40 x pg_sleep(0.2) took %.2f s (serial: 8 s)"):format(took))
      pool:close()
    end)

    it("gives a pinned connection back when the unit of work ends, even when it raised", function()
      local pool = pg.pool{ url = url, size = 1, checkout_timeout = 1 }
      local pid
      local ok = pcall(executor.wrap, function()
        local conn = pool:pin()
        pid = conn:pid()
        pool:exec("set application_name = 'pinned'")
        assert.are.equal("pinned", pool:query("show application_name")[1].application_name)
        error("the unit fails")
      end)
      assert.is_false(ok)
      assert.are.equal(1, pool:stats().idle)
      assert.are.equal(pid, pool:query("select pg_backend_pid() as p")[1].p)
      pool:close()
    end)

    it("cancels a cancelled fiber's query on the server and reuses the connection", function()
      local pool = pg.pool{ url = url, size = 1, checkout_timeout = 5 }
      local pid = pool:query("select pg_backend_pid() as p")[1].p
      local f = fibril.schedule(function() return pool:query("select pg_sleep(30)") end)
      eventually(function()
        return #pg:query("select 1 from pg_stat_activity where pid = $1 and query like $2", pid,
                         "select pg_sleep(30)%") == 1
      end)
      fibril.cancel(f)
      local ok, err = pcall(fibril.await, f)
      assert.is_false(ok)
      assert.are.equal("cancelled", err.code)
      local t0 = fibril.now()
      assert.are.equal(pid, pool:query("select pg_backend_pid() as p")[1].p)   -- same connection
      assert.is_true(fibril.now() - t0 < 5)
      assert.are.equal(0, #pg:query("select 1 from pg_stat_activity where query like 'select pg_sleep(30)%' "
                                    .. "and state = 'active'"))
      pool:close()
    end)

    it("cancels a cancelled fiber's batch on the server and reuses the connection", function()
      local pool = pg.pool{ url = url, size = 1, checkout_timeout = 5 }
      local pid = pool:query("select pg_backend_pid() as p")[1].p
      local f = fibril.schedule(function()
        return pool:batch(function(b)
          b:query("select 1")
          b:query("select pg_sleep(30)")
          b:query("select 2")
        end)
      end)
      eventually(function()
        return #pg:query("select 1 from pg_stat_activity where pid = $1 and query like $2", pid,
                         "select pg_sleep(30)%") == 1
      end)
      fibril.cancel(f)
      local ok, err = pcall(fibril.await, f)
      assert.is_false(ok)
      assert.are.equal("cancelled", err.code)
      assert.are.equal(pid, pool:query("select pg_backend_pid() as p")[1].p)   -- drained, reused
      local results = pool:batch(function(b) b:query("select 3 as x") end)
      assert.are.equal(3, results[1][1].x)
      pool:close()
    end)

    it("fails the fibers waiting for a connection when the pool closes", function()
      local pool = pg.pool{ url = url, size = 1, checkout_timeout = 5 }
      local holder = fibril.schedule(function()
        pool:transaction(function(tx) tx:query("select pg_sleep(0.2)") end)
      end)
      fibril.sleep(0.05)
      local waiter = fibril.schedule(function() return pcall(pool.query, pool, "select 1") end)
      fibril.sleep(0.02)
      pool:close()
      local ok, err = fibril.await(waiter)
      assert.is_false(ok)
      assert.are.equal("closed", err.code)
      fibril.await(holder)
      assert.are.equal(0, pool:stats().open)                -- given back after close: closed
    end)

    it("fails a statement over statement_timeout with SQLSTATE 57014 and goes on", function()
      local pool = pg.pool{ url = url, size = 1, statement_timeout = 0.2 }
      local ok, err = pcall(pool.query, pool, "select pg_sleep(3)")
      assert.is_false(ok)
      assert.are.equal("57014", err.sqlstate)
      assert.matches("canceling statement due to statement timeout", err.message)
      assert.are.equal(1, pool:query("select 1 as x")[1].x)
      assert.are.equal(1, pool:stats().open)
      pool:close()
    end)

    it("times out a query on the client, cancels it on the server, keeps the connection", function()
      local conn = pg.connect(url, { timeout = 0.2 })
      local ok, err = pcall(conn.query, conn, "select pg_sleep(30)")
      assert.is_false(ok)
      assert.are.equal("timeout", err.code)
      assert.matches("pg: query timed out after 0.2 s %(127.0.0.1:%d+%); it was cancelled on the server",
                     err.message)
      assert.is_true(conn:wait_idle(5))
      assert.are.equal(1, conn:query("select 1 as x")[1].x)
      conn:close()
    end)

    it("discards a connection broken mid-query and opens a new one", function()
      local pool = pg.pool{ url = url, size = 1 }
      local pid = pool:query("select pg_backend_pid() as p")[1].p
      local f = fibril.schedule(function() return pcall(pool.query, pool, "select pg_sleep(30)") end)
      eventually(function()
        return #pg:query("select 1 from pg_stat_activity where pid = $1 and state = 'active'", pid) == 1
      end)
      pg:query("select pg_terminate_backend($1)", pid)
      local ok, err = fibril.await(f)
      assert.is_false(ok)
      assert.truthy(err.code == "connection_lost" or err.sqlstate == "57P01", tostring(err))
      assert.matches("terminating connection due to administrator command", err.message)
      local pid2 = pool:query("select pg_backend_pid() as p")[1].p
      assert.are_not.equal(pid, pid2)
      pool:close()
    end)
  end)

  describe("LISTEN/NOTIFY", function()
    it("delivers payloads to handlers as units of work, and re-listens after a reconnect", function()
      local pool = pg.pool{ url = url, size = 2 }
      local got, in_unit = {}, nil
      local sub = pool:listen("pg spec \"chan\"", function(payload, channel)
        in_unit = executor.active()
        got[#got + 1] = channel .. "=" .. payload
      end)
      pool:query("select pg_notify($1, $2)", "pg spec \"chan\"", "one")
      pool:exec("notify other, 'ignored'")
      assert.truthy(eventually(function() return #got == 1 end))
      assert.are.same({ 'pg spec "chan"=one' }, got)
      assert.is_true(in_unit)
      -- Kill the listening connection: the listener reconnects and LISTENs again.
      local lpid = pool._listener._conn:pid()
      pool:query("select pg_terminate_backend($1)", lpid)
      assert.truthy(eventually(function()
        local c = pool._listener._conn
        return c and not c:is_closed() and c:pid() ~= lpid and pool._listener._connected
      end))
      pool:query("select pg_notify($1, $2)", "pg spec \"chan\"", "two")
      assert.truthy(eventually(function() return #got == 2 end))
      assert.are.equal('pg spec "chan"=two', got[2])
      -- A handler that raises is logged; the others, and later notifications, go on.
      pool:listen("pg spec \"chan\"", function() error("handler fails") end)
      pool:query("select pg_notify($1, $2)", "pg spec \"chan\"", "after-error")
      assert.truthy(eventually(function() return #got == 3 end))
      assert.are.equal('pg spec "chan"=after-error', got[3])
      pool:unlisten("pg spec \"chan\"")                 -- every handler of the channel
      pool:query("select pg_notify($1, $2)", "pg spec \"chan\"", "three")
      fibril.sleep(0.1)
      assert.are.equal(3, #got)
      sub.unlisten()                                     -- already gone: a no-op
      pool:close()
    end)
  end)

  describe("faults", function()
    it("survives a server restart mid-load: in-flight queries fail clearly, then succeed", function()
      local ctl = support.service_env("FIBRIL_PG_CTL")
      local pool = pg.pool{ url = url, size = 5, checkout_timeout = 10 }
      local stop, ok_count, errors = false, 0, {}
      local workers = {}
      for w = 1, 5 do
        workers[w] = fibril.schedule(function()
          while not stop do
            local ok, err = pcall(pool.query, pool, "select pg_sleep(0.05), $1::int as w", w)
            if ok then ok_count = ok_count + 1 else errors[#errors + 1] = err fibril.sleep(0.05) end
          end
        end)
      end
      eventually(function() return ok_count > 10 end)
      local restart = process.spawn{ "/bin/sh", args = { "-c", ctl .. " -m fast -w restart >/dev/null 2>&1" } }
      assert.are.equal(0, restart:wait(60))
      restart:close()
      local after = ok_count
      assert.truthy(eventually(function() return ok_count > after + 10 end, 20))
      stop = true
      fibril.await_all(workers)
      assert.is_true(#errors > 0, "the restart went unnoticed")
      for _, err in ipairs(errors) do
        local msg = tostring(err.message)
        assert.truthy(err.code == "connection_lost" or err.code == "connect_failed"
                      or (err.sqlstate or ""):match("^57P"), msg)
        assert.matches("^pg: ", msg)
      end
      assert.are.equal(1, pool:query("select 1 as x")[1].x)
      pool:close()
      assert.are.equal(1, pg:query("select 1 as x")[1].x)     -- the default pool recovers too
    end)
  end)

  describe("apps/hello GET /sleep", function()
    it("serves 100 requests 20 at a time in about 5 x 0.1 s with a pool of 20", function()
      local app = support.start_app("apps/hello", "--env production")
      local t0 = fibril.now()
      local clients = {}
      for c = 1, 20 do
        clients[c] = fibril.schedule(function()
          local sock = support.connect(app.port)
          for _ = 1, 5 do
            sock:write("GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n")
            local res = support.read_response(sock)
            assert.are.equal(200, res.status)
          end
          sock:close()
        end)
      end
      fibril.await_all(clients)
      local took = fibril.now() - t0
      app.stop()
      app.wait_exit(10)
      -- The first round opens the 20 connections; serial would be 10 s.
      assert.is_true(took < 3, ("100 requests took %.2f s"):format(took))
    end)
  end)

  describe("apps/hello without a database", function()
    it("boots, serves /hello, and answers /sleep with 503", function()
      local saved = support.fibril
      support.fibril = "env -u DATABASE_URL " .. saved      -- env execs fibril: same pid
      local ok, app = pcall(support.start_app, "apps/hello", "--env production")
      support.fibril = saved
      assert(ok, app)
      local res = support.raw(app.port, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.are.equal(200, res.status)
      local res2 = support.raw(app.port, "GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n")
      assert.are.equal(503, res2.status)
      assert.matches("no database configured", res2.body)
      app.stop()
      app.wait_exit(10)
    end)
  end)

  it("leaves no connection, poll handle or operation behind", function()
    pg:close()
    assert.are.equal(baseline, support.settled(live, baseline))
  end)
end)
