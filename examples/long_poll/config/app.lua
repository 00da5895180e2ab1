-- Long polling keeps the last 100 messages per channel, so a client that comes back with the
-- id it saw last gets what it missed at once.
return {
  development = { sse = { replay = 100 } },
  test = { sse = { replay = 100 }, log = { access = false } },
  production = { sse = { replay = 100 } },
}
