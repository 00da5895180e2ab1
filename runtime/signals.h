/* signals.h: POSIX signals delivered to fibers (Lua module fibril.core.signal). */
#ifndef FB_SIGNALS_H
#define FB_SIGNALS_H

#include <lua.h>

int luaopen_fibril_core_signal(lua_State *L);

#endif
