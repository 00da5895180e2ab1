-- bench/http_tail.lua: summarises bench/http_tail.sh's rounds. Each input line is
-- "TARGET key=value ..." (one wrk run); prints each target's medians, then each target's
-- p99 and req/s against the first target's in the same round (paired ratios: the noise of
-- this shared machine moves both sides of a pair alike).
--   fibril bench/http_tail.lua ROUNDS_FILE [BASE]   (BASE: the target paired against; default
--   "fibril" when there is one, else the first target in the file)
local rows, order = {}, {}
local path = assert(arg[1], "usage: fibril bench/http_tail.lua ROUNDS_FILE")
for line in io.lines(path) do
  local name, rest = line:match("^(%S+)%s+(.*)$")
  if name then
    local r = {}
    for k, v in rest:gmatch("([%w%.]+)=([%d%.]+)") do r[k] = tonumber(v) end
    if not rows[name] then rows[name] = {}; order[#order + 1] = name end
    table.insert(rows[name], r)
  end
end

local function median(list)
  table.sort(list)
  local n = #list
  if n == 0 then return 0 end
  return n % 2 == 1 and list[(n + 1) / 2] or (list[n / 2] + list[n / 2 + 1]) / 2
end

local function column(name, key)
  local out = {}
  for _, r in ipairs(rows[name]) do out[#out + 1] = r[key] end
  return out
end

print(("%-22s %6s %9s %7s %7s %7s %7s %8s"):format("target (medians)", "rounds", "req/s", "p50 us",
                                                    "p75 us", "p90 us", "p99 us", "p99.9 us"))
for _, name in ipairs(order) do
  print(("%-22s %6d %9.0f %7.0f %7.0f %7.0f %7.0f %8.0f"):format(name, #rows[name],
    median(column(name, "rps")), median(column(name, "p50")), median(column(name, "p75")),
    median(column(name, "p90")), median(column(name, "p99")), median(column(name, "p99.9"))))
end

local base = arg[2] or (rows.fibril and "fibril") or order[1]
print(("paired against %s, round by round (median ratio; rounds where the target's p99 was lower):")
      :format(base))
for _, name in ipairs(order) do
  if name == base then goto continue end
  local p99, rps, lower = {}, {}, 0
  for k, r in ipairs(rows[name]) do
    local b = rows[base][k]
    if b then
      p99[#p99 + 1] = r.p99 / b.p99
      rps[#rps + 1] = r.rps / b.rps
      if r.p99 < b.p99 then lower = lower + 1 end
    end
  end
  print(("  %-20s p99 %.2fx  req/s %.2fx  (p99 lower in %d of %d rounds)"):format(name,
        median(p99), median(rps), lower, #p99))
  ::continue::
end
