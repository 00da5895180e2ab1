-- bench/router.lua: how route matching scales with the number of routes, printed, never asserted.
--   Routers of 10, 100, 1000 and 10000 routes, half static (/api/sK/page) and half with a
--   param (/api/pK/:id/edit). For each: matches per second for a hit on the last-defined route
--   (a param route), a hit on the last static route, and a miss (404, after walking the trie
--   twice: once for a route, once for the 405 check). The trie should keep the 10000-route
--   speed close to the 10-route speed (ratio near 1), where a list scan would fall 1000x.
-- Usage: fibril bench/router.lua [rounds]
local fibril = require "fibril"
local Router = require "fibril.router"

local rounds = tonumber(arg and arg[1]) or 5
local now = fibril.now
local SIZES = { 10, 100, 1000, 10000 }

local function median(t)
  table.sort(t)
  return t[math.ceil(#t / 2)]
end

local function build(n)
  local r = Router.new()
  local half = n / 2
  for k = 1, half do
    r:get("/api/s" .. k .. "/page", "static#page" .. k)
    r:get("/api/p" .. k .. "/:id/edit", "param#edit" .. k)
  end
  return r, ("/api/p%d/12345/edit"):format(half), ("/api/s%d/page"):format(half),
         ("/api/p%d/12345/nothing"):format(half)
end

-- Matches per second for one path: batches of 100,000 until at least 0.2 s have passed.
local function rate(r, method, path, want)
  local route, status = r:match(method, path)
  assert((route and route.target) == want or status == want, "bench setup: unexpected match")
  local n, t0 = 0, now()
  local elapsed
  repeat
    for _ = 1, 100000 do r:match(method, path) end
    n = n + 100000
    elapsed = now() - t0
  until elapsed >= 0.2
  return n / elapsed
end

local results = {}
for _, size in ipairs(SIZES) do
  local r, hit, static_hit, miss = build(size)
  local half = size / 2
  local h, s, m = {}, {}, {}
  for i = 1, rounds do
    collectgarbage()
    h[i] = rate(r, "GET", hit, "param#edit" .. half)
    s[i] = rate(r, "GET", static_hit, "static#page" .. half)
    m[i] = rate(r, "GET", miss, 404)
  end
  results[#results + 1] = { size = size, hit = median(h), static = median(s), miss = median(m) }
end

local function fmt(x) return ("%12.0f"):format(x) end
print(("route matching, matches/s, median of %d rounds (%s)"):format(rounds,
      jit and jit.version or _VERSION))
print(("%8s %12s %12s %12s"):format("routes", "param hit", "static hit", "miss (404)"))
for _, row in ipairs(results) do
  print(("%8d %s %s %s"):format(row.size, fmt(row.hit), fmt(row.static), fmt(row.miss)))
end
local first, last = results[1], results[#results]
print(("speed at %d routes / speed at %d routes: param hit %.2f, static hit %.2f, miss %.2f"):format(
      last.size, first.size, last.hit / first.hit, last.static / first.static, last.miss / first.miss))
