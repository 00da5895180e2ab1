local Router = require "fibril.router"

-- The error message raised by fn, as text.
local function error_of(fn)
  local ok, err = pcall(fn)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

describe("fibril.router verbs", function()
  it("routes each verb to its own controller#action", function()
    local r = Router.new()
    r:get("/things", "things#list")
    r:post("/things", "things#make")
    r:put("/things", "things#replace")
    r:patch("/things", "things#change")
    r:delete("/things", "things#remove")
    r:options("/things", "things#describe")
    local want = { GET = "list", POST = "make", PUT = "replace", PATCH = "change",
                   DELETE = "remove", OPTIONS = "describe" }
    for method, action in pairs(want) do
      local route, params = r:match(method, "/things")
      assert.are.equal(method, route.method)
      assert.are.equal("things", route.controller)
      assert.are.equal(action, route.action)
      assert.are.equal("things#" .. action, route.target)
      assert.are.equal("/things", route.path)
      assert.are.same({}, params)
    end
  end)

  it("returns the route it defines, the same table match returns", function()
    local r = Router.new()
    local defined = r:get("/", "home#index")
    assert.are.equal(defined, (r:match("GET", "/")))
    assert.are.equal("home", defined.controller)
    assert.are.equal("index", defined.action)
  end)

  it("records the file and line where each route was defined", function()
    local r = Router.new()
    local line = debug.getinfo(1, "l").currentline + 1
    local route = r:get("/here", "here#show")
    assert.are.equal("spec/router_spec.lua:" .. line, route.where:match("spec/router_spec%.lua:%d+$"))
  end)
end)

describe("fibril.router params", function()
  it("captures a :param segment into params by name", function()
    local r = Router.new()
    r:get("/statuses/:id", "statuses#show")
    local route, params = r:match("GET", "/statuses/7")
    assert.are.equal("statuses#show", route.target)
    assert.are.same({ id = "7" }, params)
  end)

  it("captures several params, each with the name its own route gave it", function()
    local r = Router.new()
    r:get("/accounts/:account_id/statuses/:id", "statuses#show")
    r:delete("/accounts/:owner/statuses/:status", "statuses#destroy")
    local _, params = r:match("GET", "/accounts/3/statuses/44")
    assert.are.same({ account_id = "3", id = "44" }, params)
    _, params = r:match("DELETE", "/accounts/3/statuses/44")
    assert.are.same({ owner = "3", status = "44" }, params)
  end)

  it("does not match a :param against a missing segment", function()
    local r = Router.new()
    r:get("/statuses/:id", "statuses#show")
    assert.are.same({ nil, 404 }, { r:match("GET", "/statuses") })
    assert.are.same({ nil, 404 }, { r:match("GET", "/statuses/7/extra") })
  end)

  it("returns a fresh params table per match, and the read-only EMPTY one without params", function()
    local r = Router.new()
    r:get("/statuses/:id", "statuses#show")
    r:get("/about", "pages#about")
    local _, p1 = r:match("GET", "/statuses/1")
    local _, p2 = r:match("GET", "/statuses/1")
    assert.are_not.equal(p1, p2)
    local _, empty = r:match("GET", "/about")
    assert.are.equal(Router.EMPTY, empty)
    local _, decoded = r:match("GET", "/ab%6Fut")     -- found by walking the trie, not by path
    assert.are.equal(Router.EMPTY, decoded)
    assert.is_nil(next(empty))
    assert.matches("read%-only", error_of(function() empty.x = 1 end))
    assert.is_nil(rawget(Router.EMPTY, "x"))
  end)
end)

