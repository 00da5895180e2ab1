/* http_client.h: HTTP/1.1 client connections for fibers (Lua module fibril.core.http_client,
 * wrapped by lua/fibril/http.lua). The connection struct stays opaque in http_client.c. */
#ifndef FB_HTTP_CLIENT_H
#define FB_HTTP_CLIENT_H

#include <lua.h>
#include <stddef.h>

/* Connections from uv_tcp_init until their handles are closed, and requests in flight (connects, writes not
 * yet called back): both return to 0 when nothing leaks. */
size_t fb_http_client_live_handles(void);
size_t fb_http_client_live_requests(void);

int luaopen_fibril_core_http_client(lua_State *L);

#endif
