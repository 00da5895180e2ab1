return function(r)
  r:get("/poll", "chat#poll")     -- ?after=ID: the messages after ID, or the next one (25 s)
  r:post("/say", "chat#say")      -- the body is the message
end