describe("fibril.router splat", function()
  it("captures the rest of the path, slashes included, into the splat's name", function()
    local r = Router.new()
    r:get("/files/*path", "files#show")
    local route, params = r:match("GET", "/files/docs/2026/report.pdf")
    assert.are.equal("files#show", route.target)
    assert.are.same({ path = "docs/2026/report.pdf" }, params)
    route, params = r:match("GET", "/files/one")
    assert.are.equal("files#show", route.target)
    assert.are.same({ path = "one" }, params)
  end)

  it("needs at least one segment for the splat", function()
    local r = Router.new()
    r:get("/files/*path", "files#show")
    assert.are.same({ nil, 404 }, { r:match("GET", "/files") })
    assert.are.same({ nil, 404 }, { r:match("GET", "/files/") })
  end)

  it("captures params before a splat as well", function()
    local r = Router.new()
    r:get("/repos/:repo/blob/*file", "blobs#show")
    local _, params = r:match("GET", "/repos/fibril/blob/lua/fibril/router.lua")
    assert.are.same({ repo = "fibril", file = "lua/fibril/router.lua" }, params)
  end)

  it("refuses a splat anywhere but the last segment", function()
    local r = Router.new()
    assert.matches("router_spec.lua:%d+: router: path \"/files/%*path/edit\": a splat %(%*path%) "
                   .. "must be the last segment", error_of(function() r:get("/files/*path/edit", "f#e") end))
  end)
end)

describe("fibril.router percent-decoding", function()
  it("decodes each param after splitting, so %2F stays inside its segment", function()
    local r = Router.new()
    r:get("/tags/:name", "tags#show")
    local route, params = r:match("GET", "/tags/a%2Fb")
    assert.are.equal("tags#show", route.target)
    assert.are.same({ name = "a/b" }, params)
    route, params = r:match("GET", "/tags/caf%C3%A9%20au%20lait")
    assert.are.equal("tags#show", route.target)
    assert.are.same({ name = "café au lait" }, params)
  end)

  it("keeps '+' as it is: it means a space only in form bodies and query strings", function()
    local r = Router.new()
    r:get("/tags/:name", "tags#show")
    local _, params = r:match("GET", "/tags/c++")
    assert.are.same({ name = "c++" }, params)
  end)

  it("decodes a splat, whose '/' separated segments come back joined by '/'", function()
    local r = Router.new()
    r:get("/files/*path", "files#show")
    local _, params = r:match("GET", "/files/my%20docs/a%2Bb.txt")
    assert.are.same({ path = "my docs/a+b.txt" }, params)
  end)

  it("matches static segments against the decoded text", function()
    local r = Router.new()
    r:get("/hello world", "pages#hello")
    r:get("/statuses", "statuses#index")
    assert.are.equal("pages#hello", (r:match("GET", "/hello%20world")).target)
    assert.are.equal("statuses#index", (r:match("GET", "/st%61tuses")).target)
  end)

  it("answers 404 for invalid percent-encoding, even where a param would match", function()
    local r = Router.new()
    r:get("/tags/:name", "tags#show")
    r:get("/files/*path", "files#show")
    for _, path in ipairs({ "/tags/%", "/tags/%2", "/tags/%zz", "/tags/a%g1", "/files/a/%2/b",
                            "/tags/%2?x" }) do
      assert.are.same({ nil, 404 }, { r:match("GET", path) }, path)
    end
  end)

  it("refuses '%' in a route path: routes are written decoded", function()
    local r = Router.new()
    assert.matches("must not contain '%?', '#' or '%%'",
                   error_of(function() r:get("/caf%C3%A9", "c#s") end))
  end)
end)

