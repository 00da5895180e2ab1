/* fs.h: file system calls for fibers on libuv's thread pool (Lua module fibril.core.fs, used
 * by lua/fibril/static.lua). The open-file struct stays opaque in fs.c. */
#ifndef FB_FS_H
#define FB_FS_H

#include <lua.h>
#include <stddef.h>

typedef struct fb_fs_file_s fb_fs_file_t;

/* Descriptors from a successful open to the end of their close, and requests in flight
 * (including closes): both return to where they were when nothing leaks. */
size_t fb_fs_live_fds(void);
size_t fb_fs_live_requests(void);

int luaopen_fibril_core_fs(lua_State *L);

#endif
