/* inflate.h: streaming gzip/deflate decoding for the HTTP client (Lua module
 * fibril.core.inflate), present only when fibril is built with zlib (FIBRIL_HAVE_ZLIB). */
#ifndef FB_INFLATE_H
#define FB_INFLATE_H

#include <lua.h>

int luaopen_fibril_core_inflate(lua_State *L);

#endif
