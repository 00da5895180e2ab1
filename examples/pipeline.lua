-- examples/pipeline.lua: a producer, a bounded channel and a pool of consumers, with a
-- semaphore capping how many "uploads" run at once and fibril.map for a final fan-out.
local fibril = require "fibril"

local jobs = fibril.channel(8)           -- the producer waits when 8 jobs are queued
local uploads = fibril.semaphore(2)      -- at most 2 uploads at a time
local done = {}

local producer = fibril.schedule(function()
  for i = 1, 20 do jobs:send(i) end
  jobs:close()                           -- consumers see nil once the queue is drained
end)

local consumers = {}
for w = 1, 4 do
  consumers[w] = fibril.schedule(function()
    for job in jobs:iter() do
      uploads:with(function() fibril.sleep(0.005) end)
      done[#done + 1] = job
    end
  end)
end

fibril.await(producer)
fibril.await_all(consumers)
print(("%d jobs processed by 4 consumers"):format(#done))

local squares = fibril.map({ 1, 2, 3, 4, 5 }, function(x)
  fibril.sleep(0.01)
  return x * x
end, { concurrency = 2 })
print("squares: " .. table.concat(squares, " "))
assert(#done == 20 and squares[5] == 25)
