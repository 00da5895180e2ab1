-- luacheck configuration: the house style's "no globals" rule, checked by `make test`.
std = "luajit"
max_line_length = 110
-- `not (t >= 0)` is on purpose: unlike `t < 0` it also rejects NaN.
ignore = { "581" }
-- Specs often check err.code from `local ok, err = pcall(...)` and leave ok alone.
files["spec/"] = { std = "+busted", max_line_length = 120, ignore = { "211/ok", "311/ok", "231/ok" } }
-- Fixture controllers define actions that ignore self on purpose.
files["spec/fixtures/"] = { self = false, max_line_length = 120 }
-- A script's arguments: `arg` is set by the runtime as the lua binary sets it.
files["examples/"] = { read_globals = { "arg" } }
files["bench/"] = { read_globals = { "arg" } }
files["lua/fibril/test.lua"] = { globals = { "arg" } }
-- The exit spec sets a global on purpose: a handle still referenced when the process ends.
files["spec/cli_spec.lua"] = { ignore = { "KEEP" } }
