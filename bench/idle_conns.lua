-- bench/idle_conns.lua: memory of a server holding idle keep-alive connections.
--   fibril bench/idle_conns.lua PORT PID [CONNS]
-- Opens CONNS connections (default 10000) to 127.0.0.1:PORT, sends GET /hello on each (so the
-- server has served a request and holds the connection in keep-alive), and reports the
-- server's RSS (PID and its children, as nginx runs workers) before and while they are held.
local fibril = require "fibril"
local tcp = require "fibril.tcp"

local port, pid, n = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3]) or 10000
assert(port and pid, "usage: fibril bench/idle_conns.lua PORT PID [CONNS]")

local function rss_kib(p)
  local f = io.open("/proc/" .. p .. "/status")
  if not f then return 0 end
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)")) or 0
end

local function tree_rss_kib(root)
  local total = rss_kib(root)
  local ps = io.popen("ps -o pid= --ppid " .. root)
  for child in ps:lines() do total = total + rss_kib(tonumber(child)) end
  ps:close()
  return total
end

local before = tree_rss_kib(pid)
local socks = {}
local t0 = fibril.now()
local ok_count = 0
fibril.map((function() local t = {} for i = 1, n do t[i] = i end return t end)(), function(i)
  local sock = tcp.connect("127.0.0.1", port, { timeout = 10 })
  sock:write("GET /hello HTTP/1.1\r\nHost: bench\r\n\r\n")
  local got = ""
  while not got:find("Hello, World!", 1, true) do
    local chunk = sock:read({ timeout = 10 })
    if not chunk then break end
    got = got .. chunk
  end
  if got:find("200 OK", 1, true) then ok_count = ok_count + 1 end
  socks[i] = sock
end, { concurrency = 200 })
fibril.sleep(1)
local held = tree_rss_kib(pid)
print(("%d of %d keep-alive connections open after a request each (%.1f s to open)"):format(
      ok_count, n, fibril.now() - t0))
print(("server RSS: %.1f MiB before, %.1f MiB holding them: +%.1f MiB, %.2f KiB per connection"):format(
      before / 1024, held / 1024, (held - before) / 1024, (held - before) / n))
for i = 1, n do if socks[i] then socks[i]:close() end end
