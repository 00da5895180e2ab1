--- fibril.pubsub.deliver: calls the handlers of a channel with one message, as every pub/sub
--- path does (the local and redis adapters, Redis subscriptions): each handler a unit of work
--- (a `raw` one, framework-internal, is called directly), a failure logged with its traceback
--- and the others still called. Handlers are { fn =, active =, raw = }; the list is walked
--- from its end, so a handler may unsubscribe itself meanwhile without a copy of the list.
local executor = require "fibril.executor"
local log = require "fibril.log"

local pcall, type, tostring = pcall, type, tostring
local call = executor.call

---@param list table the handlers
---@param what string the log message for a failure ("pubsub handler failed")
---@param tags table the units' log tags ({ channel = name })
---@param ... any the handler's arguments (message, channel, ...)
return function(list, what, tags, ...)
  for i = #list, 1, -1 do
    local sub = list[i]
    if sub and sub.active then
      local ok, err
      if sub.raw then ok, err = pcall(sub.fn, ...)
      else ok, err = call(sub.fn, tags, ...) end
      if not ok then
        local fields = { err = tostring(type(err) == "table" and err.message or err),
                         traceback = type(err) == "table" and err.traceback or nil }
        for k, v in pairs(tags) do fields[k] = v end
        log.error(what, fields)
      end
    end
  end
end
