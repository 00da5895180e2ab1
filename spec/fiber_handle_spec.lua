-- Fiber handles (runtime/fiber.c): a fiber's struct is C memory; its Lua handle is made when
-- Lua first asks for one, and a handle outlives its fiber's struct when the fiber finished
-- with nothing left to read. The HTTP server's request fibers start without a handle.
local fibril = require "fibril"
local support = require "spec.support"
local core = require "fibril.core.fiber"

describe("a fiber's handle", function()
  it("answers for a fiber that finished with nothing to return, after its struct is recycled", function()
    local f = fibril.schedule(function() end)
    assert.are.equal(0, select("#", fibril.await(f)))
    for _ = 1, 50 do fibril.await(fibril.schedule(function() end)) end   -- reuse the structs
    assert.are.equal(0, select("#", fibril.await(f)))
    assert.are.same({ true }, { core.join(f) })
    assert.are.equal("done", f:status())
    assert.is_false(fibril.cancel(f))
    assert.is_false(core.wake(f))
    assert.matches("^fiber " .. f:id() .. " %(done%)$", tostring(f))
  end)

  it("keeps results and errors readable for as long as the handle lives", function()
    local ok_f = fibril.schedule(function() return "a", "b" end)
    local bad_f = fibril.schedule(function() error("boom") end)
    fibril.sleep(0)
    for _ = 1, 50 do fibril.await(fibril.schedule(function() end)) end
    assert.are.same({ "a", "b" }, { fibril.await(ok_f) })
    local ok, err = pcall(fibril.await, bad_f)
    assert.is_false(ok)
    assert.matches("boom", tostring(err))
    assert.are.equal("failed", bad_f:status())
  end)

  it("is one handle per fiber, made on first use inside a fiber that had none", function()
    local seen = {}
    local srv, port = support.http_server(function(_, res)
      local a, b = fibril.current(), fibril.current()
      seen[#seen + 1] = { same = rawequal(a, b), status = a:status(), id = a:id() }
      res:send(200, nil, tostring(a:id()))
    end)
    local sock = support.connect(port)
    for _ = 1, 3 do
      sock:write("GET / HTTP/1.1\r\nHost: t\r\n\r\n")
      assert.are.equal(200, support.read_response(sock).status)
    end
    sock:close()
    srv:close()
    assert.are.equal(3, #seen)
    for i = 1, 3 do
      assert.is_true(seen[i].same)
      assert.are.equal("running", seen[i].status)
    end
    assert.is_true(seen[1].id < seen[2].id and seen[2].id < seen[3].id)
  end)

  it("is not needed for a request fiber that fails: the server keeps serving", function()
    local srv, port = support.http_server(function(req, res)
      if req.path == "/fail" then
        res:send(200, nil, "sent, then")
        error("after the response")             -- the fiber fails; nobody can await it
      end
      res:send(200, nil, "fine")
    end)
    local refs = fibril.debug.live().refs
    for _ = 1, 5 do
      assert.are.equal("sent, then", support.raw(port, "GET /fail HTTP/1.1\r\nHost: t\r\n\r\n").body)
    end
    assert.are.equal("fine", support.raw(port, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").body)
    srv:close()
    fibril.sleep(0.05)
    assert.is_true(fibril.debug.live().refs <= refs + 2, "refs grew from " .. refs)
  end)
end)
