/* yieldcheck.c: says why a fiber cannot suspend here (inside require, a C callback such as
 * table.sort's comparator, or __gc) and what to do instead, rather than LuaJIT's bare
 * "attempt to yield across C-call boundary". Only runs on that error path. */
#include "yieldcheck.h"

#include <lauxlib.h>
#include <math.h>
#include <string.h>

#include "vm.h"

/* Pushes "file:line: " for the innermost frame of application code (a Lua frame outside
 * fibril's own lua/ tree), or "" when there is none. */
void fb_push_app_where(lua_State *L) {
  lua_Debug ar;
  const char *dir = fb_vm_lua_dir();
  size_t dlen = strlen(dir);
  int level;
  for (level = 1; lua_getstack(L, level, &ar); level++) {
    if (!lua_getinfo(L, "Sl", &ar) || ar.currentline <= 0) continue;
    if (ar.source[0] == '@' && strncmp(ar.source + 1, dir, dlen) == 0) continue;
    lua_pushfstring(L, "%s:%d: ", ar.short_src, ar.currentline);
    return;
  }
  lua_pushliteral(L, "");
}

/* With a function on top of L, pushes the name it has in the standard library ("table.sort")
 * or "?": a frame's own name is unknown when a C function called it (pcall(table.sort, ...)). */
static void push_library_name(lua_State *L) {
  static const char *libs[] = { "table", "string", "_G", "coroutine", "debug", "os", "io",
                                "math", NULL };
  int fn = lua_gettop(L), i;
  for (i = 0; libs[i]; i++) {
    lua_getglobal(L, libs[i]);               /* stack: fn lib */
    if (lua_type(L, -1) == LUA_TTABLE) {
      lua_pushnil(L);
      while (lua_next(L, fn + 1)) {          /* stack: fn lib key value */
        if (lua_rawequal(L, -1, fn) && lua_type(L, -2) == LUA_TSTRING) {
          if (strcmp(libs[i], "_G") == 0) lua_pushvalue(L, -2);
          else lua_pushfstring(L, "%s.%s", libs[i], lua_tostring(L, -2));
          lua_replace(L, fn + 1);            /* stack: fn name key value */
          lua_settop(L, fn + 1);             /* stack: fn name */
          return;
        }
        lua_pop(L, 1);
      }
    }
    lua_settop(L, fn);
  }
  lua_pushliteral(L, "?");
}

/* The module being loaded is the one require's table marks with a sentinel: a light userdata
 * in Lua 5.1; in this LuaJIT a value that reads back as a denormal number. */
static const char *loading_module(lua_State *L) {
  const char *mod = "?";
  lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");   /* require's own table, not package.loaded */
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    int t = lua_type(L, -1);
    lua_Number v = t == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
    if ((t == LUA_TLIGHTUSERDATA || (t == LUA_TNUMBER && v != 0 && fabs(v) < 1e-300)) &&
        lua_type(L, -2) == LUA_TSTRING)
      mod = lua_tostring(L, -2);                   /* anchored: the key stays in _LOADED */
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return mod;
}

/* Finds why L cannot yield here and raises an error that says what to do. */
int fb_raise_cannot_suspend(lua_State *L, const char *who) {
  lua_Debug ar;
  int level;
  fb_push_app_where(L);                      /* stack: where */
  for (level = 1; lua_getstack(L, level, &ar); level++) {
    if (!lua_getinfo(L, "Snf", &ar)) break;  /* stack: where fn */
    if (*ar.what == 'C') {
      int is_require;
      lua_getglobal(L, "require");
      is_require = lua_rawequal(L, -1, -2);
      lua_pop(L, 1);
      if (is_require) {
        lua_pushfstring(L, "%s: cannot suspend while loading module '%s' (move I/O into a "
                        "function that the module returns)", who, loading_module(L));
        lua_remove(L, -2);
        lua_concat(L, 2);
        return lua_error(L);
      }
      if (ar.name && (strcmp(ar.name, "pcall") == 0 || strcmp(ar.name, "xpcall") == 0)) {
        lua_pop(L, 1);
        continue;
      }
      push_library_name(L);                  /* stack: where fn name */
      if (strcmp(lua_tostring(L, -1), "pcall") == 0 || strcmp(lua_tostring(L, -1), "xpcall") == 0) {
        lua_pop(L, 2);
        continue;
      }
      lua_pushfstring(L, "%s: cannot suspend inside a callback called by the C function '%s' "
                      "(such as table.sort or string.gsub); collect the work first and do it "
                      "after that call returns", who, lua_tostring(L, -1));
      lua_remove(L, -2);
      lua_remove(L, -2);
      lua_concat(L, 2);
      return lua_error(L);
    }
    lua_pop(L, 1);
  }
  lua_pushfstring(L, "%s: cannot suspend here (inside a __gc metamethod or a callback of a "
                  "C library); schedule a fiber to do the work instead", who);
  lua_concat(L, 2);
  return lua_error(L);
}
