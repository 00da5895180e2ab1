-- The test services that scripts/with-services starts for `make test`: real servers, reached
-- over real sockets (the Redis and Postgres client specs build on them).
local tcp = require "fibril.tcp"

local function host_port(url)
  local authority = url:match("^%a+://([^/]*)")
  authority = authority:match("@(.*)$") or authority          -- drop user:password@
  local host, port = authority:match("^([^:]+):(%d+)$")
  return host, tonumber(port)
end

describe("the test services", function()
  local redis_url, database_url = os.getenv("REDIS_URL"), os.getenv("DATABASE_URL")

  it("include a Redis server that answers PING", function()
    assert.is_string(redis_url, "REDIS_URL is not set: run the specs through scripts/with-services")
    local sock = tcp.connect(host_port(redis_url))
    sock:write("*1\r\n$4\r\nPING\r\n")
    assert.are.equal("+PONG", sock:read_line({ timeout = 2 }))
    sock:close()
  end)

  it("include a PostgreSQL server that speaks the protocol", function()
    assert.is_string(database_url, "DATABASE_URL is not set: run the specs through scripts/with-services")
    local sock = tcp.connect(host_port(database_url))
    -- SSLRequest: the server answers one byte, 'N' (no TLS here) or 'S'.
    sock:write("\0\0\0\8\4\210\22\47")
    local answer = sock:read_bytes(1, { timeout = 2 })
    assert.is_truthy(answer == "N" or answer == "S")
    sock:close()
  end)
end)
