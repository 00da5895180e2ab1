--- fibril.pubsub.redis: the adapter across processes and machines, on a Redis Stream rather
--- than PUBLISH, because PUBLISH drops what is sent while a subscriber reconnects.
---   publish    XADD <stream> MINID ~ <now - retention> * c <channel> m <message>
---   subscribe  one reader fiber per process follows the stream with XREAD BLOCK from the last
---              id it saw and hands each entry to this process's handlers of its channel.
--- After a lost connection the reader reconnects with backoff and resumes from that id, so it
--- skips nothing that is still in the stream (entries older than `retention` are trimmed) and
--- delivers each entry once. Every process reads every entry of the stream: one stream key
--- (`pubsub.stream`, default "fibril:pubsub") is one broadcast domain.
local redis = require "fibril.redis"
local deliver_to = require "fibril.pubsub.deliver"
local fcore = require "fibril.core.fiber"
local log = require "fibril.log"
local backoff = require "fibril.backoff"

local setmetatable, tostring, type, pcall, remove, next, floor =
      setmetatable, tostring, type, pcall, table.remove, next, math.floor
local TAP = {}                   -- the channels key under which taps keep the reader running
local spawn, sleep, set_context, walltime = fcore.spawn, fcore.sleep, fcore.set_context,
      fcore.walltime

local M = {}
local Adapter = {}
local AdapterMT = { __index = Adapter }
local Sub = {}
local SubMT = { __index = Sub }

local BLOCK_MS = 5000            -- XREAD BLOCK: short enough to notice a silent server
local BATCH = 512                -- entries per XREAD

---@param url string the Redis server
---@param cfg table|nil { retention = 300 (seconds kept in the stream), stream = key,
---   timeout =, connect_timeout = }
function M.new(url, cfg)
  cfg = cfg or {}
  local copts = { timeout = cfg.timeout, connect_timeout = cfg.connect_timeout }
  return setmetatable({
    url = url, copts = copts, stream = cfg.stream or "fibril:pubsub",
    retention_ms = floor((cfg.retention or 300) * 1000),
    pool = redis.pool(url, { size = cfg.pool or 4, timeout = cfg.timeout,
                             connect_timeout = cfg.connect_timeout }),
    channels = {}, reader = nil, conn = nil, last_id = nil, closed = false,
  }, AdapterMT)
end

--- Appends message to the stream; returns nil (the number of receivers is not known) and
--- the entry's id.
function Adapter:publish(channel, message)
  local minid = floor(walltime() * 1000) - self.retention_ms
  return nil, self.pool:call("XADD", self.stream, "MINID", "~", minid > 0 and minid or 0, "*",
                             "c", channel, "m", message)
end

local function deliver(self, channel, message, id)
  local taps = self.channels[TAP]
  if taps then
    for i = 1, #taps do taps[i].fn(message, channel, id) end
  end
  local list = self.channels[channel]
  if list then deliver_to(list, "pubsub handler failed", { channel = channel }, message, channel, id) end
end

-- Hands one XREAD reply's entries to the handlers and advances last_id.
local function handle_entries(self, reply)
  for _, stream in ipairs(reply) do
    for _, entry in ipairs(stream[2] or {}) do
      local id, fields = entry[1], entry[2]
      self.last_id = id
      local channel, message
      for i = 1, #fields - 1, 2 do
        local k = fields[i]
        if k == "c" then channel = fields[i + 1] elseif k == "m" then message = fields[i + 1] end
      end
      if channel and message then deliver(self, channel, message, id) end
    end
  end
end

local function connect_reader(self)
  local c = redis.connect(self.url, self.copts)
  if not self.last_id then       -- first start: from the newest entry, or the beginning
    local last = c:call("XREVRANGE", self.stream, "+", "-", "COUNT", 1)
    self.last_id = last[1] and last[1][1] or "0-0"
  end
  return c
end

local function idle(self) return self.closed or next(self.channels) == nil end

-- The reading fiber: XREAD BLOCK in a loop until no subscription is left; reconnects with
-- backoff and resumes from last_id when the connection fails.
local function read_loop(self, c)
  set_context(nil)
  local failures = 0
  while not idle(self) do
    if not c then
      local ok, conn_or_err = pcall(connect_reader, self)
      if ok then
        c = conn_or_err
        self.conn = c
        if failures > 0 then
          log.info("pubsub reader reconnected", { stream = self.stream, from = self.last_id })
        end
        failures = 0
      else
        failures = failures + 1
        if failures == 1 or failures % 10 == 0 then
          log.warn("pubsub reader cannot reconnect", { stream = self.stream, attempts = failures,
                   err = tostring(type(conn_or_err) == "table" and conn_or_err.message
                                  or conn_or_err) })
        end
        sleep(backoff.delay(failures))
      end
    else
      local ok, reply = pcall(c.call, c, "XREAD", "COUNT", BATCH, "BLOCK", BLOCK_MS, "STREAMS",
                              self.stream, self.last_id)
      if ok then
        if reply then handle_entries(self, reply) end
      else
        c:close()
        c, self.conn = nil, nil
        if not idle(self) then
          log.warn("pubsub reader lost its connection", { stream = self.stream,
                   err = tostring(type(reply) == "table" and reply.message or reply) })
        end
      end
    end
  end
  if c then c:close() end
  self.conn, self.reader, self.last_id = nil, nil, nil   -- a later subscribe starts from then
end

--- Calls fn(message, channel, id) for every entry of the stream, whatever its channel; keeps
--- the reader running (the replay buffer records this way).
function Adapter:tap(fn) return self:subscribe(TAP, fn, { raw = true }) end

function Adapter:subscribe(channel, fn, opts)
  if self.closed then error("pubsub: the adapter is closed", 3) end
  local list = self.channels[channel]
  if not list then list = {}; self.channels[channel] = list end
  local sub = setmetatable({ adapter = self, channel = channel, fn = fn, active = true,
                             raw = opts ~= nil and opts.raw == true }, SubMT)
  list[#list + 1] = sub
  if not self.reader then
    -- The first subscriber connects in its own fiber: an unreachable server is its error,
    -- and from the id read here on, nothing published after subscribe returns is missed.
    local ok, c = pcall(connect_reader, self)
    if not ok then
      sub:unsubscribe()
      error(c, 0)
    end
    self.conn = c
    self.reader = spawn(read_loop, self, c)
  end
  return sub
end

function Sub:unsubscribe()
  if not self.active then return end
  self.active = false
  local a = self.adapter
  local list = a.channels[self.channel]
  if not list then return end
  for i = #list, 1, -1 do
    if list[i] == self then remove(list, i) end
  end
  if #list == 0 then a.channels[self.channel] = nil end
  if idle(a) and a.conn then     -- wake the reader out of XREAD so it can end
    a.conn:close()
  end
end

function Adapter:close()
  if self.closed then return end
  self.closed = true
  for _, list in pairs(self.channels) do
    for _, sub in ipairs(list) do sub.active = false end
  end
  self.channels = {}
  if self.conn then self.conn:close() end
  self.pool:close()
end

return M
