--- fibril.backoff: the reconnect delay every client uses (the Redis pool and subscriber, the
--- pub/sub stream reader, the workers' relay): 50 ms doubling with each failure up to a
--- ceiling (5 s by default), times a random 0.5..1 so that many clients that lost one server
--- do not all come back at the same instant.
local min, random = math.min, math.random

local M = {}

M.MIN, M.MAX = 0.05, 5

--- Seconds to wait after the failures-th failure in a row (failures >= 1).
---@param failures integer
---@param max number|nil the ceiling (default M.MAX)
---@return number
function M.delay(failures, max)
  return min(M.MIN * 2 ^ (failures - 1), max or M.MAX) * (0.5 + random() * 0.5)
end

return M
