--- fibril.sse: Server-Sent Event streams whose lifecycle the framework owns.
---   function C:stream() self:render{ sse = sse.stream({ "timeline", self.params.id }) } end
---   sse.broadcast({ "timeline", 7 }, sse.message({ body = "hi" }, { event = "update" }))
--- The framework sends the headers and an opening comment, replays what the client missed
--- (Last-Event-ID, when `sse.replay` keeps messages), subscribes the stream, sends heartbeat
--- comments, and on the client leaving, an error, or the server draining, unsubscribes and
--- frees everything. Broadcasts go through fibril.pubsub (local or redis adapter); each
--- process subscribes once per channel however many streams it holds, and writes to a slow
--- client never wait: past `sse.max_buffer` unsent bytes the client is dropped. docs/sse.md.
local pubsub = require "fibril.pubsub"
local executor = require "fibril.executor"
local json = require "fibril.json"
local fcore = require "fibril.core.fiber"
local log = require "fibril.log"

local type, error, tostring, setmetatable, getmetatable, pairs, next, pcall, select =
      type, error, tostring, setmetatable, getmetatable, pairs, next, pcall, select
local find, gsub, match, format, concat, floor = string.find, string.gsub, string.match,
      string.format, table.concat, math.floor
local spawn, sleep, set_context, now = fcore.spawn, fcore.sleep, fcore.set_context, fcore.now

local M = {}

-- ---- messages --------------------------------------------------------------------------

local Message = {}
local MessageMT = { __index = Message, __tostring = function(m) return m.frame end }

local function field_value(what, v, nul)
  local t = type(v)
  if t == "number" then v = format("%.14g", v)
  elseif t ~= "string" then error("sse.message: " .. what .. " must be a string or a number", 3) end
  if find(v, "[\r\n]") or (nul and find(v, "%z")) then
    error("sse.message: " .. what .. " must not contain CR, LF" .. (nul and " or NUL" or ""), 3)
  end
  return v
end

