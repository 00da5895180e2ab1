/* vm.c: the Lua state. Finds the framework's Lua modules (the source tree for a build-tree
 * binary, PREFIX/share/fibril/lua once installed), adds Debian's and LuaRocks' Lua 5.1 paths,
 * and preloads each runtime C module as fibril.core.<name>. */
#include "vm.h"

#include <lauxlib.h>
#include <limits.h>
#include <lualib.h>
#include <luajit.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fiber.h"
#include "tcp.h"
#include "http.h"
#include "signals.h"
#include "process.h"
#include "fs.h"
#include "fswatch.h"
#include "journal.h"
#include "redis.h"
#include "pg.h"
#include "http_client.h"
#ifdef FIBRIL_HAVE_ZLIB
#include "inflate.h"
#endif

#define SYSTEM_LUA_PATH                                                                  \
  "/usr/local/share/lua/5.1/?.lua;/usr/local/share/lua/5.1/?/init.lua;"                   \
  "/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua"
#define SYSTEM_LUA_CPATH                                                                 \
  "/usr/local/lib/lua/5.1/?.so;/usr/lib/" FIBRIL_MULTIARCH "/lua/5.1/?.so;"               \
  "/usr/lib/lua/5.1/?.so"

static char lua_dir[PATH_MAX + 64];

static void dirname_inplace(char *p) {
  char *slash = strrchr(p, '/');
  if (slash && slash != p) *slash = '\0';
  else if (slash) slash[1] = '\0';
}

/* FIBRIL_LUA_DIR wins; a binary in the build directory uses the source tree's lua/; an
 * installed one PREFIX/share/fibril/lua, PREFIX being two levels above PREFIX/bin/fibril. */
static const char *find_lua_dir(void) {
  char exe[PATH_MAX], real[PATH_MAX], build[PATH_MAX];
  size_t n = sizeof exe;
  const char *env = getenv("FIBRIL_LUA_DIR");

  if (env && *env) {
    snprintf(lua_dir, sizeof lua_dir, "%s", env);
    return lua_dir;
  }
  if (uv_exepath(exe, &n) != 0 || !realpath(exe, real)) {
    snprintf(lua_dir, sizeof lua_dir, "%s", FIBRIL_SOURCE_LUA_DIR);
    return lua_dir;
  }
  dirname_inplace(real);
  if (realpath(FIBRIL_BUILD_DIR, build) && strcmp(real, build) == 0) {
    snprintf(lua_dir, sizeof lua_dir, "%s", FIBRIL_SOURCE_LUA_DIR);
  } else {
    dirname_inplace(real);
    snprintf(lua_dir, sizeof lua_dir, "%s/%s", real, FIBRIL_LUA_INSTALL_RELDIR);
  }
  return lua_dir;
}

const char *fb_vm_lua_dir(void) { return lua_dir; }

static void set_paths(lua_State *L) {
  const char *dir = find_lua_dir();
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "path");               /* stack: package path */
  lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s;" SYSTEM_LUA_PATH, dir, dir,
                  lua_tostring(L, -1));
  lua_setfield(L, -3, "path");
  lua_pop(L, 1);
  lua_getfield(L, -1, "cpath");
  lua_pushfstring(L, "%s;" SYSTEM_LUA_CPATH, lua_tostring(L, -1));
  lua_setfield(L, -3, "cpath");
  lua_pop(L, 2);
}

static void preload(lua_State *L, const char *name, lua_CFunction open) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, open);
  lua_setfield(L, -2, name);
  lua_pop(L, 2);
}

static int l_vm_executable(lua_State *L) {
  char exe[PATH_MAX];
  size_t n = sizeof exe;
  if (uv_exepath(exe, &n) != 0) return 0;
  lua_pushlstring(L, exe, n);
  return 1;
}

int luaopen_fibril_core_vm(lua_State *L) {
  lua_newtable(L);
  lua_pushcfunction(L, l_vm_executable);
  lua_setfield(L, -2, "executable");
  lua_pushstring(L, FIBRIL_VERSION);
  lua_setfield(L, -2, "version");
  lua_pushstring(L, lua_dir);
  lua_setfield(L, -2, "lua_dir");
  return 1;
}

lua_State *fb_vm_new(uv_loop_t *loop) {
  lua_State *L = luaL_newstate();
  if (!L) {
    fprintf(stderr, "fibril: cannot create the Lua state (out of memory)\n");
    exit(1);
  }
  luaL_openlibs(L);
  set_paths(L);
  preload(L, "fibril.core.vm", luaopen_fibril_core_vm);
  preload(L, "fibril.core.fiber", luaopen_fibril_core_fiber);
  preload(L, "fibril.core.tcp", luaopen_fibril_core_tcp);
  preload(L, "fibril.core.http", luaopen_fibril_core_http);
  preload(L, "fibril.core.signal", luaopen_fibril_core_signal);
  preload(L, "fibril.core.process", luaopen_fibril_core_process);
  preload(L, "fibril.core.fs", luaopen_fibril_core_fs);
  preload(L, "fibril.core.fswatch", luaopen_fibril_core_fswatch);
  preload(L, "fibril.core.journal", luaopen_fibril_core_journal);
  preload(L, "fibril.core.redis", luaopen_fibril_core_redis);
  preload(L, "fibril.core.pg", luaopen_fibril_core_pg);
  preload(L, "fibril.core.http_client", luaopen_fibril_core_http_client);
#ifdef FIBRIL_HAVE_ZLIB
  preload(L, "fibril.core.inflate", luaopen_fibril_core_inflate);
#endif
  fb_sched_init(L, loop);
  fb_http_init(L, loop);
  return L;
}

void fb_vm_set_arg(lua_State *L, const char *exe, const char *script, int argc, char **argv) {
  int i;
  lua_createtable(L, argc, 2);
  lua_pushstring(L, exe);
  lua_rawseti(L, -2, -1);
  lua_pushstring(L, script);
  lua_rawseti(L, -2, 0);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setglobal(L, "arg");
}

void fb_vm_close(lua_State *L, uv_loop_t *loop) {
  fb_sched_shutdown();
  fb_http_shutdown();
  lua_close(L);         /* runs every __gc: handles close, unobserved fiber errors report */
  fb_sched_close();
  if (uv_loop_close(loop) != 0) {
    /* A handle outlived its owner: say which, for the leak hunt, rather than abort. */
    fprintf(stderr, "fibril: warning: libuv handles still open at exit:\n");
    uv_print_all_handles(loop, stderr);
  }
}
