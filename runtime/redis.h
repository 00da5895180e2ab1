/* redis.h: Redis connections for fibers on hiredis' async API and libuv adapter (Lua module
 * fibril.core.redis, wrapped by lua/fibril/redis.lua). The struct stays opaque in redis.c. */
#ifndef FB_REDIS_H
#define FB_REDIS_H

#include <lua.h>
#include <stddef.h>

typedef struct fb_redis_s fb_redis_t;

/* Connection structs from connect to free, adapter poll handles from attach to their close
 * callback, and commands (or pipelines) awaiting replies: all return to 0 when nothing leaks. */
size_t fb_redis_live_conns(void);
size_t fb_redis_live_requests(void);

int luaopen_fibril_core_redis(lua_State *L);

#endif
