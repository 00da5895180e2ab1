-- bench/pg_sleep.lua: the fiber proof. N requests to apps/hello's GET /sleep (one
-- `select pg_sleep(0.1)` each, through a pool of 20), C at a time on keep-alive connections,
-- as `ab -n N -c C` would send them. Prints the wall time against N/C x 0.1 s (the pool
-- working) and N x 0.1 s (queries one after another). Figures only.
-- Usage: fibril bench/pg_sleep.lua PORT [n=100] [c=20]
local fibril = require "fibril"
local tcp = require "fibril.tcp"

local port = assert(tonumber(arg[1]), "usage: fibril bench/pg_sleep.lua PORT [n] [c]")
local n, c = tonumber(arg[2]) or 100, tonumber(arg[3]) or 20

-- One response: the status line, headers up to the blank line, Content-Length bytes.
local function get(sock)
  sock:write("GET /sleep HTTP/1.1\r\nHost: bench\r\n\r\n")
  local status = assert(sock:read_line({ timeout = 30 })):match("^HTTP/1%.1 (%d+)")
  local len = 0
  while true do
    local h = assert(sock:read_line({ timeout = 30 }))
    if h == "" then break end
    len = tonumber(h:lower():match("^content%-length:%s*(%d+)")) or len
  end
  if len > 0 then sock:read_bytes(len, { timeout = 30 }) end
  return tonumber(status)
end

-- A first round opens the pool's connections, as a warmed-up server would have them.
local function round()
  local left, failed = n, 0
  local clients = {}
  for i = 1, c do
    clients[i] = fibril.schedule(function()
      local sock = tcp.connect("127.0.0.1", port, { timeout = 5 })
      while left > 0 do
        left = left - 1
        if get(sock) ~= 200 then failed = failed + 1 end
      end
      sock:close()
    end)
  end
  local t0 = fibril.now()
  fibril.await_all(clients)
  return fibril.now() - t0, failed
end

round()
local took, failed = round()
print(("GET /sleep: %d requests, %d at a time, in %.2f s (%d failed); pool at work: %.1f s, "
       .. "one at a time: %.1f s"):format(n, c, took, failed, n / c * 0.1, n * 0.1))
