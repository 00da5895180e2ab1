-- apps/hello: the benchmark app (../shared/bench/README.md gives the endpoint contract).
-- GET /sleep uses DATABASE_URL when it is set, through a pool of 20; without it the app boots
-- all the same and /sleep answers 503.
local database = { url = os.getenv("DATABASE_URL"), pool = 20 }
return {
  development = { database = database },
  test = { database = database },
  -- Benchmarks run with --env production: no access log, as the nginx peer (access_log off).
  -- 20,000 connections: bench/http.sh holds 10,000 idle ones at once.
  production = { log = { access = false }, http = { max_connections = 20000 }, database = database },
  -- bench/http_tail.sh: production with LuaJIT's own collector pace (no least growth; 200/200
  -- marks a heap within one growth already, so fibril.gc leaves it as it is), for comparison.
  bench_gc_luajit = { log = { access = false }, gc = { pause = 200, stepmul = 200, min_growth_bytes = 0 },
                      reload = false, database = database },
  -- bench/sse.sh: streams fed through Redis by another process (PUBSUB_URL).
  bench_redis = { log = { access = false }, http = { max_connections = 20000 }, reload = false,
                  pubsub = { adapter = "redis", url = os.getenv("PUBSUB_URL") } },
}
