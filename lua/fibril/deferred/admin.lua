--- fibril.deferred.admin: operations on an app's deferred tasks for `fibril deferred APP`:
--- list the pending ones, list the dead ones, queue dead ones again. Works without a running
--- server: the journal backend reads the journals and dead.log and drops retries into inbox/
--- (the server in slot 1 takes them within a second, or the next boot does); the postgres
--- backend reads and updates the queue table.
local journal = require "fibril.deferred.journal"

local ipairs, tostring, format, concat, date, gsub, sub =
      ipairs, tostring, string.format, table.concat, os.date, string.gsub, string.sub

local M = {}

local function is_pg(app) return app.config.deferred.backend == "postgres" end

--- The dead tasks, oldest first: { id, kind, subscriber|task, attempt, error, dead_at }.
function M.dead(app)
  if is_pg(app) then return require("fibril.deferred.postgres").dead_tasks(app.config) end
  return journal.dead_tasks(journal.dir(app.dir, app.config.deferred))
end

--- The pending tasks (queued, waiting to retry, or claimed/running), due first:
--- { id, kind, subscriber|task, attempt, run_at, error, slot (journal) | claimed_by (postgres) }.
function M.pending(app)
  if is_pg(app) then return require("fibril.deferred.postgres").pending_tasks(app.config) end
  return journal.pending_tasks(journal.dir(app.dir, app.config.deferred))
end

--- Queues dead tasks again (ids, or all when nil); returns the ids queued.
function M.retry(app, ids)
  if is_pg(app) then return require("fibril.deferred.postgres").retry_dead(app.config, ids) end
  return journal.retry_dead(journal.dir(app.dir, app.config.deferred), ids)
end

local function first_line(s)
  s = tostring(s or "")
  s = s:match("^[^\n]*")
  if #s > 120 then s = sub(s, 1, 117) .. "..." end
  return s
end

--- The list as text, one task per line, tab-separated: id, what, attempts, when, error.
function M.format_list(list)
  if #list == 0 then return "no dead tasks\n" end
  local out = { "ID\tRUNS\tSUBSCRIBER/TASK\tDEAD AT\tERROR\n" }
  for _, t in ipairs(list) do
    local when = t.dead_at and date("!%Y-%m-%dT%H:%M:%SZ", math.floor(t.dead_at)) or "?"
    out[#out + 1] = format("%s\t%s\t%s\t%s\t%s\n", t.id, tostring(t.attempt or "?"),
                           tostring(t.subscriber or t.task), when,
                           (gsub(first_line(t.error), "\t", " ")))
  end
  return concat(out)
end

--- The pending list as text, tab-separated: id, attempts so far, what, when it runs (or
--- "now"), where it is (journal slot, inbox, or the claiming process), its last error.
function M.format_pending(list, now)
  if #list == 0 then return "no pending tasks\n" end
  now = now or require("fibril.core.fiber").walltime()
  local out = { "ID\tRUNS\tSUBSCRIBER/TASK\tRUN AT\tWHERE\tLAST ERROR\n" }
  for _, t in ipairs(list) do
    local at = tonumber(t.run_at)
    local when = (not at or at <= now) and "now" or date("!%Y-%m-%dT%H:%M:%SZ", math.floor(at))
    local where = t.claimed_by and ("claimed by " .. tostring(t.claimed_by))
                  or (t.slot == "inbox" and "inbox") or (t.slot and ("journal " .. t.slot)) or "queued"
    out[#out + 1] = format("%s\t%s\t%s\t%s\t%s\t%s\n", t.id, tostring(t.attempt or 0),
                           tostring(t.subscriber or t.task), when, where,
                           (gsub(first_line(t.error), "\t", " ")))
  end
  return concat(out)
end

return M
