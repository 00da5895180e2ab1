-- Deferred: a durable task per order, retried with backoff. Idempotent by task id: a line
-- already in the ledger for this task is not written twice (delivery is at least once).
local Subscriber = require "fibril.subscriber"
local log = require "fibril.log"
local S = Subscriber:extend("UpdateLedger")
S:subscribe_to(require "events.order_placed", { deferred = true })
local function ledger_path() return (os.getenv("LEDGER_DIR") or "storage") .. "/ledger" end
function S:call(ev)
  if self.attempt == 1 and ev.order_id == 1 then error("ledger busy, try again") end
  if os.getenv("LEDGER_HOLD") then require("fibril").sleep(3600) end   -- run.sh's crash demo
  local f = io.open(ledger_path(), "r")
  local text = f and f:read("*a") or ""
  if f then f:close() end
  if text:find(self.task_id, 1, true) then return end
  f = assert(io.open(ledger_path(), "a"))
  f:write(("%s order=%d total=%d\n"):format(self.task_id, ev.order_id, ev.total))
  f:close()
  log.info("ledger updated", { order = ev.order_id, attempt = self.attempt })
end
return S
