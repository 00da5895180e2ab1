return function(r)
  r:post("/jobs", "jobs#create")              -- the producer over HTTP: RPUSH one job
  r:get("/stats", "jobs#stats")               -- queue length and deliveries so far
  r:post("/deliver", "deliveries#create")     -- the endpoint the consumer sends jobs to
end
