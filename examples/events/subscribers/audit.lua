local Subscriber = require "fibril.subscriber"
local events = require "fibril.events"
local log = require "fibril.log"
local S = Subscriber:extend("Audit")
S:subscribe_to("*")
function S.call(_, ev) log.info("audit", { event = events.name(ev), id = events.id(ev) }) end
return S