describe("fibril.router resources", function()
  local SEVEN = {
    { "GET", "/photos", "index" }, { "GET", "/photos/new", "new" }, { "POST", "/photos", "create" },
    { "GET", "/photos/:id", "show" }, { "GET", "/photos/:id/edit", "edit" },
    { "PATCH", "/photos/:id", "update" }, { "PUT", "/photos/:id", "update" },
    { "DELETE", "/photos/:id", "destroy" },
  }

  local function table_of(routes)
    local out = {}
    for i, route in ipairs(routes) do out[i] = { route.method, route.path, route.action } end
    return out
  end

  it("defines the seven Rails-style routes, update for both PATCH and PUT", function()
    local r = Router.new()
    local defined = r:resources("photos")
    assert.are.same(SEVEN, table_of(r:routes()))
    assert.are.same(SEVEN, table_of(defined))
    for _, route in ipairs(defined) do assert.are.equal("photos", route.controller) end
  end)

  it("matches each of them, with the id as a param", function()
    local r = Router.new()
    r:resources("photos")
    local function hit(method, path)
      local route, params = r:match(method, path)
      return route.action, params.id
    end
    assert.are.same({ "index" }, { hit("GET", "/photos") })
    assert.are.same({ "new" }, { hit("GET", "/photos/new") })
    assert.are.same({ "create" }, { hit("POST", "/photos") })
    assert.are.same({ "show", "12" }, { hit("GET", "/photos/12") })
    assert.are.same({ "edit", "12" }, { hit("GET", "/photos/12/edit") })
    assert.are.same({ "update", "12" }, { hit("PATCH", "/photos/12") })
    assert.are.same({ "update", "12" }, { hit("PUT", "/photos/12") })
    assert.are.same({ "destroy", "12" }, { hit("DELETE", "/photos/12") })
  end)

  it("defines only the actions listed in only", function()
    local r = Router.new()
    r:resources("photos", { only = { "show", "index" } })
    assert.are.same({ { "GET", "/photos", "index" }, { "GET", "/photos/:id", "show" } },
                    table_of(r:routes()))
    assert.are.same({ nil, 405, { "GET", "HEAD" } }, { r:match("POST", "/photos") })
  end)

  it("defines every action but those listed in except", function()
    local r = Router.new()
    r:resources("photos", { except = { "new", "edit", "update" } })
    assert.are.same({ { "GET", "/photos", "index" }, { "POST", "/photos", "create" },
                      { "GET", "/photos/:id", "show" }, { "DELETE", "/photos/:id", "destroy" } },
                    table_of(r:routes()))
    assert.are.same({ nil, 404 }, { r:match("GET", "/photos/1/edit") })
  end)

  it("raises naming the resource for an unknown action, option, or both only and except", function()
    local r = Router.new()
    assert.matches("router_spec.lua:%d+: router: resources photos: unknown action \"shw\"",
                   error_of(function() r:resources("photos", { only = { "shw" } }) end))
    assert.matches("resources photos: unknown option \"onyl\"",
                   error_of(function() r:resources("photos", { onyl = { "show" } }) end))
    assert.matches("resources photos: give only or except, not both",
                   error_of(function() r:resources("photos", { only = {}, except = {} }) end))
    assert.matches("resources name must be a word",
                   error_of(function() r:resources("/photos") end))
    assert.are.same({}, r:routes())
  end)
end)

describe("fibril.router HEAD", function()
  it("serves HEAD with the GET route", function()
    local r = Router.new()
    r:get("/statuses/:id", "statuses#show")
    local route, params = r:match("HEAD", "/statuses/5")
    assert.are.equal("GET", route.method)
    assert.are.equal("statuses#show", route.target)
    assert.are.same({ id = "5" }, params)
  end)

  it("does not serve HEAD where there is no GET route", function()
    local r = Router.new()
    r:post("/statuses", "statuses#create")
    assert.are.same({ nil, 405, { "POST" } }, { r:match("HEAD", "/statuses") })
  end)
end)

