/* tcp.h: TCP client sockets for fibers (Lua module fibril.core.tcp, wrapped by
 * lua/fibril/tcp.lua). The socket struct stays opaque in tcp.c. */
#ifndef FB_TCP_H
#define FB_TCP_H

#include <lua.h>
#include <stddef.h>

typedef struct fb_tcp_s fb_tcp_t;

/* Sockets from uv_tcp_init to their close callback, and requests in flight (connects being
 * resolved or attempted, writes not yet called back): both return to 0 when nothing leaks. */
size_t fb_tcp_live_handles(void);
size_t fb_tcp_live_requests(void);

int luaopen_fibril_core_tcp(lua_State *L);

#endif
