return function(r)
  r:get("/hello", "bench#hello")
  r:get("/json", "bench#json")
  r:get("/sse", "stream#sse")
  r:get("/channel/:name", "stream#channel")
end
