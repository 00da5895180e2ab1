local Controller = require "fibril.controller"
local events = require "fibril.events"
local OrderPlaced = require "events.order_placed"
local C = Controller:extend()
function C:create()
  local id = tonumber(self.params.id)
  local ev = OrderPlaced{ order_id = id, total = id * 100 }
  events.publish(ev)                   -- returns once UpdateLedger's task is on disk
  self:render{ json = { order = id, event = events.id(ev) } }
end
return C