describe("fibril.router 404 and 405", function()
  it("answers 404 when no route has the path", function()
    local r = Router.new()
    r:get("/statuses/:id", "statuses#show")
    assert.are.same({ nil, 404 }, { r:match("GET", "/accounts/1") })
    assert.are.same({ nil, 404 }, { r:match("GET", "/") })
    assert.are.same({ nil, 404 }, { Router.new():match("GET", "/") })
  end)

  it("answers 404 for a path that does not start with '/'", function()
    local r = Router.new()
    r:get("/", "home#index")
    assert.are.same({ nil, 404 }, { r:match("GET", "") })
    assert.are.same({ nil, 404 }, { r:match("GET", "statuses") })
    assert.are.same({ nil, 404 }, { r:match("GET", "*") })
  end)

  it("answers 405 with the allowed methods when only the method is wrong", function()
    local r = Router.new()
    r:get("/statuses", "statuses#index")
    r:post("/statuses", "statuses#create")
    local route, status, allowed = r:match("DELETE", "/statuses")
    assert.is_nil(route)
    assert.are.equal(405, status)
    assert.are.same({ "GET", "HEAD", "POST" }, allowed)
  end)

  it("lists the methods of every route the path matches, across static and param routes", function()
    local r = Router.new()
    r:get("/photos/new", "photos#new")
    r:put("/photos/:id", "photos#update")
    r:post("/photos/*rest", "photos#deep")
    assert.are.same({ nil, 405, { "GET", "HEAD", "POST", "PUT" } }, { r:match("PATCH", "/photos/new") })
    assert.are.same({ nil, 405, { "POST", "PUT" } }, { r:match("GET", "/photos/3") })
  end)

  it("answers 405 to a method it has never heard of, and to OPTIONS without a route", function()
    local r = Router.new()
    r:get("/statuses", "statuses#index")
    assert.are.same({ nil, 405, { "GET", "HEAD" } }, { r:match("BREW", "/statuses") })
    assert.are.same({ nil, 405, { "GET", "HEAD" } }, { r:match("OPTIONS", "/statuses") })
    assert.are.same({ nil, 405, { "GET", "HEAD" } }, { r:match("get", "/statuses") })
  end)

  it("raises naming the argument when method or path is not a string", function()
    local r = Router.new()
    assert.matches("router_spec.lua:%d+: router: match: path must be a string, got nil",
                   error_of(function() r:match("GET") end))
    assert.matches("router: match: method must be a string, got number",
                   error_of(function() r:match(1, "/") end))
  end)
end)

describe("fibril.router path shapes", function()
  it("matches a path with one trailing slash as the path without it", function()
    local r = Router.new()
    r:get("/statuses/:id", "statuses#show")
    r:get("/about", "pages#about")
    local _, params = r:match("GET", "/statuses/7/")
    assert.are.same({ id = "7" }, params)
    assert.are.equal("pages#about", (r:match("GET", "/about/")).target)
    assert.are.same({ nil, 404 }, { r:match("GET", "/about//") })
    r:get("/files/*path", "files#show")
    _, params = r:match("GET", "/files/a/b/")
    assert.are.same({ path = "a/b" }, params)
  end)

  it("keeps the root as '/' and does not take '//' for it", function()
    local r = Router.new()
    r:get("/", "home#index")
    assert.are.equal("home#index", (r:match("GET", "/")).target)
    assert.are.same({ nil, 404 }, { r:match("GET", "//") })
  end)

  it("stores a route defined with a trailing slash under the path without it", function()
    local r = Router.new()
    local route = r:get("/about/", "pages#about")
    assert.are.equal("/about", route.path)
    assert.are.equal(route, (r:match("GET", "/about")))
  end)

  it("does not match paths with an empty segment", function()
    local r = Router.new()
    r:get("/a/b", "a#b")
    r:get("/a/:x", "a#x")
    r:get("/files/*path", "files#show")
    assert.are.same({ nil, 404 }, { r:match("GET", "/a//b") })
    assert.are.same({ nil, 404 }, { r:match("GET", "//a/b") })
    assert.are.same({ nil, 404 }, { r:match("GET", "/a//") })
    assert.are.same({ nil, 404 }, { r:match("GET", "/files/x//y") })
    assert.matches("has an empty segment", error_of(function() r:get("/a//c", "a#c") end))
  end)

  it("ignores a query string left on the path", function()
    local r = Router.new()
    r:get("/statuses/:id", "statuses#show")
    r:get("/about", "pages#about")
    local _, params = r:match("GET", "/statuses/7?include=replies//x%zz")
    assert.are.same({ id = "7" }, params)
    assert.are.equal("pages#about", (r:match("GET", "/about?")).target)
    assert.are.equal("pages#about", (r:match("GET", "/about/?a=b")).target)
  end)

  it("raises naming the path when it does not start with '/' or has a bad param name", function()
    local r = Router.new()
    assert.matches("router_spec.lua:%d+: router: path \"statuses\" must start with '/'",
                   error_of(function() r:get("statuses", "statuses#index") end))
    assert.matches("\"1x\" is not a valid parameter name",
                   error_of(function() r:get("/s/:1x", "s#s") end))
    assert.matches("uses the parameter \"id\" twice",
                   error_of(function() r:get("/s/:id/t/:id", "s#s") end))
    assert.matches("GET path must be a string, got nil", error_of(function() r:get(nil, "s#s") end))
  end)
end)

