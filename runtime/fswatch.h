/* fswatch.h: recursive directory watching on inotify for the code reloader (Lua module
 * fibril.core.fswatch). The watcher struct stays opaque in fswatch.c. */
#ifndef FB_FSWATCH_H
#define FB_FSWATCH_H

#include <lua.h>
#include <stddef.h>

/* libuv handles owned by watchers (one uv_fs_event_t per directory, one timer per watcher)
 * until their close callback: returns to its baseline when nothing leaks. */
size_t fb_fswatch_live_handles(void);

int luaopen_fibril_core_fswatch(lua_State *L);

#endif