--- One event. data: a string (each line becomes a `data:` line) or a table (JSON-encoded).
--- opts: event (a name), id (Last-Event-ID), retry (ms the browser waits to reconnect).
--- CR or LF in event or id, or NUL in id, raise: no field injection.
---@return table message (tostring gives the wire frame)
function M.message(data, opts)
  if getmetatable(data) == MessageMT then return data end
  local t = type(data)
  if t == "table" then data = json.encode(data)
  elseif t == "number" then data = tostring(data)
  elseif t ~= "string" then error("sse.message: data must be a string or a table, got " .. t, 2) end
  if opts ~= nil and type(opts) ~= "table" then error("sse.message: opts must be a table", 2) end
  local parts, id = {}, nil
  if opts then
    if opts.id ~= nil then
      id = field_value("id", opts.id, true)
      parts[#parts + 1] = "id: " .. id .. "\n"   -- first: replay finds it there
    end
    if opts.event ~= nil then parts[#parts + 1] = "event: " .. field_value("event", opts.event) .. "\n" end
    if opts.retry ~= nil then
      local r = opts.retry
      if type(r) ~= "number" or r < 0 or r ~= floor(r) then
        error("sse.message: retry must be a whole number of milliseconds", 2)
      end
      parts[#parts + 1] = format("retry: %d\n", r)
    end
  end
  parts[#parts + 1] = "data: " .. gsub(gsub(data, "\r\n?", "\n"), "\n", "\ndata: ") .. "\n\n"
  return setmetatable({ frame = concat(parts), id = id }, MessageMT)
end

--- A comment line (ignored by EventSource; keeps proxies from timing the stream out).
function M.comment(text)
  text = text and tostring(text) or ""
  if find(text, "[\r\n]") then error("sse.comment: text must not contain CR or LF", 2) end
  return ": " .. text .. "\n\n"
end

-- The id of a frame (its first line, where sse.message puts it), or nil.
local function frame_id(frame) return match(frame, "^id: ([^\n]*)\n") end

-- ---- streams ----------------------------------------------------------------------------

local Stream = {}
local StreamMT = { __index = Stream }

local settings = { heartbeat = 15, max_buffer = 262144 }
local streams = {}               -- every open stream -> true
local channels = {}              -- name -> { streams = { [stream] = true }, sub = subscription }
local ticker                     -- the heartbeat fiber, while streams are open

--- Settings (the app's `sse` section): heartbeat seconds, max_buffer bytes per stream.
function M.configure(cfg)
  if cfg.heartbeat then settings.heartbeat = cfg.heartbeat end
  if cfg.max_buffer then settings.max_buffer = cfg.max_buffer end
end

--- Describes a stream for render{ sse = ... }: one or more channels (each a string or a list,
--- as in fibril.pubsub), or a function(stream) that sends what it wants and returns to end it.
--- A last table argument with `retry` (milliseconds) is options: the stream opens by telling
--- the browser how long to wait before reconnecting.
function M.stream(...)
  local n = select("#", ...)
  local last = n > 0 and select(n, ...) or nil
  local opts
  if type(last) == "table" and last.retry ~= nil then opts, n = last, n - 1 end
  local first = ...
  local desc
  if type(first) == "function" then
    desc = { fn = first }
  else
    local names = {}
    for i = 1, n do names[i] = pubsub.channel((select(i, ...))) end
    if #names == 0 then error("sse.stream: give a channel (or several), or a function", 2) end
    desc = { channels = names }
  end
  if opts then
    local r = opts.retry
    if type(r) ~= "number" or r < 0 or r ~= floor(r) then
      error("sse.stream: retry must be a whole number of milliseconds", 2)
    end
    desc.retry = r
  end
  return desc
end

local function drop(stream, why)
  if stream.closed then return end
  stream.closed = true
  streams[stream] = nil
  for _, name in pairs(stream.channels or {}) do
    local ch = channels[name]
    if ch then
      ch.streams[stream] = nil
      if next(ch.streams) == nil then
        channels[name] = nil
        ch.sub:unsubscribe()
      end
    end
  end
  if why == "slow" then
    log.warn("sse client too slow: disconnected", { channels = concat(stream.channels or {}, ","),
             max_buffer = settings.max_buffer })
  end
end

-- Writes without waiting; a closed or slow client is dropped. t: the loop's time now, when
-- the caller has it (a broadcast to 10,000 streams reads the clock once).
local function push(stream, frame, t)
  if stream.closed then return false end
  local ok, why = stream.res:push(frame, settings.max_buffer)
  if not ok then drop(stream, why) end
  stream.wrote = t or now()
  return ok
end

--- Sends a message (or data, made into one) on a handler-driven stream. Returns false once
--- the client is gone (the handler should return then).
function Stream:send(message, opts)
  return push(self, M.message(message, opts).frame)
end

--- Sends a frame already in wire format ("id: 1\ndata: x\n\n"): for hot loops that build
--- their own; the caller is responsible for its fields. Returns false once the client is gone.
function Stream:send_frame(frame) return push(self, frame) end

--- Sends a comment.
function Stream:comment(text) return push(self, M.comment(text)) end

---@return boolean true once the client left or the stream was dropped
function Stream:closed() return self.closed or self.res:gone() end

-- Heartbeats go only to streams that sent nothing for a whole interval (one that sends keeps
-- its proxies awake already), a slice at a time: 10,000 writes in one loop turn would hold
-- back every event due meanwhile.
local HEARTBEAT_SLICE = 256
local function heartbeat_loop()
  set_context(nil)
  while next(streams) do
    sleep(settings.heartbeat)
    local due, t = {}, now()
    local idle_since = t - settings.heartbeat * 0.9
    for s in pairs(streams) do
      if s.wrote <= idle_since then due[#due + 1] = s end
    end
    local beat = M.comment()
    for i = 1, #due do
      push(due[i], beat, t)
      if i % HEARTBEAT_SLICE == 0 then sleep(0) end
    end
  end
  ticker = nil
end

-- One subscription per channel per process: the frame goes to every stream of the channel.
local function on_broadcast(frame, name, id)
  local ch = channels[name]
  if not ch then return end
  if id and not frame_id(frame) then frame = "id: " .. id .. "\n" .. frame end
  local t = now()
  for s in pairs(ch.streams) do push(s, frame, t) end
end

local function join(stream, name)
  local ch = channels[name]
  if not ch then
    ch = { streams = {} }
    channels[name] = ch
    ch.sub = pubsub.subscribe(name, on_broadcast, { raw = true })
  end
  ch.streams[stream] = true
end

local HEADERS = { ["Content-Type"] = "text/event-stream", ["Cache-Control"] = "no-store",
                  ["X-Accel-Buffering"] = "no" }

-- Sends the head, the opening comment and what Last-Event-ID missed; returns the stream. Kept
-- apart from serve so its temporaries are gone while the stream waits (10,000 streams).
local function open(req, res, desc, headers)
  local h = HEADERS
  if headers and next(headers) then
    h = {}
    for k, v in pairs(HEADERS) do h[k] = v end
    for k, v in pairs(headers) do h[k] = v end
  end
  res:start(200, h)
  local stream = setmetatable({ res = res, channels = desc.channels, closed = false, wrote = 0 },
                              StreamMT)
  streams[stream] = true
  if not ticker then ticker = spawn(heartbeat_loop) end
  push(stream, desc.retry and format(": ok\nretry: %d\n\n", desc.retry) or M.comment("ok"))
  local last = req.headers and req.headers["last-event-id"]
  local replay = last and desc.channels and pubsub.replay()
  if replay then
    local key = function(e) return frame_id(e.message) or e.id end
    for _, name in ipairs(desc.channels) do
      for _, e in ipairs(replay:after(name, last, key)) do
        local frame = e.message
        if not frame_id(frame) then frame = "id: " .. e.id .. "\n" .. frame end
        push(stream, frame)
      end
    end
  end
  return stream
end

-- A handler-driven stream's function, in a fiber of its own (a shallow stack: 10,000 streams
-- are 10,000 of these) and a unit of work of its own; the client leaving cancels it wherever
-- it waits.
local function run_handler(stream, fn, id)
  set_context(nil)
  local res = stream.res
  res:cancel_on_close(true)
  local ok, err = executor.call_new_fiber(fn, id, stream)
  res:cancel_on_close(false)
  if not ok and not ((res:gone() or stream.closed) and type(err) == "table"
                     and err.code == "cancelled") then
    log.error("sse stream handler failed", { req = id, err = tostring(err) })
  else
    ok = true                    -- a return, or the client leaving: the normal ends of a stream
  end
  drop(stream)
  if not res:closed() then
    if ok and not res:gone() then pcall(res.finish, res) else res:abort() end
  end
end

--- Opens a stream on (req, res): headers, the opening comment, what Last-Event-ID missed,
--- then subscription (channels) or the handler's fiber (a function), and returns. No fiber
--- waits on a channel stream: the process's one subscription per channel writes to it, and
--- it ends when the client leaves (noticed at the next write, a heartbeat at the latest; at
--- once when the client closes its side), the server drains, or sse.close.
---@param desc table from sse.stream
---@param headers table|nil extra response headers
function M.serve(req, res, desc, headers)
  local stream = open(req, res, desc, headers)
  if desc.fn then
    spawn(run_handler, stream, desc.fn, req.id)
  else
    local ok, err = pcall(function()
      for _, name in ipairs(desc.channels) do join(stream, name) end
    end)
    if not ok then
      drop(stream)
      error(err, 0)
    end
  end
  res:detach()
end

--- Sends message to every stream of channel, in every process (through the pub/sub adapter).
--- message: from sse.message, or data to make one from.
function M.broadcast(channel, message)
  return pubsub.publish(channel, M.message(message).frame)
end

--- Ends the streams of channel in this process cleanly; their browsers reconnect (sending
--- Last-Event-ID). Returns how many were open.
function M.close(channel)
  local ch = channels[pubsub.channel(channel)]
  if not ch then return 0 end
  local n = 0
  for s in pairs(ch.streams) do
    if not s.res:closed() then
      pcall(s.res.finish, s.res)
      n = n + 1
    end
    drop(s)
  end
  return n
end

--- Ends every open stream cleanly (the server's drain calls this).
function M.shutdown()
  for s in pairs(streams) do
    if not s.res:closed() then pcall(s.res.finish, s.res) end
    if s.channels then drop(s) end   -- a handler's fiber drops its own stream as it ends
  end
end

--- Open streams in this process (for tests and stats).
function M.count()
  local n = 0
  for _ in pairs(streams) do n = n + 1 end
  return n
end

return M