describe("fibril.router precedence", function()
  it("prefers a static segment to a :param, and a :param to a *splat", function()
    local r = Router.new()
    r:get("/photos/*rest", "photos#rest")
    r:get("/photos/:id", "photos#show")
    r:get("/photos/new", "photos#new")
    assert.are.equal("photos#new", (r:match("GET", "/photos/new")).target)
    assert.are.equal("photos#show", (r:match("GET", "/photos/9")).target)
    assert.are.equal("photos#rest", (r:match("GET", "/photos/9/comments")).target)
  end)

  it("backtracks to the :param branch when the static branch fails deeper", function()
    local r = Router.new()
    r:get("/users/new/avatar", "avatars#new")
    r:get("/users/:id/posts", "posts#index")
    local route, params = r:match("GET", "/users/new/posts")
    assert.are.equal("posts#index", route.target)
    assert.are.same({ id = "new" }, params)
    assert.are.equal("avatars#new", (r:match("GET", "/users/new/avatar")).target)
  end)

  it("backtracks to the *splat when both static and :param branches fail deeper", function()
    local r = Router.new()
    r:get("/a/b/c", "static#c")
    r:get("/a/:x/d", "param#d")
    r:get("/a/*rest", "splat#rest")
    assert.are.equal("static#c", (r:match("GET", "/a/b/c")).target)
    assert.are.equal("param#d", (r:match("GET", "/a/b/d")).target)
    local route, params = r:match("GET", "/a/b/e")
    assert.are.equal("splat#rest", route.target)
    assert.are.same({ rest = "b/e" }, params)
  end)

  it("leaves no params of a failed branch in the params of the branch that matched", function()
    local r = Router.new()
    r:get("/:a/:b/x", "one#x")
    r:get("/:c/*d", "two#rest")
    local route, params = r:match("GET", "/p/q/y")
    assert.are.equal("two#rest", route.target)
    assert.are.same({ c = "p", d = "q/y" }, params)
  end)

  it("backtracks when the static route has the path but not the method", function()
    local r = Router.new()
    r:resources("photos")
    local route, params = r:match("DELETE", "/photos/new")
    assert.are.equal("photos#destroy", route.target)
    assert.are.same({ id = "new" }, params)
  end)

  it("does not depend on definition order", function()
    local a, b = Router.new(), Router.new()
    a:get("/photos/new", "photos#new"); a:get("/photos/:id", "photos#show")
    b:get("/photos/:id", "photos#show"); b:get("/photos/new", "photos#new")
    assert.are.equal("photos#new", (a:match("GET", "/photos/new")).target)
    assert.are.equal("photos#new", (b:match("GET", "/photos/new")).target)
  end)
end)

describe("fibril.router definition errors", function()
  it("raises at the caller's line on a duplicate method and path, naming the first", function()
    local r = Router.new()
    local first_line = debug.getinfo(1, "l").currentline + 1
    r:get("/statuses/:id", "statuses#show")
    local err = error_of(function() r:get("/statuses/:id/", "other#show") end)
    assert.matches("^[^:]*router_spec.lua:%d+: router: GET /statuses/:id is already defined", err)
    assert.matches("%(spec/router_spec.lua:" .. first_line .. "%)$", err)
    r:post("/statuses/:id", "statuses#create")   -- another method is not a duplicate
  end)

  it("treats the same path with another param name as the same route", function()
    local r = Router.new()
    r:get("/statuses/:id", "statuses#show")
    assert.matches("router: GET /statuses/:key conflicts with GET /statuses/:id",
                   error_of(function() r:get("/statuses/:key", "statuses#find") end))
  end)

  it("raises naming a target without exactly one '#' or with an empty part", function()
    local r = Router.new()
    for _, bad in ipairs({ "statuses", "statuses#", "#show", "a#b#c", "", "#" }) do
      local err = error_of(function() r:get("/s", bad) end)
      assert.matches(("router_spec.lua:%%d+: router: GET /s: bad target %q"):format(bad):gsub("%-", "%%-"),
                     err)
    end
    assert.matches("target must be \"controller#action\" or a function, got number",
                   error_of(function() r:get("/s", 42) end))
    assert.are.same({}, r:routes())
  end)

  it("raises a clear error when a verb is called with a dot instead of a colon", function()
    local r = Router.new()
    assert.matches("router: call r:get%(...%) with a colon",
                   error_of(function() r.get("/s", "s#s") end))
  end)
end)

