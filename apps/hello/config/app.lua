-- apps/hello: the benchmark app (../shared/bench/README.md gives the endpoint contract).
return {
  development = {},
  test = {},
  -- Benchmarks run with --env production: no access log, as the nginx peer (access_log off).
  -- 20,000 connections: bench/http.sh holds 10,000 idle ones at once.
  production = { log = { access = false }, http = { max_connections = 20000 } },
  -- bench/sse.sh: streams fed through Redis by another process (PUBSUB_URL).
  bench_redis = { log = { access = false }, http = { max_connections = 20000 }, reload = false,
                  pubsub = { adapter = "redis", url = os.getenv("PUBSUB_URL") } },
}
