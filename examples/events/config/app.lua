-- LEDGER_DIR: where the ledger file and the journal go (run.sh makes a temporary one).
local dir = os.getenv("LEDGER_DIR") or "storage"
local deferred = { path = dir .. "/deferred", backoff_min = 0.1, backoff_max = 1, retries = 3 }
return {
  development = { deferred = deferred },
  test = { log = { access = false }, deferred = deferred },
  production = { deferred = deferred },
}
