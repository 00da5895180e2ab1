-- apps/hello: the benchmark app (../shared/bench/README.md gives the endpoint contract).
return {
  development = {},
  test = {},
  -- Benchmarks run with --env production: no access log, as the nginx peer (access_log off).
  production = { log = { access = false } },
}
