--- fibril.pubsub.replay: the last N messages of each channel, in memory, for a reader that
--- comes back with the id of the last message it saw (SSE's Last-Event-ID, long polling's
--- `after`). Bounded twice: N entries per channel (a ring), and at most max_channels channels
--- (the channel written first is forgotten first).
local setmetatable = setmetatable

local M = {}
local Replay = {}
local ReplayMT = { __index = Replay }

---@param size integer entries kept per channel (>= 1)
---@param max_channels integer|nil channels kept (default 10000)
function M.new(size, max_channels)
  return setmetatable({ size = size, max_channels = max_channels or 10000, rings = {},
                        order = {}, first = 1, last = 0, count = 0 }, ReplayMT)
end

--- Records one message of channel under its id.
function Replay:add(channel, id, message)
  local ring = self.rings[channel]
  if not ring then
    if self.count >= self.max_channels then     -- forget the oldest channel
      local order = self.order
      while self.first <= self.last do
        local old = order[self.first]
        order[self.first] = nil
        self.first = self.first + 1
        if self.rings[old] then
          self.rings[old] = nil
          self.count = self.count - 1
          break
        end
      end
    end
    ring = { head = 0, n = 0 }
    self.rings[channel] = ring
    self.count = self.count + 1
    self.last = self.last + 1
    self.order[self.last] = channel
  end
  local size = self.size
  local head = ring.head % size + 1
  ring.head = head
  ring[head] = { id = id, message = message }
  if ring.n < size then ring.n = ring.n + 1 end
end

--- The entries of channel after the one whose id is after_id (key(entry) == after_id when a
--- key function is given), oldest first. An id the buffer no longer holds (or never held)
--- gives every entry it has; no id gives none.
---@return table list of { id =, message = }
function Replay:after(channel, after_id, key)
  local ring = self.rings[channel]
  local out = {}
  if not ring or after_id == nil then return out end
  local size, n = self.size, ring.n
  local start = (ring.head - n) % size          -- the oldest entry is at start + 1
  local from = 1
  for k = n, 1, -1 do                           -- newest first: the id is usually recent
    local e = ring[(start + k - 1) % size + 1]
    if (key and key(e) or e.id) == after_id then from = k + 1; break end
  end
  for k = from, n do out[#out + 1] = ring[(start + k - 1) % size + 1] end
  return out
end

return M
