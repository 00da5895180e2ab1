--- fibril.task: deferred tasks of their own (not tied to an event): a class made with
--- `Task:extend("Name")` in APP/tasks/, its `perform(args)` run in the background by
--- lua/fibril/deferred.lua, durably, with retries. docs/deferred.md.
---
---   local T = Task:extend("SendDigest")
---   T.retries, T.backoff = 5, { min = 10, max = 600 }
---   function T:perform(args) ... end    -- self.task_id, self.attempt
---   T:enqueue({ account = 7 }, { delay = 30 })
local type, error, setmetatable, getmetatable, tostring, format =
      type, error, setmetatable, getmetatable, tostring, string.format

local Task = {}
Task.__index = Task

local registry = {}     -- name -> class: the latest definition wins (a code reload)

--- Makes a task class; name is how the journal names it, so keep it stable.
---@param name string
---@return table the class
function Task:extend(name)
  if type(name) ~= "string" or not name:find("^[%a_][%w_%.]*$") then
    error("Task:extend: the name must be letters, digits, _ and dots, got " .. tostring(name), 2)
  end
  local T = setmetatable({}, self)
  T.__index = T
  T.name = name
  registry[name] = T
  return T
end

--- The task class registered under name, or nil.
function Task.find(name) return registry[name] end

--- True when v is a task class.
function Task.is_task(v)
  if type(v) ~= "table" then return false end
  local mt = getmetatable(v)
  while mt do
    if mt == Task then return true end
    mt = getmetatable(mt)
  end
  return false
end

--- The work; subclasses override it. Raising fails this attempt (it is retried).
function Task:perform()
  error(format("task %s has no perform method", tostring(self.name)), 2)
end

--- Queues a run of this task with args (JSON values), durably.
---@param args table|nil
---@param opts table|nil { delay = s } | { delay_until = epoch seconds }; { tx = tx } (postgres);
---   { id = "..." }: an id of your own (an enqueue while that id is pending does nothing)
---@return string the task id
function Task:enqueue(args, opts)
  if self == Task or not Task.is_task(self) then error("enqueue: call it on a task class (T:enqueue)", 2) end
  if args ~= nil and type(args) ~= "table" then error(self.name .. ":enqueue: args must be a table", 2) end
  if opts ~= nil and type(opts) ~= "table" then error(self.name .. ":enqueue: opts must be a table", 2) end
  return require("fibril.deferred").enqueue_task(self, args or {}, opts)
end

--- Runs one stored task record t with class T (the deferred runner calls it).
function Task.run(T, t)
  local inst = setmetatable({ task_id = t.id, attempt = t.attempt }, T)
  return inst:perform(t.args or {})
end

return Task
