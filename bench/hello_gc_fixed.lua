-- apps/hello (production) with a fixed collector pace and no fibril.gc: what fibril ran with
-- before lua/fibril/gc.lua, for bench/http_tail.sh to compare against.
--   fibril bench/hello_gc_fixed.lua PORT PAUSE STEPMUL
local App = require "fibril.app"
local server = require "fibril.server"

local app = App.load("apps/hello", "production")
app.config.port = assert(tonumber(arg[1]), "usage: hello_gc_fixed.lua PORT PAUSE STEPMUL")
local srv = server.listen(app)          -- kept referenced: a collected server stops listening
collectgarbage("setpause", assert(tonumber(arg[2])))
collectgarbage("setstepmul", assert(tonumber(arg[3])))
server.drain_on_signal(app, srv)
