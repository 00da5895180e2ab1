-- Long polling for clients that cannot hold a stream: GET /poll suspends only this request's
-- fiber until the next message on the channel (or answers at once with what the replay buffer
-- holds after `after`), and 204 after the timeout; the client asks again with the last id.
local Controller = require "fibril.controller"
local pubsub = require "fibril.pubsub"

local C = Controller:extend()

function C:poll()
  local timeout = math.min(tonumber(self.params.timeout) or 25, 60)
  local messages = pubsub.next("chat", { after = self.params.after, timeout = timeout })
  if not messages then return self:head(204) end
  self:render{ json = { messages = messages } }
end

function C:say()
  local body = self.request.body or ""
  if body == "" or #body > 4096 then
    return self:render{ status = 400, text = "a message is 1 to 4096 bytes\n" }
  end
  local _, id = pubsub.publish("chat", body)
  self:render{ json = { id = id } }
end

return C
