/* process.h: child processes for fibers, and a port reserved without listening
 * (Lua module fibril.core.process; lua/fibril/process.lua is its Lua face). */
#ifndef FB_PROCESS_H
#define FB_PROCESS_H

#include <lua.h>

int luaopen_fibril_core_process(lua_State *L);

#endif
