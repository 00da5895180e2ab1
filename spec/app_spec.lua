-- Apps, controllers and the request path through a real server on 127.0.0.1, with the
-- fixture app in spec/fixtures/shop.
local fibril = require "fibril"
local json = require "fibril.json"
local App = require "fibril.app"
local server = require "fibril.server"
local support = require "spec.support"

local FIXTURE = "spec/fixtures/shop"

local function request(port, method, path, headers, body)
  local lines = { method .. " " .. path .. " HTTP/1.1", "Host: t" }
  for k, v in pairs(headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  if body then lines[#lines + 1] = "Content-Length: " .. #body end
  return (support.raw(port, table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")))
end

describe("an app served over HTTP", function()
  local srv, port
  setup(function()
    local app = App.load(FIXTURE, "test")
    srv = server.listen(app)              -- with the limits of the app's config
    port = srv:port()
  end)
  teardown(function() srv:close() end)

  it("routes to controller actions with path params", function()
    local res = request(port, "GET", "/items/1")
    assert.are.equal(200, res.status)
    assert.are.equal("application/json", res.headers["content-type"])
    assert.are.same({ id = "1", name = "lamp" }, json.decode(res.body))
  end)

  it("answers 404 for no route and 405 with Allow for a wrong method", function()
    assert.are.equal(404, request(port, "GET", "/nowhere").status)
    local res = request(port, "PUT", "/items")
    assert.are.equal(405, res.status)
    assert.are.equal("GET, HEAD, POST", res.headers["allow"])
  end)

  it("serves HEAD from the GET route, without a body", function()
    local res = support.raw(port, "HEAD /items/1 HTTP/1.1\r\nHost: t\r\n\r\n", true)
    assert.are.equal(200, res.status)
    assert.are.equal(tostring(#json.encode({ id = "1", name = "lamp" })), res.headers["content-length"])
  end)

  it("merges the query string into params, repeated keys as lists", function()
    local res = request(port, "GET", "/items?page=2&tag=a&tag=b%20c")
    assert.are.same({ count = 1, page = "2", tags = { "a", "b c" } }, json.decode(res.body))
  end)

  it("merges form and JSON bodies into params", function()
    local res = request(port, "POST", "/items", { ["Content-Type"] = "application/x-www-form-urlencoded" },
                        "name=desk+lamp&qty=3")
    assert.are.equal(201, res.status)
    assert.are.same({ name = "desk lamp", qty = "3" }, json.decode(res.body))
    res = request(port, "POST", "/items", { ["Content-Type"] = "application/json" }, '{"name":"chair","qty":2}')
    assert.are.same({ name = "chair", qty = 2 }, json.decode(res.body))
    res = request(port, "POST", "/items", { ["Content-Type"] = "application/json" }, "[1,2]")
    assert.are.same({ json = { 1, 2 } }, json.decode(res.body))
  end)

  it("answers 400 to a body it cannot parse", function()
    local res = request(port, "POST", "/items", { ["Content-Type"] = "application/json" }, '{"name":')
    assert.are.equal(400, res.status)
    assert.matches("invalid JSON body", res.body)
  end)

  it("applies the body limit of the app's config (413)", function()
    local res = request(port, "POST", "/items", { ["Content-Type"] = "text/plain" }, ("x"):rep(5000))
    assert.are.equal(413, res.status)
  end)

  it("runs before actions only where asked, and halts when one renders", function()
    local res = request(port, "GET", "/admin")
    assert.are.equal(401, res.status)
    assert.are.equal("no token", res.body)
    res = request(port, "GET", "/admin", { ["X-Token"] = "secret" })
    assert.are.equal("welcome", res.body)
  end)

  it("hands errors to rescue_from handlers", function()
    local res = request(port, "GET", "/items/404")
    assert.are.equal(404, res.status)
    assert.are.same({ error = "no item 404" }, json.decode(res.body))
    assert.are.equal(404, request(port, "GET", "/missing").status)
    -- What the action rendered before it failed is dropped whole, headers included.
    res = request(port, "GET", "/rendered-then-missing")
    assert.are.equal(404, res.status)
    assert.are.same({ error = "gone after rendering" }, json.decode(res.body))
    assert.matches("^application/json", res.headers["content-type"])
    assert.is_nil(res.headers["x-half"])
  end)

  it("answers an uncaught error with 500, the request id and, in test, the traceback", function()
    local res = request(port, "GET", "/boom", { ["X-Request-Id"] = "req-42" })
    assert.are.equal(500, res.status)
    assert.matches("Internal Server Error (request req-42)", res.body, 1, true)
    assert.matches("kaboom in the action", res.body, 1, true)
    assert.matches("stack traceback", res.body, 1, true)
    assert.are.equal(200, request(port, "GET", "/items/1").status)   -- still serving
  end)

  it("makes rendering twice an error that names the action", function()
    local res = request(port, "GET", "/twice")
    assert.are.equal(500, res.status)
    assert.matches("controller items#twice rendered twice", res.body, 1, true)
  end)

  it("answers 204 when an action renders nothing, and head(status) with no body", function()
    assert.are.equal(204, request(port, "GET", "/nothing").status)
    local res = request(port, "DELETE", "/items/1")
    assert.are.equal(204, res.status)
    assert.are.equal("", res.body)
  end)

  it("redirects", function()
    local res = request(port, "GET", "/redirect")
    assert.are.equal(303, res.status)
    assert.are.equal("/items", res.headers["location"])
  end)

  it("reads cookies and sets them", function()
    local res = request(port, "GET", "/cookies", { Cookie = "session=abc; other=%22x%22" })
    assert.are.same({ session = "abc", other = '"x"' }, json.decode(res.body))
    local set = res.headers["set-cookie"]
    assert.matches("seen=yes%%20please; Path=/; Max%-Age=60; HttpOnly; SameSite=Lax", set)
    assert.matches("theme=dark; Path=/; HttpOnly; SameSite=Lax", set)
  end)

  it("gives headers case-insensitively, the request id, the client address, and custom response headers", function()
    local res = request(port, "GET", "/headers", { ["User-Agent"] = "spec/1.0", ["X-Request-Id"] = "rid-7" })
    assert.are.same({ agent = "spec/1.0", lower = "spec/1.0", id = "rid-7", remote = "127.0.0.1" },
                    json.decode(res.body))
    assert.are.equal("yes", res.headers["x-custom"])
  end)

  it("makes a generated request id for req.id when read, the same the response names", function()
    local ids = {}
    for i = 1, 3 do
      local res = request(port, "GET", "/headers")
      local id = json.decode(res.body).id
      assert.matches("^%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x$", id)
      assert.are.equal(res.headers["x-request-id"], id)
      ids[i] = id
    end
    assert.are_not.equal(ids[1], ids[2])
    assert.are_not.equal(ids[2], ids[3])
  end)

  it("renders html with its content type", function()
    local res = request(port, "GET", "/html")
    assert.are.equal("text/html; charset=utf-8", res.headers["content-type"])
    assert.are.equal("<h1>hi</h1>", res.body)
  end)

  it("runs a route whose target is a function", function()
    assert.are.equal("fn 9 GET", request(port, "GET", "/fn/9").body)
  end)
end)

describe("an app in production", function()
  it("answers a 500 without leaking the error", function()
    local app = App.load(FIXTURE, "production")
    local srv, port = support.http_server(server.handler(app), { tokens = true })
    local res = request(port, "GET", "/boom", { ["X-Request-Id"] = "p-1" })
    assert.are.equal(500, res.status)
    assert.are.equal("Internal Server Error (request p-1)\n", res.body)
    srv:close()
  end)
end)

describe("booting an app", function()
  local function app_with(files)
    local dir = support.tmpdir() .. "/boot" .. math.random(1e9)
    for name, content in pairs(files) do support.write(dir:sub(#support.tmpdir() + 2) .. "/" .. name, content) end
    return dir
  end
  local ROUTES = 'return function(r) r:get("/", "home#index") end'

  local function boot_error(dir)
    local ok, err = pcall(App.load, dir, "test")
    assert.is_false(ok)
    assert.is_true(App.is_boot_error(err))
    return err.message
  end

  it("names the file and line of a syntax error in a controller", function()
    local dir = app_with({ ["routes.lua"] = ROUTES, ["controllers/home.lua"] = "local C = \nreturn C ==" })
    assert.matches("controllers/home.lua:%d+:", boot_error(dir))
  end)

  it("names a controller file that routes.lua needs and that does not exist", function()
    local dir = app_with({ ["routes.lua"] = ROUTES })
    assert.matches("names controller 'home' but .*controllers/home.lua does not exist", boot_error(dir))
  end)

  it("names an action that the controller lacks", function()
    local dir = app_with({ ["routes.lua"] = ROUTES, ["controllers/home.lua"] =
      "return require('fibril.controller'):extend()" })
    assert.matches("GET / %-> home#index, but controllers/home.lua has no action 'index'", boot_error(dir))
  end)

  it("names the file and line of an error in routes.lua", function()
    local dir = app_with({ ["routes.lua"] = "return function(r)\n r:get('/', 'nohash')\nend" })
    assert.matches("routes.lua:2:", boot_error(dir))
  end)

  it("names a misspelt config key", function()
    local dir = app_with({ ["routes.lua"] = ROUTES,
                           ["config/app.lua"] = "return { test = { http = { max_body_byte = 1 } } }" })
    assert.matches("unknown key 'http.max_body_byte'", boot_error(dir))
  end)

  it("refuses a directory that does not exist", function()
    assert.matches("no app directory at '/nonexistent/app'", boot_error("/nonexistent/app"))
  end)
end)

describe("fibril run", function()
  it("serves an app, logs one access line per request, and drains on SIGTERM", function()
    local h = support.start_app(FIXTURE, "--env development")
    local out = support.curl(("-i -H 'X-Request-Id: curl-1' http://127.0.0.1:%d/items/1"):format(h.port))
    assert.matches("HTTP/1.1 200 OK", out, 1, true)
    assert.matches('{"', out, 1, true)
    fibril.sleep(0.3)                                  -- the access log is flushed every 0.1 s
    assert.matches('level=info sub=http method=GET path="/items/1" status=200 bytes=%d+ ms=[%d.]+ req=curl%-1',
                   h.log())
    h.stop("TERM")
    assert.is_true(h.wait_exit(5))
    assert.matches('msg="draining"', h.log(), 1, true)
  end)

  it("takes http.body_deadline from config and logs a body past it", function()
    local dir = support.tmpdir() .. "/deadline" .. math.random(1e9)
    support.write(dir:sub(#support.tmpdir() + 2) .. "/routes.lua",
                  'return function(r) r:post("/", function(_, res) res:send(200, {}, "ok") end) end')
    support.write(dir:sub(#support.tmpdir() + 2) .. "/config/app.lua",
                  "return { test = { http = { body_timeout = 0.3, body_deadline = 0.4 } } }")
    local h = support.start_app(dir, "--env test")
    local sock = support.connect(h.port)
    sock:write("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
    local res
    fibril.schedule(function() res = support.read_response(sock) end)
    for _ = 1, 100 do
      if res then break end
      pcall(sock.write, sock, "x")          -- the server may have closed by now
      fibril.sleep(0.05)
    end
    assert.are.equal(408, res and res.status)
    sock:close()
    assert.matches("level=warn sub=http conn=%d+ reason=body_deadline status=408", h.log())
    h.stop("TERM")
    assert.is_true(h.wait_exit(5))
  end)

  it("says in one line that the port is in use, and exits non-zero", function()
    local srv, port = support.http_server(function(_, res) res:send(200, nil, "") end)
    local status, _, err = support.run(("run %s --port %d --env test"):format(FIXTURE, port))
    srv:close()
    assert.are.equal(1, status)
    assert.matches(("^fibril: http: cannot listen on 127.0.0.1:%d: address already in use\n$"):format(port), err)
  end)

  it("says in one line that the host is bad or the app is missing", function()
    local status, _, err = support.run(("run %s --host nonsense --port 0 --env test"):format(FIXTURE))
    assert.are.equal(1, status)
    assert.matches("^fibril: http: bad host 'nonsense'", err)
    status, _, err = support.run("run /nonexistent/app")
    assert.are.equal(1, status)
    assert.are.equal("fibril: no app directory at '/nonexistent/app'\n", err)
  end)

  it("prints the route table with fibril routes", function()
    local status, out = support.run("routes " .. FIXTURE)
    assert.are.equal(0, status)
    assert.matches("GET%s+/items/:id%s+items#show", out)
    assert.matches("DELETE%s+/items/:id%s+items#destroy", out)
  end)

  it("scaffolds a working app with fibril new", function()
    local dir = support.tmpdir() .. "/newapp"
    local status, out = support.run("new " .. dir)
    assert.are.equal(0, status)
    assert.matches("created", out)
    local h = support.start_app(dir, "--env test")
    assert.are.equal("Hello, ada!", support.curl(("http://127.0.0.1:%d/hello/ada"):format(h.port)))
    h.stop("TERM")
    assert.is_true(h.wait_exit(5))
    status = support.run("new " .. dir)
    assert.are.equal(1, status)
  end)
end)
