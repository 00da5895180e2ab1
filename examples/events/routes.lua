return function(r)
  r:post("/orders/:id", "orders#create")
end
