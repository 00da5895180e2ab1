--- fibril.pubsub: publish/subscribe between parts of an app, and across processes and
--- machines, through an adapter: `local` (in-process, the default) or `redis` (a Redis Stream:
--- a subscriber that reconnects loses nothing). config/app.lua picks it:
---   pubsub = { adapter = "redis", url = os.getenv("REDIS_URL"), retention = 300 }
--- A channel is a string or a list ({ "timeline", 7 } is the channel "timeline:7"); a message
--- is a string. Handlers get fn(message, channel), each call a unit of work. docs/pubsub.md.
local type, error, tostring, concat, getenv = type, error, tostring, table.concat, os.getenv

local M = {}

local adapter                    -- the process's adapter, made at first use

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

--- The adapter in use: set by use(), else made from the app's `pubsub` settings.
---@return table adapter
function M.adapter()
  if not adapter then
    local app = require("fibril.config").current()
    adapter = M.new_adapter(app and app.pubsub)
  end
  return adapter
end

--- Replaces the adapter (closing the one in use): an adapter object, or settings for one.
---@param a table|nil nil goes back to the app's settings at next use
function M.use(a)
  if adapter and adapter ~= a then adapter:close() end
  if a ~= nil and type(a.publish) ~= "function" then a = M.new_adapter(a) end
  adapter = a
  return a
end

local function check_message(message)
  if type(message) ~= "string" then
    error("pubsub: a message is a string, got " .. type(message)
          .. " (encode tables with fibril.json)", 3)
  end
end

--- Sends message to every subscriber of channel (in every process, with the redis adapter).
---@param channel string|table
---@param message string
function M.publish(channel, message)
  local name = M.channel(channel)
  check_message(message)
  return M.adapter():publish(name, message)
end

--- Calls fn(message, channel) for every message published on channel from now on.
---@return table subscription with :unsubscribe()
function M.subscribe(channel, fn)
  local name = M.channel(channel)
  if type(fn) ~= "function" then error("pubsub.subscribe: expected a handler function", 2) end
  return M.adapter():subscribe(name, fn)
end

return M
