/* pg.h: PostgreSQL connections for fibers on libpq's asynchronous API and a uv_poll on
 * PQsocket (Lua module fibril.core.pg, wrapped by lua/fibril/pg.lua). The struct stays
 * opaque in pg.c; pg_result.c turns PGresults into Lua values for it. */
#ifndef FB_PG_H
#define FB_PG_H

#include <lua.h>
#include <stddef.h>

typedef struct fb_pg_s fb_pg_t;

/* Connection structs plus poll handles, and operations in flight (queries, connects,
 * cancel requests on the thread pool): all return to 0 when nothing leaks. */
size_t fb_pg_live_conns(void);
size_t fb_pg_live_requests(void);

int luaopen_fibril_core_pg(lua_State *L);

#endif
