-- examples/fanout.lua: three slow calls made concurrently with schedule/await.
-- Each "call" sleeps; run one after the other they would take 0.3 s, together about 0.1 s.
local fibril = require "fibril"

local function slow_call(name, seconds)
  fibril.sleep(seconds)
  return name .. " answered after " .. seconds .. " s"
end

local t0 = fibril.now()
local a = fibril.schedule(slow_call, "users", 0.1)
local b = fibril.schedule(slow_call, "orders", 0.1)
local c = fibril.schedule(slow_call, "stock", 0.1)
local ra, rb, rc = fibril.await(a, b, c)
local elapsed = fibril.now() - t0

print(ra)
print(rb)
print(rc)
print(("3 calls of 0.1 s each took %.3f s together"):format(elapsed))
assert(elapsed < 0.25, "the calls did not run concurrently")
