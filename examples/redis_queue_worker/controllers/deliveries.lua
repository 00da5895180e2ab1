local Controller = require "fibril.controller"
local queue = require "queue"
local walltime = require("fibril.core.fiber").walltime

local Deliveries = Controller:extend()

-- POST /deliver: stands for the service the jobs go to. Records the job's id and the time
-- it arrived, so the drain rate can be read back (README.md, the spec).
function Deliveries:create()
  queue.conn():rpush(queue.DELIVERED, ("%s %.3f"):format(tostring(self.params.id), walltime()))
  self:head(204)
end

return Deliveries
