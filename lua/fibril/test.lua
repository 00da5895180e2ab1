--- fibril.test: `fibril test [PATH...]` runs busted inside the runtime, in the main fiber, so
--- specs can sleep, await and talk to servers on the live loop.
local fibril = require "fibril"

local M = {}

-- busted.runner looks two frames up for the file that called it; calling it from a Lua
-- function of this file (not from pcall directly) makes it return instead of os.exit.
local function run_busted(runner, options)
  runner(options)
end

--- Runs busted over the given paths (default "spec") with busted's own flags accepted too.
---@return nothing; ends the process with 0 when every spec passed, 1 otherwise
function M.main(...)
  local args = { ... }
  local has_path = false
  for _, a in ipairs(args) do
    if a:sub(1, 1) ~= "-" then has_path = true end
  end
  if not has_path then args[#args + 1] = "spec" end
  local argv = { [0] = "fibril test" }
  for i, a in ipairs(args) do argv[i] = a end
  rawset(_G, "arg", argv)

  local ok_load, runner = pcall(require, "busted.runner")
  if not ok_load then
    io.stderr:write("fibril test: busted is not installed (Debian package lua-busted): ",
                    tostring(runner), "\n")
    fibril.exit(2)
  end
  local ok, err = pcall(run_busted, runner, { standalone = false })
  io.stdout:flush()
  if not ok and err ~= nil then
    io.stderr:write("fibril test: ", tostring(err), "\n")
  end
  fibril.exit(ok and 0 or 1)
end

return M
