--- fibril.subscriber: event subscribers that declare what they listen to in their own file
--- (APP/subscribers/*.lua, loaded at boot so the whole graph is known). docs/events.md.
---
---   local S = Subscriber:extend("UpdateHeadPipeline")
---   S:subscribe_to(PipelineCreated, { deferred = true, retries = 5 })
---   function S:call(event) ... end      -- self.task_id, self.attempt when deferred
---   return S
local events = require "fibril.events"

local type, error, setmetatable, getmetatable, pairs, tostring, format, floor =
      type, error, setmetatable, getmetatable, pairs, tostring, string.format, math.floor

local Subscriber = {}
Subscriber.__index = Subscriber

--- Makes a subscriber class named name (its name in logs, in task records and in the tree).
---@param name string
---@return table the class
function Subscriber:extend(name)
  if type(name) ~= "string" or not name:find("^[%a_][%w_%.]*$") then
    error("Subscriber:extend: the name must be letters, digits, _ and dots, got " .. tostring(name), 2)
  end
  local S = setmetatable({}, self)
  S.__index = S
  S.name = name
  S.subscriptions = {}
  return S
end

--- True when v is a subscriber class.
function Subscriber.is_subscriber(v)
  if type(v) ~= "table" then return false end
  local mt = getmetatable(v)
  while mt do
    if mt == Subscriber then return true end
    mt = getmetatable(mt)
  end
  return false
end

local OPTIONS = { deferred = "boolean", retries = "number", backoff = "table", ["if"] = "function",
                  max_concurrency = "number" }

local function check_opts(opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error("subscribe_to: options must be a table", 3) end
  for k, v in pairs(opts) do
    local want = OPTIONS[k]
    if not want then error(format("subscribe_to: unknown option '%s'", tostring(k)), 3) end
    if k == "backoff" and type(v) == "number" then v = { min = v } ; opts.backoff = v end
    if type(v) ~= want then
      error(format("subscribe_to: option '%s' must be a %s, got %s", k, want, type(v)), 3)
    end
  end
  for _, k in pairs({ "retries", "max_concurrency" }) do
    local v = opts[k]
    if v ~= nil and (v ~= floor(v) or v < (k == "retries" and 0 or 1)) then
      error(format("subscribe_to: option '%s' must be an integer %s", k,
                   k == "retries" and ">= 0" or ">= 1"), 3)
    end
  end
  local b = opts.backoff
  if b then
    for k, v in pairs(b) do
      if (k ~= "min" and k ~= "max") or type(v) ~= "number" or not (v > 0 and v < math.huge) then
        error("subscribe_to: backoff must be { min = seconds, max = seconds } (or seconds)", 3)
      end
    end
  end
  if (opts.retries or opts.backoff or opts.max_concurrency) and not opts.deferred then
    error("subscribe_to: retries, backoff and max_concurrency apply to deferred subscribers "
          .. "(add deferred = true)", 3)
  end
  return opts
end

--- Subscribes this class to target: an event class, "*" (every event) or "Prefix.*".
---@param target table|string
---@param opts table|nil { deferred = true, retries = n (attempts), backoff = { min =, max = }
---   or seconds, ["if"] = function(event) -> boolean, max_concurrency = n }
function Subscriber:subscribe_to(target, opts)
  if self == Subscriber then error("subscribe_to: call it on a class made with Subscriber:extend", 2) end
  opts = check_opts(opts)
  local s = events.subscribe(self, target, opts)
  self.subscriptions[#self.subscriptions + 1] = s
  return self
end

--- The work for one event; subclasses override it. Raising fails this delivery (inline: logged;
--- deferred: retried).
function Subscriber:call(event)
  error(format("subscriber %s has no call method (event %s)", tostring(self.name),
               events.name(event)), 2)
end

return Subscriber
