/* error.c: error objects that keep a failing fiber's traceback across await.
 * Built and read with raw accesses or under lua_pcall: an app's own error tables may have
 * metamethods that raise, and the scheduler runs outside any protected call. */
#include "error.h"

#include <lauxlib.h>
#include <stdarg.h>
#include <stdio.h>

void fb_error_push(lua_State *L, const char *code, const char *fmt, ...) {
  va_list ap;
  lua_createtable(L, 0, 4);                  /* stack: err */
  char msg[512];
  if (code) {
    lua_pushstring(L, code);
    lua_setfield(L, -2, "code");
  }
  va_start(ap, fmt);               /* vsnprintf: lua_pushvfstring knows no %g or %llu */
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  lua_pushstring(L, msg);
  lua_setfield(L, -2, "message");
  luaL_getmetatable(L, FB_ERROR_MT);
  lua_setmetatable(L, -2);
}

static int l_error_tostring(lua_State *L) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  lua_getfield(L, 1, "message");
  if (lua_isstring(L, -1)) luaL_addvalue(&b);
  else { lua_pop(L, 1); luaL_addstring(&b, "(error object)"); }
  lua_getfield(L, 1, "traceback");
  if (lua_isstring(L, -1)) {
    luaL_addchar(&b, '\n');
    luaL_addvalue(&b);
  } else lua_pop(L, 1);
  luaL_pushresult(&b);
  return 1;
}

/* describe(err) -> "message\ntraceback" for any error value; run under lua_pcall. */
static int l_error_describe(lua_State *L) {
  int ours = 0;
  if (lua_type(L, 1) != LUA_TTABLE) {
    lua_pushstring(L, lua_isstring(L, 1) ? lua_tostring(L, 1) : luaL_typename(L, 1));
    return 1;
  }
  if (lua_getmetatable(L, 1)) {              /* stack: err mt */
    luaL_getmetatable(L, FB_ERROR_MT);
    ours = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
  }
  if (ours) {                                /* its __tostring adds the traceback */
    luaL_callmeta(L, 1, "__tostring");
    return 1;
  }
  if (!luaL_callmeta(L, 1, "__tostring")) {
    lua_getfield(L, 1, "message");
    if (!lua_isstring(L, -1)) {
      lua_pop(L, 1);
      lua_pushliteral(L, "(error object without a message)");
    }
  }                                          /* stack: err msg */
  lua_getfield(L, 1, "traceback");
  if (lua_isstring(L, -1)) {
    lua_pushliteral(L, "\n");
    lua_insert(L, -2);
    lua_concat(L, 3);
  } else lua_pop(L, 1);
  return 1;
}

const char *fb_error_describe(lua_State *L, size_t *len) {
  lua_pushcfunction(L, l_error_describe);
  lua_pushvalue(L, -2);
  if (lua_pcall(L, 1, 1, 0) != 0 || !lua_isstring(L, -1)) {
    lua_pop(L, 1);
    lua_pushliteral(L, "(error while describing the error)");
  }
  return lua_tolstring(L, -1, len);
}

void fb_error_init(lua_State *L) {
  luaL_newmetatable(L, FB_ERROR_MT);
  lua_pushcfunction(L, l_error_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
}
