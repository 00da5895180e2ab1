--- fibril.pubsub.local: the in-process adapter. publish queues the message and returns; one
--- dispatching fiber (running while there is work) delivers messages in publish order, each
--- handler call a unit of work, so a slow or failing handler never runs inside the publisher.
--- With --workers N the master relays every message to the other workers (pubsub/relay.lua).
local fcore = require "fibril.core.fiber"
local deliver = require "fibril.pubsub.deliver"

local setmetatable, tonumber, remove = setmetatable, tonumber, table.remove
local spawn, set_context = fcore.spawn, fcore.set_context

local M = {}
local Local = {}
local LocalMT = { __index = Local }
local Sub = {}
local SubMT = { __index = Sub }

local enqueue

-- In a worker of `--workers N` (the master gave FIBRIL_RELAY_PORT): messages are relayed
-- through the master to the other workers (fibril.pubsub.relay), and ids carry the worker.
function M.new()
  local self = setmetatable({ channels = {}, queue = {}, head = 1, tail = 0, running = false,
                              seq = 0, taps = {}, prefix = "" }, LocalMT)
  local port = tonumber(os.getenv("FIBRIL_RELAY_PORT") or "")
  if port then
    local worker = os.getenv("FIBRIL_WORKER") or "0"
    self.prefix = worker .. "-"
    self.link = require("fibril.pubsub.relay").link(port, worker, function(channel, id, message)
      enqueue(self, channel, id, message)
    end)
  end
  return self
end


local function dispatch(self)
  set_context(nil)               -- not part of the publisher's unit
  while self.head <= self.tail do
    local i = self.head
    local q = self.queue
    local channel, message, id = q[i], q[i + 1], q[i + 2]
    q[i], q[i + 1], q[i + 2] = nil, nil, nil
    self.head = i + 3
    local list = self.channels[channel]
    if list then deliver(list, "pubsub handler failed", { channel = channel }, message, channel, id) end
  end
  self.head, self.tail, self.running = 1, 0, false
end

--- Queues message for the handlers of channel; returns how many there are, and the
--- message's id (a decimal counter, increasing within the process).
-- Records message for the taps and queues it for the handlers of channel.
enqueue = function(self, channel, id, message)
  for i = 1, #self.taps do self.taps[i](message, channel, id) end
  if not self.channels[channel] then return 0 end
  local n = self.tail
  self.queue[n + 1], self.queue[n + 2], self.queue[n + 3] = channel, message, id
  self.tail = n + 3
  if not self.running then
    self.running = true
    spawn(dispatch, self)
  end
  return #self.channels[channel]
end

function Local:publish(channel, message)
  local seq = self.seq + 1
  self.seq = seq
  local id = self.prefix .. seq
  if self.link then self.link:send(channel, id, message) end
  return enqueue(self, channel, id, message), id
end

--- Calls fn(message, channel, id) for every message published, synchronously (the replay
--- buffer records this way).
function Local:tap(fn) self.taps[#self.taps + 1] = fn end

function Local:subscribe(channel, fn, opts)
  -- The first subscriber of a worker waits for the relay stream: from then on, what any
  -- worker publishes reaches it.
  if self.link and not self.link.connected then self.link:wait_ready(2) end
  local list = self.channels[channel]
  if not list then list = {}; self.channels[channel] = list end
  local sub = setmetatable({ adapter = self, channel = channel, fn = fn, active = true,
                             raw = opts ~= nil and opts.raw == true }, SubMT)
  list[#list + 1] = sub
  return sub
end

function Sub:unsubscribe()
  if not self.active then return end
  self.active = false
  local channels = self.adapter.channels
  local list = channels[self.channel]
  if not list then return end
  for i = #list, 1, -1 do
    if list[i] == self then remove(list, i) end
  end
  if #list == 0 then channels[self.channel] = nil end
end

function Local:close()
  for _, list in pairs(self.channels) do
    for _, sub in ipairs(list) do sub.active = false end
  end
  self.channels = {}
  self.taps = {}
  if self.link then self.link:close(); self.link = nil end
end

return M
