local fibril = require "fibril"

describe("fibril.channel", function()
  it("passes values in FIFO order through a buffer", function()
    local ch = fibril.channel(3)
    ch:send(1); ch:send(2); ch:send(3)
    assert.are.equal(3, ch:count())
    assert.are.same({ 1, 2, 3 }, { ch:receive(), ch:receive(), ch:receive() })
  end)

  it("suspends a sender while the buffer is full until a receiver makes room", function()
    local ch = fibril.channel(1)
    ch:send("a")
    local sent_b = false
    local producer = fibril.schedule(function() ch:send("b"); sent_b = true end)
    fibril.sleep(0.02)
    assert.is_false(sent_b)
    assert.are.equal("a", ch:receive())
    assert.are.equal("b", ch:receive())
    fibril.await(producer)
    assert.is_true(sent_b)
  end)

  it("makes an unbuffered send wait for a receiver (rendezvous)", function()
    local ch = fibril.channel()
    local order = {}
    local producer = fibril.schedule(function()
      ch:send("x"); order[#order + 1] = "sent"
    end)
    fibril.sleep(0.01)
    order[#order + 1] = "receiving"
    assert.are.equal("x", ch:receive())
    fibril.await(producer)
    assert.are.same({ "receiving", "sent" }, order)
  end)

  it("works as a queue between one producer and several consumers", function()
    local ch = fibril.channel(4)
    local got, consumers = {}, {}
    for c = 1, 3 do
      consumers[c] = fibril.schedule(function()
        local n = 0
        for v in ch:iter() do got[v] = c; n = n + 1; fibril.sleep(0) end
        return n
      end)
    end
    for i = 1, 100 do ch:send(i) end
    ch:close()
    local a, b, c = fibril.await(consumers[1], consumers[2], consumers[3])
    assert.are.equal(100, a + b + c)
    for i = 1, 100 do assert.is_not_nil(got[i]) end
    assert.is_true(a > 0 and b > 0 and c > 0, "work not shared: " .. a .. "/" .. b .. "/" .. c)
  end)

  it("returns nil to receivers once closed and drained, and lets buffered values out", function()
    local ch = fibril.channel(2)
    ch:send(1)
    local waiting = fibril.channel()
    local r = fibril.schedule(function() return waiting:receive() end)
    fibril.sleep(0.01)
    waiting:close()
    assert.is_nil(fibril.await(r))
    ch:close()
    assert.are.equal(1, ch:receive())
    assert.is_nil(ch:receive())
  end)

  it("raises in senders, waiting or later, when the channel is closed", function()
    local ch = fibril.channel()
    local s = fibril.schedule(function() ch:send(1) end)
    fibril.sleep(0.01)
    ch:close()
    local ok, err = pcall(fibril.await, s)
    assert.is_false(ok)
    assert.matches("channel is closed", tostring(err))
    assert.has_error(function() ch:send(2) end, "channel:send: channel is closed")
  end)

  it("raises err.code == 'timeout' from receive and send past their timeout", function()
    local ch = fibril.channel(1)
    local t0 = fibril.now()
    local ok, err = pcall(ch.receive, ch, { timeout = 0.03 })
    assert.is_false(ok)
    assert.are.equal("timeout", err.code)
    assert.is_true(fibril.now() - t0 >= 0.025)
    ch:send(1)
    ok, err = pcall(ch.send, ch, 2, { timeout = 0.01 })
    assert.are.equal("timeout", err.code)
    -- the timed-out sender left nothing behind: only the first value is there
    assert.are.equal(1, ch:receive())
    assert.are.equal(0, ch:count())
  end)

  it("releases a receiver that is cancelled, and gives the next value to a live one", function()
    local ch = fibril.channel()
    local first = fibril.schedule(function() return ch:receive() end)
    local second = fibril.schedule(function() return ch:receive() end)
    fibril.sleep(0.01)
    first:cancel()
    ch:send("for the second")
    assert.are.equal("for the second", fibril.await(second))
    local ok, err = pcall(fibril.await, first)
    assert.are.equal("cancelled", err.code)
  end)

  it("does not grow when receives keep timing out", function()
    local ch = fibril.channel()
    for _ = 1, 50 do pcall(ch.receive, ch, { timeout = 0 }) end
    assert.is_true(ch.recvq.last - ch.recvq.first < 2)
  end)

  it("rejects nil values and bad capacities", function()
    local ch = fibril.channel(1)
    assert.has_error(function() ch:send(nil) end,
                     "channel:send: cannot send nil (nil marks a closed channel)")
    assert.has_error(function() fibril.channel(-1) end)
    assert.has_error(function() fibril.channel(1.5) end)
  end)
end)
