-- examples/push_notifications.lua: one push notification per subscription, sent concurrently
-- with a cap (fibril.map with concurrency = 16), so the whole batch takes about as long as
-- the slowest waves of calls instead of the sum of all of them. The push service is a local
-- fibril HTTP server that takes 20 to 60 ms per notification and rejects unknown devices.
local fibril = require "fibril"
local http = require "fibril.http"
local listen = require("fibril.core.http").listen

local in_flight, peak = 0, 0
local server = assert(listen({ host = "127.0.0.1", port = 0, access_log = false,
  handler = function(req, res)
    in_flight = in_flight + 1
    if in_flight > peak then peak = in_flight end
    local note = require("fibril.json").decode(req.body)
    fibril.sleep(0.02 + (note.device % 5) * 0.01)
    in_flight = in_flight - 1
    if note.device % 25 == 0 then
      res:send(410, { ["Content-Type"] = "application/json" }, '{"error":"unsubscribed"}')
    else
      res:send(201, { ["Content-Type"] = "application/json" }, '{"ok":true}')
    end
  end }))
local push_url = "http://127.0.0.1:" .. server:port() .. "/push"

local subscriptions = {}
for i = 1, 100 do subscriptions[i] = { device = i, user = "user" .. i } end

local t0 = fibril.now()
local statuses = fibril.map(subscriptions, function(sub)
  local res = http.post(push_url, {
    json = { device = sub.device, title = "New reply", body = "Someone answered " .. sub.user },
    timeout = 5,
  })
  return res.status
end, { concurrency = 16 })
local elapsed = fibril.now() - t0

local sent, gone = 0, 0
for _, status in ipairs(statuses) do
  if status == 201 then sent = sent + 1 elseif status == 410 then gone = gone + 1 end
end
print(("%d notifications: %d sent, %d unsubscribed, in %.0f ms, at most %d at once")
      :format(#subscriptions, sent, gone, elapsed * 1000, peak))
print(("one at a time this would take about %.0f ms"):format(100 * 0.04 * 1000))

server:close()
http.reset()
assert(sent == 96 and gone == 4)
assert(peak <= 16, "the concurrency cap was not kept")
assert(elapsed < 1.5, ("the batch took %.3f s"):format(elapsed))
