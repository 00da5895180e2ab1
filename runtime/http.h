/* http.h: the HTTP/1.1 server (llhttp on libuv) as Lua module fibril.core.http. */
#ifndef FB_HTTP_H
#define FB_HTTP_H

#include <lua.h>
#include <uv.h>

void fb_http_init(lua_State *L, uv_loop_t *loop);
/* Before lua_close: flushes the access log and closes the server's own handles. */
void fb_http_shutdown(void);
int luaopen_fibril_core_http(lua_State *L);

#endif
