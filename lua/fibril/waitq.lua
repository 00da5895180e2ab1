--- fibril.waitq: a FIFO of parked fibers, the building block of channels, semaphores and
--- conditions. An entry whose fiber timed out or was cancelled is marked dead and skipped.
local core = require "fibril.core.fiber"

local park, wake, current = core.park, core.wake, core.current
local pcall, error = pcall, error

local M = {}
M.__index = M

---@return table a new, empty wait queue
function M.new()
  return setmetatable({ first = 1, last = 0 }, M)
end

-- Drops dead entries at the head, so a queue that only ever times out stays small.
local function compact(self)
  local i = self.first
  while i <= self.last and self[i].dead do
    self[i] = nil
    i = i + 1
  end
  self.first = i
end

---@return boolean true when no live fiber waits
function M:empty()
  compact(self)
  for i = self.first, self.last do
    if not self[i].dead then return false end
  end
  return true
end

--- Parks the calling fiber at the end of the queue until another fiber takes it with
--- `take`, the timeout expires or the fiber is cancelled (both raise).
---@param timeout number|nil seconds; nil waits forever
---@param who string the API name used in error messages ("channel:receive")
---@param entry table|nil carries data for the waker (a sender's value)
---@return any ... the values the waker passed
function M:wait(timeout, who, entry)
  compact(self)
  entry = entry or {}
  entry.fiber = current()
  local last = self.last + 1
  self.last = last
  self[last] = entry
  -- park raises before suspending (not in a fiber, cancelled): the entry must not linger.
  local ok, woken, a, b = pcall(park, timeout, who)
  if not ok then
    entry.dead = true
    error(woken, 0)
  end
  if not woken then
    entry.dead = true
    error(a, 0)
  end
  return a, b
end

--- Pops the first live waiter and wakes it with the given values.
---@return table|nil the woken entry, nil when nobody could be woken
function M:take(...)
  for i = self.first, self.last do
    local e = self[i]
    self[i] = nil
    self.first = i + 1
    if not e.dead and e.fiber and wake(e.fiber, ...) then return e end
  end
  return nil
end

--- Wakes every live waiter with the given values.
---@return integer how many were woken
function M:take_all(...)
  local n = 0
  while self:take(...) do n = n + 1 end
  return n
end

return M
