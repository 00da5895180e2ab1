return function(r)
  r:get("/hello", "bench#hello")
  r:get("/json", "bench#json")
  r:get("/sse", "stream#sse")
  r:get("/channel/:name", "stream#channel")
  r:get("/sleep", "db#sleep")   -- pg_sleep(0.1) through the pool (needs DATABASE_URL)
end
