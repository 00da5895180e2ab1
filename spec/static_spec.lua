-- Static files from APP/public/ (lua/fibril/static.lua on runtime/fs.c) through a real server
-- on 127.0.0.1: types, validators and 304s, ranges, HEAD, index.html, streaming a large file,
-- and every way out of public/ refused.
local fibril = require "fibril"
local fs = require "fibril.core.fs"
local support = require "spec.support"

local SECRET = "TOP-SECRET-OUTSIDE-PUBLIC"
local BIG_LINES = 327680                  -- 16-byte lines: 5 MiB

local big
local function big_content()
  if not big then
    local lines = {}
    for i = 0, BIG_LINES - 1 do lines[#lines + 1] = ("%015d\n"):format(i) end
    big = table.concat(lines)
  end
  return big
end

local function live()
  local fds, requests = fs.live()
  return fds .. "/" .. requests
end

local function settled(baseline) return support.settled(live, baseline) end

local TYPES = {
  ["index.html"] = "text/html; charset=utf-8", ["app.css"] = "text/css; charset=utf-8",
  ["app.js"] = "text/javascript; charset=utf-8", ["mod.mjs"] = "text/javascript; charset=utf-8",
  ["data.json"] = "application/json", ["notes.txt"] = "text/plain; charset=utf-8",
  ["logo.svg"] = "image/svg+xml", ["img.png"] = "image/png", ["a.jpg"] = "image/jpeg",
  ["b.JPEG"] = "image/jpeg", ["anim.gif"] = "image/gif", ["pic.webp"] = "image/webp",
  ["favicon.ico"] = "image/x-icon", ["mod.wasm"] = "application/wasm", ["f.woff"] = "font/woff",
  ["f.woff2"] = "font/woff2", ["doc.pdf"] = "application/pdf", ["app.js.map"] = "application/json",
  ["feed.xml"] = "application/xml", ["blob.bin"] = "application/octet-stream",
  ["noext"] = "application/octet-stream",
}

-- The throw-away app: routes (/dyn), a controller, public/ with files of every type, a
-- hidden file, a secret next to public/ and links pointing at it.
local function make_app()
  support.write("static_app/routes.lua", 'return function(r) r:get("/dyn", "home#index") end\n')
  support.write("static_app/controllers/home.lua", [[
local C = require("fibril.controller"):extend()
function C:index() self:render{ text = "dynamic" } end
return C
]])
  for name in pairs(TYPES) do
    support.write("static_app/public/" .. name, name == "index.html" and "<h1>home</h1>" or name)
  end
  support.write("static_app/public/digits.txt", ("0123456789"):rep(10))
  support.write("static_app/public/sub/index.html", "<h1>sub</h1>")
  support.write("static_app/public/sub/deep.txt", "deep")
  support.write("static_app/public/nodir/x.txt", "x")
  support.write("static_app/public/.env", "SECRET=" .. SECRET)
  support.write("static_app/public/empty.txt", "")
  support.write("static_app/public/big.bin", big_content())
  support.write("static_app/secret.txt", SECRET)
  local dir = support.tmpdir() .. "/static_app"
  os.execute(("ln -s ../secret.txt '%s/public/leak.txt'"):format(dir))
  os.execute(("ln -s '%s/secret.txt' '%s/public/abs-leak.txt'"):format(dir, dir))
  os.execute(("ln -s .. '%s/public/up'"):format(dir))
  os.execute(("ln -s notes.txt '%s/public/alias.txt'"):format(dir))
  os.execute(("ln -s .env '%s/public/env.txt'"):format(dir))
  return dir
end

local function get(port, path, headers, method)
  local lines = { (method or "GET") .. " " .. path .. " HTTP/1.1", "Host: t" }
  for k, v in pairs(headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  return (support.raw(port, table.concat(lines, "\r\n") .. "\r\n\r\n", method == "HEAD"))
end

describe("static files from APP/public/", function()
  local dir, srv, port, baseline
  setup(function()
    dir = make_app()
    package.loaded["controllers.home"] = nil  -- another spec's app may have loaded its own
    local app = require("fibril.app").load(dir, "test")
    srv, port = support.http_server(require("fibril.server").handler(app), { tokens = true })
    baseline = settled(live())
  end)
  teardown(function() srv:close() end)

  it("serves each file with the Content-Type of its extension", function()
    for name, ctype in pairs(TYPES) do
      local res = get(port, "/" .. name)
      assert.are.equal(200, res.status, name)
      assert.are.equal(ctype, res.headers["content-type"], name)
      assert.are.equal(name == "index.html" and "<h1>home</h1>" or name, res.body)
    end
  end)

  it("sends validators and Accept-Ranges, and serves an empty file", function()
    local res = get(port, "/notes.txt")
    assert.matches('^"%x+%-%x+%-%x+"$', res.headers["etag"])
    assert.matches("^%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d GMT$", res.headers["last-modified"])
    assert.are.equal("bytes", res.headers["accept-ranges"])
    assert.are.equal("nosniff", res.headers["x-content-type-options"])
    assert.are.equal("9", res.headers["content-length"])
    res = get(port, "/empty.txt")
    assert.are.equal(200, res.status)
    assert.are.equal("0", res.headers["content-length"])
    assert.are.equal("", res.body)
  end)

  it("answers 304 to a matching If-None-Match, weak or in a list, and 200 otherwise", function()
    local etag = get(port, "/app.css").headers["etag"]
    local res = get(port, "/app.css", { ["If-None-Match"] = etag })
    assert.are.equal(304, res.status)
    assert.are.equal("", res.body)
    assert.are.equal(etag, res.headers["etag"])
    assert.are.equal(304, get(port, "/app.css", { ["If-None-Match"] = '"x", W/' .. etag }).status)
    assert.are.equal(304, get(port, "/app.css", { ["If-None-Match"] = "*" }).status)
    assert.are.equal(200, get(port, "/app.css", { ["If-None-Match"] = '"other"' }).status)
    -- If-None-Match wins over If-Modified-Since
    local lm = get(port, "/app.css").headers["last-modified"]
    assert.are.equal(200, get(port, "/app.css", { ["If-None-Match"] = '"other"',
                                                  ["If-Modified-Since"] = lm }).status)
  end)

  it("answers 304 to If-Modified-Since at or after the file's time, and 200 before", function()
    local lm = get(port, "/app.js").headers["last-modified"]
    local res = get(port, "/app.js", { ["If-Modified-Since"] = lm })
    assert.are.equal(304, res.status)
    assert.are.equal(lm, res.headers["last-modified"])
    local function since(date) return get(port, "/app.js", { ["If-Modified-Since"] = date }).status end
    assert.are.equal(200, since("Sun, 06 Nov 1994 08:49:37 GMT"))
    assert.are.equal(304, since("Fri, 01 Jan 2100 00:00:00 GMT"))
    assert.are.equal(304, since("Friday, 01-Jan-60 00:00:00 GMT"))   -- RFC 850: 2060
    assert.are.equal(304, since("Thu Jan  1 00:00:00 2099"))          -- asctime
    assert.are.equal(200, since("yesterday"))
  end)

  it("answers a byte range with 206 and Content-Range", function()
    local res = get(port, "/digits.txt", { Range = "bytes=0-9" })
    assert.are.equal(206, res.status)
    assert.are.equal("0123456789", res.body)
    assert.are.equal("bytes 0-9/100", res.headers["content-range"])
    assert.are.equal("10", res.headers["content-length"])
    res = get(port, "/digits.txt", { Range = "bytes=95-" })
    assert.are.equal("56789", res.body)
    assert.are.equal("bytes 95-99/100", res.headers["content-range"])
    res = get(port, "/digits.txt", { Range = "bytes=90-1000" })
    assert.are.equal("bytes 90-99/100", res.headers["content-range"])
  end)

  it("answers a suffix range with the last n bytes", function()
    local res = get(port, "/digits.txt", { Range = "bytes=-3" })
    assert.are.equal(206, res.status)
    assert.are.equal("789", res.body)
    assert.are.equal("bytes 97-99/100", res.headers["content-range"])
    res = get(port, "/digits.txt", { Range = "bytes=-500" })
    assert.are.equal("bytes 0-99/100", res.headers["content-range"])
    assert.are.equal(100, #res.body)
  end)

  it("answers 416 with bytes */size to an unsatisfiable range", function()
    local res = get(port, "/digits.txt", { Range = "bytes=100-" })
    assert.are.equal(416, res.status)
    assert.are.equal("bytes */100", res.headers["content-range"])
    assert.are.equal(416, get(port, "/digits.txt", { Range = "bytes=-0" }).status)
    assert.are.equal(416, get(port, "/empty.txt", { Range = "bytes=0-" }).status)
  end)

  it("ignores multiple, malformed, non-byte and stale (If-Range) ranges: 200 in full", function()
    for _, r in ipairs({ "bytes=0-1,5-6", "bytes=5-2", "bytes=x-y", "items=0-1" }) do
      local res = get(port, "/digits.txt", { Range = r })
      assert.are.equal(200, res.status, r)
      assert.are.equal(100, #res.body, r)
      assert.is_nil(res.headers["content-range"], r)
    end
    local etag = get(port, "/digits.txt").headers["etag"]
    assert.are.equal(200, get(port, "/digits.txt", { Range = "bytes=0-1", ["If-Range"] = '"old"' }).status)
    assert.are.equal(206, get(port, "/digits.txt", { Range = "bytes=0-1", ["If-Range"] = etag }).status)
  end)

  it("answers HEAD with GET's headers and no body, on a connection that stays usable", function()
    local res, sock = support.raw(port, "HEAD /digits.txt HTTP/1.1\r\nHost: t\r\n\r\n", true)
    assert.are.equal(200, res.status)
    assert.are.equal("100", res.headers["content-length"])
    assert.are.equal("text/plain; charset=utf-8", res.headers["content-type"])
    sock:write("HEAD /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    res = support.read_response(sock, true)
    assert.are.equal(200, res.status)
    assert.is_not_nil(res.headers["etag"])
    sock:write("GET /notes.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("notes.txt", support.read_response(sock).body)
    sock:close()
  end)

  it("serves index.html for a path ending in / and redirects a directory without it", function()
    assert.are.equal("<h1>home</h1>", get(port, "/").body)
    local res = get(port, "/sub/")
    assert.are.equal(200, res.status)
    assert.are.equal("<h1>sub</h1>", res.body)
    res = get(port, "/sub?a=1")
    assert.are.equal(301, res.status)
    assert.are.equal("/sub/?a=1", res.headers["location"])
    assert.are.equal(404, get(port, "/nodir/").status)   -- no index.html: the router's 404
    assert.are.equal(404, get(port, "/nodir").status)
    assert.are.equal("deep", get(port, "/sub/deep.txt").body)
    assert.are.equal(404, get(port, "/notes.txt/").status)
  end)

  it("streams a 5 MiB file byte for byte", function()
    local res = get(port, "/big.bin")
    assert.are.equal(200, res.status)
    assert.is_nil(res.headers["transfer-encoding"])
    assert.are.equal(tostring(5 * 1024 * 1024), res.headers["content-length"])
    assert.are.equal(5 * 1024 * 1024, #res.body)
    assert.is_true(res.body == big_content())
    res = get(port, "/big.bin", { Range = "bytes=1048576-3145727" })
    assert.are.equal(206, res.status)
    assert.are.equal("bytes 1048576-3145727/5242880", res.headers["content-range"])
    assert.is_true(res.body == big_content():sub(1048577, 3145728))
  end)

  it("keeps memory flat while a client is slow to read a large file", function()
    local sock = support.connect(port)
    sock:write("GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    assert.are.equal("HTTP/1.1 200 OK", sock:read_line({ timeout = 5 }))
    collectgarbage()
    local before = collectgarbage("count")
    fibril.sleep(0.3)                        -- the server writes until backpressure stops it
    collectgarbage()
    assert.is_true(collectgarbage("count") - before < 1024, "Lua heap grew by over 1 MiB")
    sock:close()                             -- gone mid-body: the file must still be closed
    assert.are.equal(baseline, settled(baseline))
  end)

  it("never leaves public/: traversal, encodings, NUL, backslash, hidden files, links", function()
    local attacks = {
      "/../secret.txt", "/sub/../../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E/secret.txt",
      "/sub/%2e%2e/%2e%2e/secret.txt", "/%252e%252e/secret.txt", "/..%2fsecret.txt",
      "/..%2Fsecret.txt", "/sub%2fdeep.txt", "/%2fetc/passwd", "/..%5csecret.txt",
      "/sub%5c..%5c..%5csecret.txt", "/notes.txt%00.png", "/.env", "/%2eenv", "/sub/./deep.txt",
      "/./notes.txt", "//notes.txt", "/sub//deep.txt", "/leak.txt", "/abs-leak.txt",
      "/up/secret.txt", "/env.txt", "/notes.txt%", "/notes.txt%zz",
      "/%25%32%65%25%32%65/secret.txt",
    }
    for _, path in ipairs(attacks) do
      local res = get(port, path)
      assert.are.equal(404, res.status, path)
      assert.is_nil(res.body:find(SECRET, 1, true), path)
    end
    local res = get(port, "/sub\\..\\..\\secret.txt")   -- raw backslash
    assert.is_true(res.status == 404 or res.status == 400)
    assert.is_nil(res.body:find(SECRET, 1, true))
  end)

  it("serves a link whose target is inside public/, judged by where it lands", function()
    assert.are.equal("notes.txt", get(port, "/alias.txt").body)
    assert.are.equal("notes.txt", get(port, "/up/public/notes.txt").body)  -- up -> ..
  end)

  it("leaves routes to the router: non-files, POST to a file path", function()
    assert.are.equal("dynamic", get(port, "/dyn").body)
    local res = get(port, "/app.css", nil, "POST")
    assert.are.equal(404, res.status)
    assert.are_not.equal("app.css", res.body)
    assert.are.equal(405, get(port, "/dyn", nil, "POST").status)
    assert.are.equal(404, get(port, "/missing.css").status)
  end)

  it("sends a routed GET on without touching the disk, once public/ is known to lack its name", function()
    local calls, realpath, lstat = {}, fs.realpath, fs.lstat
    fs.realpath = function(p, ...) calls[#calls + 1] = "realpath " .. p; return realpath(p, ...) end
    fs.lstat = function(p, ...) calls[#calls + 1] = "lstat " .. p; return lstat(p, ...) end
    local ok, err = pcall(function()
      for _ = 1, 5 do assert.are.equal("dynamic", get(port, "/dyn").body) end
      assert.are.equal(404, get(port, "/dyn/more").status)
      -- a file under a name public/ has is still found
      assert.are.equal("deep", get(port, "/sub/deep.txt").body)
    end)
    fs.realpath, fs.lstat = realpath, lstat
    assert(ok, err)
    local dyn = 0
    for _, c in ipairs(calls) do if c:find("/dyn", 1, true) then dyn = dyn + 1 end end
    assert.is_true(dyn <= 2, table.concat(calls, "\n"))   -- one lstat, or two across a second
    -- a file added under a new top-level name is served once the second has passed
    support.write("static_app/public/fresh.txt", "fresh")
    local deadline = fibril.now() + 3
    while get(port, "/fresh.txt").status ~= 200 and fibril.now() < deadline do fibril.sleep(0.1) end
    assert.are.equal("fresh", get(port, "/fresh.txt").body)
  end)

  it("closes every file it opened", function()
    assert.are.equal(baseline, settled(baseline))
  end)
end)

describe("static files seen by curl", function()
  it("serves a file, a range and a 304 to an independent client", function()
    local dir = support.tmpdir() .. "/static_app"
    if not io.open(dir .. "/routes.lua") then make_app() end
    local h = support.start_app(dir, "--env test")
    local base = "http://127.0.0.1:" .. h.port
    local ok, err = pcall(function()
      local out = support.curl("-i " .. base .. "/app.css")
      assert.matches("^HTTP/1.1 200 OK\r\n", out)
      assert.matches("\r\n[Cc]ontent%-[Tt]ype: text/css; charset=utf%-8\r\n", out)
      assert.matches("\r\n\r\napp%.css$", out)
      local etag = out:match("\r\n[Ee][Tt]ag: (\"[^\"]+\")\r\n")
      assert.is_not_nil(etag)
      local code = support.curl(("-o /dev/null -w '%%{http_code}' -H 'If-None-Match: %s' %s/app.css")
                                :format(etag, base))
      assert.are.equal("304", code)
      assert.are.equal("3456", support.curl("-r 3-6 " .. base .. "/digits.txt"))
      assert.is_true(support.curl(base .. "/big.bin") == big_content())
      assert.are.equal("404", support.curl("--path-as-is -o /dev/null -w '%{http_code}' "
                                           .. base .. "/../secret.txt"))
    end)
    h.stop()
    assert.is_true(h.wait_exit(10))
    if not ok then error(err, 0) end
    assert.is_nil(h.log():find("Sanitizer", 1, true), h.log())   -- under make test SANITIZE=1
  end)
end)
