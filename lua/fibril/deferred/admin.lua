--- fibril.deferred.admin: operations on an app's dead deferred tasks for `fibril deferred
--- APP`: list them, queue them again. Works without a running server: the journal backend
--- reads dead.log and drops retries into inbox/ (the server in slot 1 takes them within a
--- second, or the next boot does); the postgres backend updates the queue table.
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

return M
