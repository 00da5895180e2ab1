local Subscriber = require "fibril.subscriber"
local log = require "fibril.log"
local S = Subscriber:extend("SendReceipt")
S:subscribe_to(require "events.order_placed")
function S.call(_, ev) log.info("receipt sent", { order = ev.order_id }) end
return S
