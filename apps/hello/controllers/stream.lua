-- GET /sse?interval=MS&count=N exactly as ../shared/bench/README.md gives it: event n is due at
-- start + (n-1)*MS (no drift), `id: n` and `data: {"n":n,"t":<epoch ms when sent>}`; it stops
-- after N events when N > 0, else runs until the client leaves.
local Controller = require "fibril.controller"
local sse = require "fibril.sse"
local fibril = require "fibril"
local walltime = require("fibril.core.fiber").walltime

local C = Controller:extend()

function C:sse()
  local interval = (tonumber(self.params.interval) or 1000) / 1000
  local count = math.floor(tonumber(self.params.count) or 0)
  if not (interval > 0) then interval = 1 end
  self:render{ sse = sse.stream(function(stream)
    local start, n = fibril.now(), 0
    while count <= 0 or n < count do
      n = n + 1
      local due = start + (n - 1) * interval
      local wait = due - fibril.now()
      if wait > 0 then fibril.sleep(wait) end
      local frame = ("id: %d\ndata: {\"n\":%d,\"t\":%d}\n\n"):format(n, n, math.floor(walltime() * 1000))
      if not stream:send_frame(frame) then return end
    end
  end) }
end

-- GET /channel/NAME: the stream of a broadcast channel (bench/sse.sh's redis-adapter run).
function C:channel()
  self:render{ sse = sse.stream(self.params.name) }
end

return C
