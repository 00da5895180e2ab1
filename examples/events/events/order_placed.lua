local events = require "fibril.events"
return events.define("Orders.Placed", { "order_id", "total" })
