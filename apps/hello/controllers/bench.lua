-- GET /hello and GET /json exactly as ../shared/bench/README.md gives them.
local Controller = require "fibril.controller"
local json = require "fibril.json"

local C = Controller:extend()

function C:hello()
  self:render{ text = "Hello, World!", content_type = "text/plain" }
end

-- Encoded per request, as the peers do. A Lua table has no key order, so the object is put
-- together field by field to give the peers' exact bytes.
function C:json()
  local body = '{"message":' .. json.encode("Hello, World!") .. ',"ok":' .. json.encode(true)
               .. ',"items":' .. json.encode(json.array({ 1, 2, 3 })) .. "}"
  self:render{ body = body, content_type = "application/json" }
end

return C
