-- spec/sse_browser_spec.lua: a real browser. Headless Chromium (Debian's chromium, installed
-- by scripts/install-deps) loads a page of spec/fixtures/sse_browser whose EventSource gets
-- broadcast events; the server then closes the stream, more events are broadcast while the
-- browser is away, and the browser reconnects with Last-Event-ID and gets exactly those.
-- The page reports what it received to the app, which the spec reads.
local fibril = require "fibril"
local json = require "fibril.json"
local support = require "spec.support"

local CHROMIUM = "/usr/bin/chromium"

local function eventually(cond, limit) return support.eventually(cond, limit or 15, 0.05) end

describe("SSE in a real browser", function()
  local app, profile

  teardown(function()
    -- Chromium's helper processes share the profile path on their command lines.
    if profile then
      os.execute("pkill -9 -f -- '[-]-user-data-dir=" .. profile .. "' 2>/dev/null")
      for _ = 1, 50 do
        if os.execute("pgrep -f -- '[-]-user-data-dir=" .. profile .. "' >/dev/null") ~= 0 then break end
        fibril.sleep(0.05)
      end
      os.execute("rm -rf '" .. profile .. "'")
    end
    if app then app.stop("KILL") end
  end)

  it("receives broadcasts and reconnects with Last-Event-ID after the server closes the stream",
     function()
    assert.is_truthy(io.open(CHROMIUM), CHROMIUM .. " is missing: run scripts/install-deps")
    app = support.start_app("spec/fixtures/sse_browser", "--env test")
    local base = "http://127.0.0.1:" .. app.port
    local function report()
      local ok, r = pcall(json.decode, support.curl(base .. "/report"))
      return ok and type(r) == "table" and r or {}
    end
    profile = support.tmpdir() .. "/chromium-" .. math.random(1e9)
    os.execute(("%s --headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
      .. "--disable-background-networking --disable-component-update --disable-sync "
      .. "--user-data-dir=%s %s/ >%s.log 2>&1 &"):format(CHROMIUM, profile, base, profile))

    assert.is_true(eventually(function() return (report().opens or 0) >= 1 end),
                   "the page never opened its EventSource")
    for i = 1, 3 do support.curl("-X POST --data-binary note" .. i .. " " .. base .. "/say") end
    assert.is_true(eventually(function() return #(report().notes or {}) == 3 end))
    local before = report()
    assert.are.same({ "note1", "note2", "note3" }, before.notes)
    assert.is_truthy(before.last_id and before.last_id ~= "")

    -- The server ends the stream; what is said before the browser is back waits in the replay
    -- buffer and reaches it after its Last-Event-ID (the stream asked for a 200 ms retry).
    assert.are.equal("1", support.curl("-X POST " .. base .. "/close"))
    for i = 4, 5 do support.curl("-X POST --data-binary note" .. i .. " " .. base .. "/say") end
    assert.is_true(eventually(function() return (report().opens or 0) >= 2 end),
                   "the browser did not reconnect")
    assert.is_true(eventually(function() return #(report().notes or {}) == 5 end))
    support.curl("-X POST --data-binary note6 " .. base .. "/say")
    assert.is_true(eventually(function() return #(report().notes or {}) == 6 end))
    assert.are.same({ "note1", "note2", "note3", "note4", "note5", "note6" }, report().notes)
  end)
end)