describe("fibril.router function targets", function()
  it("keeps a function target as route.handler, with no controller or action", function()
    local r = Router.new()
    local function health() return "ok" end
    r:get("/health/:probe", health)
    local route, params = r:match("GET", "/health/live")
    assert.are.equal(health, route.handler)
    assert.are.equal(health, route.target)
    assert.is_nil(route.controller)
    assert.is_nil(route.action)
    assert.are.same({ probe = "live" }, params)
    assert.matches("^function %(.*router_spec.lua:%d+%)$", Router.describe(route))
  end)

  it("leaves handler nil for a controller#action target", function()
    local r = Router.new()
    local route = r:get("/", "home#index")
    assert.is_nil(route.handler)
    assert.are.equal("home#index", Router.describe(route))
  end)
end)

describe("fibril.router routes and load", function()
  it("lists the routes in definition order", function()
    local r = Router.new()
    r:post("/z", "z#create")
    r:get("/a", "a#index")
    r:resources("m", { only = { "show" } })
    r:get("/", "home#index")
    local got = {}
    for i, route in ipairs(r:routes()) do
      got[i] = route.method .. " " .. route.path .. " " .. route.target
    end
    assert.are.same({ "POST /z z#create", "GET /a a#index", "GET /m/:id m#show", "GET / home#index" }, got)
  end)

  it("returns a new list each time, so a caller cannot change the router's", function()
    local r = Router.new()
    r:get("/a", "a#index")
    local list = r:routes()
    list[1] = nil
    assert.are.equal(1, #r:routes())
  end)

  it("builds a router from the function a routes.lua returns", function()
    local chunk = assert(loadstring([[
      return function(r)
        r:get("/", "home#index")
        r:resources("statuses", { only = { "show" } })
      end
    ]]))
    local r = Router.load(chunk())
    assert.are.equal(2, #r:routes())
    assert.are.equal("home#index", (r:match("GET", "/")).target)
    local _, params = r:match("GET", "/statuses/3")
    assert.are.same({ id = "3" }, params)
  end)

  it("lets an error in routes.lua name routes.lua's line", function()
    local chunk = assert(loadstring("return function(r)\n  r:get('/', 'home')\nend", "@routes.lua"))
    assert.matches("^routes.lua:2: router: GET /: bad target \"home\"",
                   error_of(function() Router.load(chunk()) end))
  end)

  it("refuses what is not a function", function()
    assert.matches("router_spec.lua:%d+: router: Router.load expects the function routes.lua "
                   .. "returns, got table",
                   error_of(function() Router.load({}) end))
  end)
end)

describe("fibril.router scale", function()
  it("matches the right route among 10,000, static and param mixed", function()
    local r = Router.new()
    for k = 1, 5000 do
      r:get("/s" .. k .. "/page", "static#p" .. k)
      r:get("/p" .. k .. "/:id/edit", "param#e" .. k)
    end
    assert.are.equal(10000, #r:routes())
    assert.are.equal("static#p4321", (r:match("GET", "/s4321/page")).target)
    local route, params = r:match("GET", "/p5000/77/edit")
    assert.are.equal("param#e5000", route.target)
    assert.are.same({ id = "77" }, params)
    assert.are.same({ nil, 404 }, { r:match("GET", "/p5001/77/edit") })
  end)
end)
