--- fibril.cond: a condition variable for fibers: wait until another fiber signals.
local waitq = require "fibril.waitq"

local type, error = type, error

local Cond = {}
Cond.__index = Cond

local M = {}

function M.new()
  return setmetatable({ q = waitq.new() }, Cond)
end

--- Suspends until signal/broadcast. Raises on timeout and on cancel.
---@param opts table|number|nil { timeout = s } or the timeout itself
---@return any the value given to signal/broadcast
function Cond:wait(opts)
  local timeout = opts
  if type(opts) == "table" then timeout = opts.timeout end
  if timeout ~= nil and (type(timeout) ~= "number" or not (timeout >= 0)) then
    error("cond:wait: timeout must be a non-negative number of seconds", 2)
  end
  return (self.q:wait(timeout, "cond:wait"))
end

--- Wakes the longest-waiting fiber. ---@return boolean whether one was waiting
function Cond:signal(value)
  return self.q:take(value) ~= nil
end

--- Wakes every waiting fiber. ---@return integer how many
function Cond:broadcast(value)
  return self.q:take_all(value)
end

return M
