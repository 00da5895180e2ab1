/* yieldcheck.h: clear errors for a suspension attempted where LuaJIT cannot yield. */
#ifndef FB_YIELDCHECK_H
#define FB_YIELDCHECK_H

#include <lua.h>

/* Pushes "file:line: " of the innermost application frame (outside fibril's lua/), or "". */
void fb_push_app_where(lua_State *L);
/* Raises "<who>: cannot suspend while loading module 'x' (...)" or the like. */
int fb_raise_cannot_suspend(lua_State *L, const char *who);

#endif
