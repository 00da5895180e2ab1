-- C-level check of runtime/log.c's quoting, called through LuaJIT's FFI: the binary exports
-- its fb_* symbols (-Wl,--export-dynamic).
local ffi = require "ffi"

ffi.cdef [[ char *fb_log_quote(char *dst, size_t cap, const char *s, size_t len); ]]

local function quote(s, cap)
  cap = cap or 256
  local buf = ffi.new("char[?]", cap)
  return ffi.string(ffi.C.fb_log_quote(buf, cap, s, #s))
end

describe("fb_log_quote", function()
  it("quotes plain text", function()
    assert.are.equal('"hello world"', quote("hello world"))
  end)

  it("escapes quotes, backslashes, CR, LF, tabs and control bytes so a value stays on one line", function()
    assert.are.equal([["a\"b\\c\nd\re\tf\x00g\x7f"]], quote('a"b\\c\nd\re\tf\0g\127'))
  end)

  it("cuts a value that does not fit, never writing past the buffer", function()
    local out = quote(string.rep("x", 100), 16)
    assert.are.equal(15, #out)
    assert.are.equal('"xxxxxxxxxx..."', out)
    assert.are.equal("", quote("abc", 4))
  end)

  it("does not cut an escape sequence in half", function()
    local out = quote(string.rep("\n", 10), 12)
    assert.matches('^"[\\n]*%.%.%."$', out)
    assert.is_nil(out:find('\\"', 1, true))
  end)
end)
