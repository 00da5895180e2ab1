--- fibril.pubsub: publish/subscribe between parts of an app, and across processes and
--- machines, through an adapter: `local` (in-process, the default) or `redis` (a Redis Stream:
--- a subscriber that reconnects loses nothing). config/app.lua picks it:
---   pubsub = { adapter = "redis", url = os.getenv("REDIS_URL"), retention = 300 }
--- A channel is a string or a list ({ "timeline", 7 } is the channel "timeline:7"); a message
--- is a string. Handlers get fn(message, channel), each call a unit of work. docs/pubsub.md.
local type, error, tostring, concat, getenv, pcall = type, error, tostring, table.concat,
      os.getenv, pcall

local M = {}

local adapter                    -- the process's adapter, made at first use
local replay                     -- its replay buffer (fibril.pubsub.replay), when one is kept

--- The canonical name of a channel: a string as it is, a list joined with ":".
---@param channel string|table
---@return string
function M.channel(channel)
  local t = type(channel)
  if t == "string" then
    if channel == "" then error("pubsub: a channel name cannot be empty", 3) end
    return channel
  end
  if t ~= "table" or #channel == 0 then
    error("pubsub: a channel is a string or a non-empty list, got " .. t, 3)
  end
  local parts = {}
  for i = 1, #channel do
    local v = channel[i]
    local tv = type(v)
    if tv ~= "string" and tv ~= "number" then
      error("pubsub: channel part " .. i .. " must be a string or a number, got " .. tv, 3)
    end
    parts[i] = tostring(v)
  end
  return concat(parts, ":")
end

--- Makes the adapter from settings ({ adapter = "local" | "redis", url =, retention = }).
---@param cfg table|nil
---@return table adapter
function M.new_adapter(cfg)
  cfg = cfg or {}
  local name = cfg.adapter or "local"
  if name == "local" then return require("fibril.pubsub.local").new(cfg) end
  if name == "redis" then
    local app = require("fibril.config").current()
    local url = cfg.url or (app and app.redis and app.redis.url) or getenv("REDIS_URL")
                or require("fibril.redis").DEFAULT_URL
    return require("fibril.pubsub.redis").new(url, cfg)
  end
  error("pubsub: unknown adapter '" .. tostring(name) .. "' (local or redis)", 2)
end

-- Keeps the last n messages of every channel the adapter carries (n = 0: none).
local function keep_replay(a, n)
  replay = nil
  if not n or n <= 0 then return end
  local r = require("fibril.pubsub.replay").new(n)
  a:tap(function(message, channel, id) r:add(channel, id, message) end)
  replay = r
end

--- The adapter in use: set by use(), else made from the app's `pubsub` settings (and its
--- replay buffer from `sse.replay`).
---@return table adapter
function M.adapter()
  if not adapter then
    local app = require("fibril.config").current()
    adapter = M.new_adapter(app and app.pubsub)
    keep_replay(adapter, app and app.sse and app.sse.replay)
  end
  return adapter
end

--- Replaces the adapter (closing the one in use): an adapter object, or settings for one
--- (`{ adapter = "redis", url = ..., replay = n }`: replay keeps the last n messages of each
--- channel for `next` and SSE's Last-Event-ID).
---@param a table|nil nil goes back to the app's settings at next use
function M.use(a)
  if adapter and adapter ~= a then adapter:close() end
  replay = nil
  if a ~= nil and type(a.publish) ~= "function" then
    local n = a.replay
    a = M.new_adapter(a)
    keep_replay(a, n)
  end
  adapter = a
  return a
end

--- The replay buffer of the adapter in use, or nil when none is kept.
function M.replay()
  M.adapter()
  return replay
end

local function check_message(message)
  if type(message) ~= "string" then
    error("pubsub: a message is a string, got " .. type(message)
          .. " (encode tables with fibril.json)", 3)
  end
end

--- Sends message to every subscriber of channel (in every process, with the redis adapter).
--- Returns the number of local receivers when the adapter knows it, and the message's id.
---@param channel string|table
---@param message string
function M.publish(channel, message)
  local name = M.channel(channel)
  check_message(message)
  return M.adapter():publish(name, message)
end

--- Calls fn(message, channel, id) for every message published on channel from now on, each
--- call a unit of work. opts.raw (framework-internal, e.g. SSE's fan-out): fn is called
--- directly, not as a unit, and must not suspend for long.
---@return table subscription with :unsubscribe()
function M.subscribe(channel, fn, opts)
  local name = M.channel(channel)
  if type(fn) ~= "function" then error("pubsub.subscribe: expected a handler function", 2) end
  return M.adapter():subscribe(name, fn, opts)
end

--- Long polling: the messages of channel after the one with id `after`, at once when the
--- replay buffer holds some; else waits up to timeout seconds (default 25) for the next one.
--- Returns a list of { id =, message = } (oldest first), or nil on timeout.
---@param opts table|nil { timeout = s, after = id }
function M.next(channel, opts)
  local name = M.channel(channel)
  opts = opts or {}
  local timeout = opts.timeout or 25
  if type(timeout) ~= "number" or not (timeout >= 0) then
    error("pubsub.next: timeout must be a non-negative number of seconds", 2)
  end
  local cond = require("fibril.cond").new()
  local got = {}
  local sub = M.adapter():subscribe(name, function(message, _, id)
    got[#got + 1] = { id = id, message = message }
    cond:signal()
  end, { raw = true })
  local r = replay
  local held = r and opts.after ~= nil and r:after(name, tostring(opts.after)) or {}
  if #held > 0 then
    sub:unsubscribe()
    return held
  end
  if #got == 0 then
    local ok, err = pcall(cond.wait, cond, { timeout = timeout })
    if not ok and not (type(err) == "table" and err.code == "timeout") then
      sub:unsubscribe()
      error(err, 0)                              -- cancelled: the caller must see it
    end
  end
  sub:unsubscribe()
  if #got == 0 then return nil end
  return got
end

return M
