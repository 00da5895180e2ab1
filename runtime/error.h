/* error.h: fibril error objects: tables {code=, message=, traceback=, fiber=} sharing one
 * metatable whose __tostring gives the message and the traceback (docs/fibers.md, "Errors"). */
#ifndef FB_ERROR_H
#define FB_ERROR_H

#include <lua.h>
#include <stddef.h>

#define FB_ERROR_MT "fibril.error"

void fb_error_init(lua_State *L);
/* Pushes a new error object; code may be NULL (a plain error). */
void fb_error_push(lua_State *L, const char *code, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
/* With any error value on L's top, pushes and returns "message\ntraceback" (never raises;
 * the error value stays below it). */
const char *fb_error_describe(lua_State *L, size_t *len);

#endif
