-- bench/wrk_percentiles.lua: a wrk script (wrk -s) that prints one line of figures at the end:
-- rps, mean and the latency percentiles in microseconds, as key=value (bench/http_tail.sh).
-- luacheck: globals done
done = function(summary, latency)
  local parts = { ("rps=%.0f"):format(summary.requests / (summary.duration / 1e6)),
                  ("mean=%.0f"):format(latency.mean) }
  for _, p in ipairs({ 50, 75, 90, 99, 99.9 }) do
    parts[#parts + 1] = ("p%s=%d"):format(p, latency:percentile(p))
  end
  io.write(table.concat(parts, " "), "\n")
end
