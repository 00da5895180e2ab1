--- fibril.redis.subscriber: one dedicated connection carrying any number of SUBSCRIBE and
--- PSUBSCRIBE subscriptions, read by one fiber that calls the handlers, each call a unit of
--- work. When the connection drops, that fiber reconnects with backoff (AUTH and SELECT come
--- again from the URL) and subscribes to everything again. Messages published while it was
--- away are lost: that is Redis pub/sub (fibril.pubsub's redis adapter uses a stream instead).
local conn = require "fibril.redis.conn"
local deliver = require "fibril.pubsub.deliver"
local fcore = require "fibril.core.fiber"
local log = require "fibril.log"
local waitq = require "fibril.waitq"
local backoff = require "fibril.backoff"

local type, error, setmetatable, pcall, tostring, pairs, next =
      type, error, setmetatable, pcall, tostring, pairs, next
local spawn, sleep, set_context, new_error = fcore.spawn, fcore.sleep, fcore.set_context,
      fcore.error

local M = {}
local Subscriber = {}
local SubscriberMT = { __index = Subscriber }
local Subscription = {}
local SubscriptionMT = { __index = Subscription }


---@param url string
---@param copts table|nil options for redis.connect
function M.new(url, copts)
  return setmetatable({
    url = url, copts = copts or {}, where = conn.where_of(url),
    subs = { subscribe = {}, psubscribe = {} },   -- kind -> name -> { confirmed, waiters, list }
    conn = nil, closed = false,
  }, SubscriberMT)
end

local function empty(self)
  return next(self.subs.subscribe) == nil and next(self.subs.psubscribe) == nil
end

local function run_handlers(entry, message, channel, pattern)
  deliver(entry.list, "redis subscription handler failed",
          { channel = channel, pattern = pattern }, message, channel, pattern)
end

local function confirm(self, kind, name)
  local entry = self.subs[kind][name]
  if not entry then return end
  entry.confirmed = true
  entry.waiters:take_all()
end

-- Sends every subscription again on a new connection (they all wait for confirmation).
local function resubscribe(self, c)
  for kind, map in pairs(self.subs) do
    local names = {}
    for name, entry in pairs(map) do
      entry.confirmed = false
      names[#names + 1] = name
    end
    if #names > 0 then c:send_subscription(kind, unpack(names)) end
  end
end

-- Connects again until it works or the subscriber is closed or emptied, with backoff.
local function reconnect(self)
  local failures = 0
  while not self.closed and not empty(self) do
    local ok, c = pcall(conn.connect, self.url, self.copts)
    if ok then
      local sent, err = pcall(resubscribe, self, c)
      if sent then
        log.info("redis subscriber reconnected", { server = self.where })
        return c
      end
      c:close()
      c = err
    end
    failures = failures + 1
    local delay = backoff.delay(failures)
    if failures == 1 or failures % 10 == 0 then
      log.warn("redis subscriber cannot reconnect", { server = self.where, attempts = failures,
               err = tostring(type(c) == "table" and c.message or c) })
    end
    sleep(delay)
  end
end

-- The reading fiber: dispatches messages, confirms subscriptions, reconnects. It ends when the
-- subscriber is closed or has no subscription left (and its connection was closed).
local function read_loop(self, c)
  set_context(nil)               -- not part of the unit that subscribed first
  while true do
    local ok, kind, a, b, d = pcall(c.next_message, c)
    if self.conn ~= c then return end          -- replaced or closed meanwhile
    if not ok then
      if self.closed or empty(self) then self.conn = nil; c:close(); return end
      log.warn("redis subscriber lost its connection", { server = self.where,
               err = tostring(type(kind) == "table" and kind.message or kind) })
      c:close()
      c = reconnect(self)
      self.conn = c
      if not c then return end
    elseif kind == "message" then
      local entry = self.subs.subscribe[a]
      if entry then run_handlers(entry, b, a) end
    elseif kind == "pmessage" then
      local entry = self.subs.psubscribe[d]
      if entry then run_handlers(entry, b, a, d) end
    elseif kind == "subscribe" or kind == "psubscribe" then
      confirm(self, kind, a)
    elseif kind == "dropped" then
      log.warn("redis subscriber fell behind: messages dropped", { server = self.where, count = b })
    end
  end
end

local function add(self, kind, name, fn)
  if self.closed then error(new_error("closed", "redis: the subscriber is closed"), 3) end
  if type(name) ~= "string" or name == "" then
    error("redis: " .. kind .. " expects a non-empty channel name", 3)
  end
  if type(fn) ~= "function" then error("redis: " .. kind .. " expects a handler function", 3) end
  local sub = setmetatable({ _s = self, kind = kind, name = name, fn = fn, active = true },
                           SubscriptionMT)
  local map = self.subs[kind]
  local entry = map[name]
  if entry then
    entry.list[#entry.list + 1] = sub
  else
    entry = { confirmed = false, waiters = waitq.new(), list = { sub } }
    map[name] = entry
    local ok, err = pcall(function()
      if not self.conn then
        self.conn = conn.connect(self.url, self.copts)
        spawn(read_loop, self, self.conn)
      end
      self.conn:send_subscription(kind, name)
    end)
    if not ok and self.conn then ok = true end  -- sent again by the reconnect under way
    if not ok then
      map[name] = nil
      error(err, 0)
    end
  end
  if not entry.confirmed then
    local timeout = self.copts.timeout
    if timeout == nil then timeout = conn.TIMEOUT elseif timeout == false then timeout = nil end
    local ok, err = pcall(entry.waiters.wait, entry.waiters, timeout, "redis " .. kind)
    if not ok then
      sub:unsubscribe()
      if type(err) == "table" and err.code == "timeout" then
        err = new_error("timeout", "redis: " .. kind .. " " .. name .. " not confirmed by "
                        .. self.where .. " within " .. tostring(timeout) .. " s")
      end
      error(err, 0)
    end
  end
  return sub
end

--- Calls fn(message, channel) for each message on channel; returns once the server
--- confirmed the subscription.
---@return table subscription with :unsubscribe()
function Subscriber:subscribe(channel, fn) return add(self, "subscribe", channel, fn) end

--- Calls fn(message, channel, pattern) for each message on a channel matching pattern.
---@return table subscription with :unsubscribe()
function Subscriber:psubscribe(pattern, fn) return add(self, "psubscribe", pattern, fn) end

--- Stops this handler (idempotent). The last handler of a channel unsubscribes it on the
--- server; the last subscription of all closes the connection, so a script can end.
function Subscription:unsubscribe()
  if not self.active then return end
  self.active = false
  local s = self._s
  local map = s.subs[self.kind]
  local entry = map[self.name]
  if not entry then return end
  local list = entry.list
  for i = #list, 1, -1 do
    if list[i] == self then table.remove(list, i) end
  end
  if #list > 0 then return end
  map[self.name] = nil
  entry.waiters:take_all()
  local c = s.conn
  if not c then return end
  if empty(s) then
    s.conn = nil
    c:close()
  else
    pcall(c.send_subscription, c, self.kind == "subscribe" and "unsubscribe" or "punsubscribe",
          self.name)
  end
end

--- Closes the connection and drops every subscription (idempotent).
function Subscriber:close()
  if self.closed then return end
  self.closed = true
  for _, map in pairs(self.subs) do
    for name, entry in pairs(map) do
      for _, sub in pairs(entry.list) do sub.active = false end
      entry.waiters:take_all()
      map[name] = nil
    end
  end
  local c = self.conn
  self.conn = nil
  if c then c:close() end
end

--- Number of channels and patterns subscribed.
function Subscriber:count()
  local n = 0
  for _, map in pairs(self.subs) do
    for _ in pairs(map) do n = n + 1 end
  end
  return n
end

return M
