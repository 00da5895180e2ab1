/* inflate.c: streaming gzip and zlib-wrapped deflate decoding with a cap on the output of
 * each call, so a small compressed body cannot expand into gigabytes (a "zip bomb"). */
#include "inflate.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define INFLATE_MT "fibril.inflate"

typedef struct {
  z_stream z;
  int open, ended;
} inflater_t;

/* new() -> inflater (gzip or zlib header, detected). */
static int l_new(lua_State *L) {
  inflater_t *d = lua_newuserdata(L, sizeof *d);
  memset(d, 0, sizeof *d);
  luaL_getmetatable(L, INFLATE_MT);
  lua_setmetatable(L, -2);
  if (inflateInit2(&d->z, 15 + 32) != Z_OK) return luaL_error(L, "inflate: out of memory");
  d->open = 1;
  return 1;
}

/* feed(d, data, limit) -> decoded (at most limit bytes), ended | nil, msg. */
static int l_feed(lua_State *L) {
  inflater_t *d = luaL_checkudata(L, 1, INFLATE_MT);
  size_t len, limit = (size_t)luaL_checknumber(L, 3);
  const char *data = luaL_checklstring(L, 2, &len);   /* borrowed while on the stack */
  luaL_Buffer b;
  if (!d->open) return luaL_error(L, "inflate: stream is closed");
  luaL_buffinit(L, &b);
  d->z.next_in = (Bytef *)data;
  d->z.avail_in = (uInt)len;
  while (!d->ended) {
    char out[LUAL_BUFFERSIZE];
    size_t got;
    int rc;
    d->z.next_out = (Bytef *)out;
    d->z.avail_out = sizeof out;
    rc = inflate(&d->z, Z_NO_FLUSH);
    got = sizeof out - d->z.avail_out;
    if (rc == Z_STREAM_END) d->ended = 1;
    else if (rc != Z_OK && rc != Z_BUF_ERROR) {
      lua_pushnil(L);
      lua_pushfstring(L, "invalid compressed body: %s", d->z.msg ? d->z.msg : "corrupt data");
      return 2;
    }
    if (got > limit) {
      lua_pushnil(L);
      lua_pushliteral(L, "decoded body is over max_body");
      return 2;
    }
    limit -= got;
    luaL_addlstring(&b, out, got);
    /* Done with this input once it is all taken and inflate had room to spare. */
    if (d->z.avail_in == 0 && d->z.avail_out != 0) break;
    if (got == 0 && rc == Z_BUF_ERROR) break;
  }
  luaL_pushresult(&b);
  lua_pushboolean(L, d->ended);
  return 2;
}

static int l_close(lua_State *L) {
  inflater_t *d = luaL_checkudata(L, 1, INFLATE_MT);
  if (d->open) inflateEnd(&d->z);
  d->open = 0;
  return 0;
}

int luaopen_fibril_core_inflate(lua_State *L) {
  static const luaL_Reg methods[] = { { "feed", l_feed }, { "close", l_close }, { NULL, NULL } };
  lua_newtable(L);
  lua_pushcfunction(L, l_new);
  lua_setfield(L, -2, "new");
  if (luaL_newmetatable(L, INFLATE_MT)) {
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_close);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  return 1;
}
