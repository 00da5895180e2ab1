-- spec/support.lua: helpers shared by specs: run the fibril binary as a child process and
-- write throw-away files. Child processes are awaited with a blocking popen: the child is a
-- separate process, so the spec only pauses its own loop while the child runs.
local M = {}

M.fibril = os.getenv("FIBRIL_BIN") or require("fibril.core.vm").executable()

local tmpdir, remover
function M.tmpdir()
  if not tmpdir then
    local p = io.popen("mktemp -d /tmp/fibril-spec.XXXXXX")
    tmpdir = p:read("*l")
    p:close()
    -- Removed when the Lua state closes (the end of `fibril test`).
    remover = newproxy(true)
    getmetatable(remover).__gc = function() os.execute("rm -rf '" .. tmpdir .. "'") end
  end
  return tmpdir
end

--- Writes content to a file under the spec temp dir and returns its path.
function M.write(name, content)
  local path = M.tmpdir() .. "/" .. name
  local dir = path:match("^(.*)/[^/]*$")
  os.execute("mkdir -p '" .. dir .. "'")
  local f = assert(io.open(path, "w"))
  f:write(content)
  f:close()
  return path
end

local function read_all(path)
  local f = io.open(path, "r")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

--- Runs `fibril ARGS` (a shell-quoted string); returns exit status, stdout, stderr.
function M.run(args)
  local out, err = M.tmpdir() .. "/run.out", M.tmpdir() .. "/run.err"
  local p = io.popen(("%s %s >%s 2>%s; echo $?"):format(M.fibril, args, out, err))
  local status = tonumber(p:read("*l"))
  p:close()
  return status, read_all(out), read_all(err)
end

--- Runs a Lua script given as a string in a fresh fibril process.
function M.run_script(source, args)
  local path = M.write("script_" .. tostring(os.time()) .. math.random(1e9) .. ".lua", source)
  return M.run("'" .. path .. "'" .. (args and (" " .. args) or ""))
end

--- Counts the non-overlapping occurrences of a plain string.
function M.count(haystack, needle)
  local n, i = 0, 1
  while true do
    local s, e = haystack:find(needle, i, true)
    if not s then return n end
    n, i = n + 1, e + 1
  end
end

return M
