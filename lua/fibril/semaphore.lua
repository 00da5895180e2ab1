--- fibril.semaphore: at most n holders at once; the others wait in FIFO order.
local waitq = require "fibril.waitq"

local type, error, pcall = type, error, pcall

local Semaphore = {}
Semaphore.__index = Semaphore

local M = {}

---@param n integer permits (at least 1)
function M.new(n)
  if type(n) ~= "number" or n < 1 or n % 1 ~= 0 then
    error("fibril.semaphore: permits must be a positive integer", 2)
  end
  return setmetatable({ permits = n, available = n, q = waitq.new() }, Semaphore)
end

--- Takes a permit, suspending until one is free. Raises on timeout and on cancel.
---@param opts table|nil { timeout = s }
function Semaphore:acquire(opts)
  local timeout = opts and opts.timeout
  if timeout ~= nil and (type(timeout) ~= "number" or not (timeout >= 0)) then
    error("semaphore:acquire: timeout must be a non-negative number of seconds", 2)
  end
  if self.available > 0 and self.q:empty() then
    self.available = self.available - 1
    return
  end
  self.q:wait(timeout, "semaphore:acquire")   -- woken holding the permit handed over
end

--- Returns a permit; a waiting fiber gets it directly.
function Semaphore:release()
  if self.q:take() then return end
  if self.available >= self.permits then
    error("semaphore:release: more releases than acquires", 2)
  end
  self.available = self.available + 1
end

local function finish(self, ok, ...)
  self:release()
  if not ok then error((...), 0) end
  return ...
end

--- Runs fn holding a permit, and releases it even when fn raises.
---@param fn function
---@param opts table|nil { timeout = s } for the acquire
---@return any ... fn's results
function Semaphore:with(fn, opts)
  self:acquire(opts)
  return finish(self, pcall(fn))
end

return M
