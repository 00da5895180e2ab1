-- Settings per environment (docs/configuration.md). The queue's own settings come from the
-- environment: see lib/queue.lua and README.md.
return {
  development = { port = 3000 },
  test = { port = 3001, log = { access = false } },
  production = { port = 3000 },
}
