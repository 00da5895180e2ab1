local Controller = require "fibril.controller"
local queue = require "queue"

local Jobs = Controller:extend()

-- POST /jobs {"id": ..., "payload": ...}: queues one job (RPUSH).
function Jobs:create()
  local id = self.params.id or tostring(os.time()) .. "-" .. math.random(1e9)
  local length = queue.conn():rpush(queue.KEY, queue.job(id, self.params.payload))
  self:render{ json = { queued = id, length = length }, status = 202 }
end

-- GET /stats: jobs waiting and jobs delivered so far.
function Jobs:stats()
  local conn = queue.conn()
  self:render{ json = { waiting = conn:llen(queue.KEY), delivered = conn:llen(queue.DELIVERED) } }
end

return Jobs
