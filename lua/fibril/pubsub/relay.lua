--- fibril.pubsub.relay: the local adapter across `--workers N`. The master runs a small HTTP
--- server on loopback (a port of its own, given to the workers as FIBRIL_RELAY_PORT); each
--- worker holds one streamed `GET /relay?worker=I` to it and sends what it publishes with
--- `POST /publish?worker=I`; the master writes each message to every other worker's stream.
--- A worker delivers its own messages locally at once, as the single process does.
--- Messages are framed as one chunk each: "<#channel>:<channel><#id>:<id><message>".
--- Every request carries X-Relay-Token, a secret the master draws at start and gives its
--- workers (FIBRIL_RELAY_TOKEN): any local process can reach a loopback port, so the port
--- alone must not let it publish to, or read, every worker's channels.
local fcore = require "fibril.core.fiber"
local log = require "fibril.log"
local backoff = require "fibril.backoff"

local tostring, tonumber, pcall, type, pairs, setmetatable, assert, error =
      tostring, tonumber, pcall, type, pairs, setmetatable, assert, error
local sub, find, format, byte = string.sub, string.find, string.format, string.byte
local spawn, sleep, set_context = fcore.spawn, fcore.sleep, fcore.set_context

local M = {}

--- Most bytes one relayed message may have (the master's request body limit).
M.MAX_MESSAGE = 4 * 1024 * 1024
-- Bytes a worker may lag behind on its relay stream before the master drops it (it then
-- reconnects; messages sent meanwhile are lost for that worker, and logged).
local MAX_BEHIND = 64 * 1024 * 1024

function M.encode(channel, id, message)
  return #channel .. ":" .. channel .. #id .. ":" .. id .. message
end

function M.decode(s)
  local colon = find(s, ":", 1, true)
  local n = colon and tonumber(sub(s, 1, colon - 1))
  if not n then return nil end
  local channel = sub(s, colon + 1, colon + n)
  local rest = colon + n + 1
  local colon2 = find(s, ":", rest, true)
  local m = colon2 and tonumber(sub(s, rest, colon2 - 1))
  if not m then return nil end
  return channel, sub(s, colon2 + 1, colon2 + m), sub(s, colon2 + m + 1)
end

-- ---- the token -----------------------------------------------------------------------------

--- A new secret: 32 bytes of /dev/urandom in hex.
function M.new_token()
  local f = assert(io.open("/dev/urandom", "rb"))
  local raw = f:read(32)
  f:close()
  if not raw or #raw ~= 32 then error("pubsub relay: cannot read /dev/urandom", 0) end
  return (raw:gsub(".", function(c) return format("%02x", byte(c)) end))
end

-- ---- the master ---------------------------------------------------------------------------

--- Starts the relay in the master; returns the server (keep it: dropping it closes it), its
--- port and the token each request must carry (token: given, or a new one).
function M.serve_master(token)
  local http = require "fibril.core.http"
  token = token or M.new_token()
  local streams = {}              -- worker number -> res
  local server = assert(http.listen{
    host = "127.0.0.1", port = 0, access_log = false, max_body_bytes = M.MAX_MESSAGE,
    keepalive_timeout = 3600, header_timeout = 10, body_timeout = 10, max_header_bytes = 4096,
    -- The HTTP core answers 403 to a request without the token as soon as its head is read:
    -- no body of an unauthenticated request is read, and its warn lines are rate-limited.
    required_header = "X-Relay-Token", required_value = token,
    handler = function(req, res)
      local worker = req.target:match("[?&]worker=(%d+)")
      if req.method == "GET" and req.path == "/relay" and worker then
        local old = streams[worker]
        if old then old:abort() end
        res:start(200, { ["Content-Type"] = "application/octet-stream" })
        streams[worker] = res
        res:wait_closed()
        if streams[worker] == res then streams[worker] = nil end
        if not res:closed() then res:abort() end
      elseif req.method == "POST" and req.path == "/publish" and worker then
        local body = req.body or ""
        for w, s in pairs(streams) do
          if w ~= worker and not s:push(body, MAX_BEHIND) then
            log.warn("pubsub relay: a worker fell behind and was dropped", { worker = w })
            streams[w] = nil
          end
        end
        res:send(204, {}, "")
      else
        res:send(404, {}, "")
      end
    end,
  })
  return server, server:port(), token
end

-- ---- a worker -----------------------------------------------------------------------------

local Link = {}
local LinkMT = { __index = Link }

-- Reads one chunk of the relay stream; nil at its end.
local function read_chunk(sock)
  local size = sock:read_line({ timeout = false })
  local n = size and tonumber(size, 16)
  if not n or n == 0 then return nil end
  local data = sock:read_bytes(n, { timeout = 30 })
  sock:read_line({ timeout = 30 })
  return data
end

-- Follows the master's stream for this worker, handing each message to deliver; reconnects
-- with backoff until the link is closed.
local function receive_loop(self)
  set_context(nil)
  local tcp = require "fibril.tcp"
  local failures = 0
  while not self.closed do
    local _, err = pcall(function()
      local sock = tcp.connect("127.0.0.1", self.port, { timeout = 5 })
      self.rsock = sock
      sock:write(format("GET /relay?worker=%s HTTP/1.1\r\nHost: relay\r\nX-Relay-Token: %s\r\n\r\n",
                        self.worker, self.token))
      local status = sock:read_line({ timeout = 10 })
      repeat
        local line = sock:read_line({ timeout = 10 })
      until line == "" or line == nil
      if not status or not find(status, " 200", 1, true) then
        error("the master answered " .. tostring(status))
      end
      failures = 0
      self.connected = true
      self.ready:broadcast()
      while true do
        local data = read_chunk(sock)
        if not data then break end
        local channel, id, message = M.decode(data)
        if channel then self.deliver(channel, id, message) end
      end
      sock:close()
    end)
    self.rsock = nil
    self.connected = false
    if self.closed then return end
    failures = failures + 1
    if failures == 1 or failures % 10 == 0 then
      log.warn("pubsub relay: connection to the master lost, reconnecting",
               { worker = self.worker, err = tostring(type(err) == "table" and err.message or err) })
    end
    sleep(backoff.delay(failures, 2))
  end
end

-- Sends queued messages to the master, one keep-alive connection, in publish order.
local function send_loop(self)
  set_context(nil)
  local tcp = require "fibril.tcp"
  local sock
  while not self.closed do
    local body = self.queue[self.head]
    if not body then
      self.waiting = fcore.current()
      pcall(fcore.park)          -- woken by send(), or cancelled by close()
      self.waiting = nil
    else
      local ok, err = pcall(function()
        if not sock then sock = tcp.connect("127.0.0.1", self.port, { timeout = 5 }) end
        sock:write(format("POST /publish?worker=%s HTTP/1.1\r\nHost: relay\r\nX-Relay-Token: %s\r\n"
                          .. "Content-Length: %d\r\n\r\n", self.worker, self.token, #body) .. body)
        local status = sock:read_line({ timeout = 10 })
        repeat
          local line = sock:read_line({ timeout = 10 })
        until line == "" or line == nil
        if not status or not find(status, " 204", 1, true) then
          error("the master answered " .. tostring(status))
        end
      end)
      if ok then
        self.queue[self.head] = nil
        self.head = self.head + 1
      else
        if sock then pcall(sock.close, sock) end
        sock = nil
        log.warn("pubsub relay: cannot send to the master, retrying",
                 { worker = self.worker, err = tostring(type(err) == "table" and err.message or err) })
        sleep(0.1)
      end
    end
  end
  if sock then pcall(sock.close, sock) end
end

--- Links this worker to the master's relay: deliver(channel, id, message) gets what other
--- workers publish. token: the master's (default: FIBRIL_RELAY_TOKEN). Returns a link with
--- :send(channel, id, message) and :close().
function M.link(port, worker, deliver, token)
  token = token or os.getenv("FIBRIL_RELAY_TOKEN")
  if type(token) ~= "string" or not find(token, "^%x+$") then
    error("pubsub relay: no relay token (FIBRIL_RELAY_TOKEN, set by the master)", 2)
  end
  local self = setmetatable({ port = port, worker = tostring(worker), deliver = deliver, token = token,
                              queue = {}, head = 1, tail = 0, closed = false, connected = false,
                              ready = require("fibril.cond").new() }, LinkMT)
  self.receiver = spawn(receive_loop, self)
  self.sender = spawn(send_loop, self)
  return self
end

function Link:send(channel, id, message)
  local body = M.encode(channel, id, message)
  if #body > M.MAX_MESSAGE then
    error(format("pubsub: a message of %d bytes is over the relay's %d", #body, M.MAX_MESSAGE), 3)
  end
  self.tail = self.tail + 1
  self.queue[self.tail] = body
  if self.waiting then fcore.wake(self.waiting) end
end

--- Waits (up to timeout seconds) until the master's stream is open, so that what other
--- workers publish from then on reaches this one. Returns whether it is.
function Link:wait_ready(timeout)
  if not self.connected then pcall(self.ready.wait, self.ready, { timeout = timeout }) end
  return self.connected
end

function Link:close()
  self.closed = true
  if self.rsock then pcall(self.rsock.close, self.rsock) end
  fcore.cancel(self.receiver)
  fcore.cancel(self.sender)
end

return M
