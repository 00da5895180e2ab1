-- bench/reload.lua: latency from a controller write to the first response with the new code.
--   fibril bench/reload.lua APP_COPY PORT [CHANGES]
-- APP_COPY is a copy of apps/hello served by `fibril run` in development on PORT; this script
-- rewrites its controllers/bench.lua CHANGES times (default 20), each time with a new version
-- behind GET /version, and polls until the server answers it.
local fibril = require "fibril"
local tcp = require "fibril.tcp"

local dir, port, changes = arg[1], tonumber(arg[2]), tonumber(arg[3]) or 20
assert(dir and port, "usage: fibril bench/reload.lua APP_COPY PORT [CHANGES]")

local function controller(version)
  return ([[
local Controller = require "fibril.controller"
local json = require "fibril.json"
local C = Controller:extend()
function C:hello() self:render{ text = "Hello, World!", content_type = "text/plain" } end
function C:json()
  local body = '{"message":' .. json.encode("Hello, World!") .. ',"ok":' .. json.encode(true)
               .. ',"items":' .. json.encode(json.array({ 1, 2, 3 })) .. "}"
  self:render{ body = body, content_type = "application/json" }
end
function C:version() self:render{ text = %q } end
return C
]]):format(version)
end

local function version()
  local sock = tcp.connect("127.0.0.1", port, { timeout = 5 })
  sock:write("GET /version HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
  local body = sock:read_all({ timeout = 5 }):match("\r\n\r\n(.*)$")
  sock:close()
  return body
end

local function write_file(path, content)
  local f = assert(io.open(path .. ".tmp", "w"))
  f:write(content)
  f:close()
  assert(os.rename(path .. ".tmp", path))   -- atomic, as editors save
end

local lat = {}
for i = 1, changes do
  local v = "v" .. i
  local t0 = fibril.now()
  write_file(dir .. "/controllers/bench.lua", controller(v))
  while version() ~= v do
    if fibril.now() - t0 > 10 then error("change " .. i .. " never showed") end
    fibril.sleep(0.002)
  end
  lat[i] = (fibril.now() - t0) * 1000
  fibril.sleep(0.2)
end
table.sort(lat)
print(("%d changes: write to first new response, median %.1f ms, min %.1f ms, max %.1f ms")
      :format(changes, lat[math.ceil(#lat / 2)], lat[1], lat[#lat]) .. " (target: median < 100 ms)")
