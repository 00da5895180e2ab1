--- fibril.channel: a bounded FIFO between fibers (Go-style). send suspends while the buffer is
--- full, receive while it is empty; capacity 0 makes every send wait for a receiver.
local waitq = require "fibril.waitq"
local core = require "fibril.core.fiber"

local type, error, setmetatable = type, error, setmetatable

local Channel = {}
Channel.__index = Channel

local M = {}

local function timeout_of(opts, who)
  if opts == nil then return nil end
  if type(opts) ~= "table" then error(who .. ": options must be a table ({ timeout = s })", 3) end
  local t = opts.timeout
  if t ~= nil and (type(t) ~= "number" or not (t >= 0)) then
    error(who .. ": timeout must be a non-negative number of seconds", 3)
  end
  return t
end

--- Creates a channel.
---@param capacity integer|nil buffered values (default 0: unbuffered)
---@return table channel with send, receive, close, iter
function M.new(capacity)
  capacity = capacity or 0
  if type(capacity) ~= "number" or capacity < 0 or capacity % 1 ~= 0 then
    error("fibril.channel: capacity must be a non-negative integer", 2)
  end
  return setmetatable({ capacity = capacity, head = 1, tail = 0, recvq = waitq.new(),
                        sendq = waitq.new(), closed = false }, Channel)
end

---@return integer values waiting in the buffer
function Channel:count() return self.tail - self.head + 1 end

local function push(self, v)
  self.tail = self.tail + 1
  self[self.tail] = v
end

local function pop(self)
  local h = self.head
  local v = self[h]
  self[h] = nil
  self.head = h + 1
  return v
end

--- Sends a value, suspending while the buffer is full (or, unbuffered, until a receiver
--- takes it). Raises when the channel is closed (also while waiting), on timeout and on cancel.
---@param value any not nil
---@param opts table|nil { timeout = s }
function Channel:send(value, opts)
  local timeout = timeout_of(opts, "channel:send")
  if value == nil then error("channel:send: cannot send nil (nil marks a closed channel)", 2) end
  if self.closed then error("channel:send: channel is closed", 2) end
  if self.recvq:take(value) then return end
  if self:count() < self.capacity then
    push(self, value)
    return
  end
  local ok, err = self.sendq:wait(timeout, "channel:send", { value = value })
  if not ok then error(err, 0) end
end

--- Receives the next value, suspending while there is none.
---@param opts table|nil { timeout = s }
---@return any the value, or nil once the channel is closed and drained
function Channel:receive(opts)
  local timeout = timeout_of(opts, "channel:receive")
  if self:count() > 0 then
    local v = pop(self)
    local sender = self.sendq:take(true)     -- room now: let one waiting sender in
    if sender then push(self, sender.value) end
    return v
  end
  local sender = self.sendq:take(true)       -- unbuffered: take straight from a sender
  if sender then return sender.value end
  if self.closed then return nil end
  return (self.recvq:wait(timeout, "channel:receive"))
end

--- Closes the channel: waiting receivers get nil, waiting and later senders raise. Values
--- already buffered can still be received.
function Channel:close()
  if self.closed then return end
  self.closed = true
  self.recvq:take_all(nil)
  self.sendq:take_all(false, core.error("closed", "channel:send: channel is closed"))
end

--- Iterates over received values until the channel is closed and drained.
---@usage for v in ch:iter() do ... end
function Channel:iter(opts)
  return function() return self:receive(opts) end
end

return M
