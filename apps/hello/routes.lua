return function(r)
  r:get("/hello", "bench#hello")
  r:get("/json", "bench#json")
end
