/* main.c: the command line only. Each command builds a VM and runs one main fiber. */
#include <errno.h>
#include <lauxlib.h>
#include <luajit.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <uv.h>

#include "fiber.h"
#include "vm.h"

static void usage(FILE *out) {
  fprintf(out,
          "usage: fibril run APP [--host H] [--port P] [--workers N] [--env E]\n"
          "                                   serve an app directory over HTTP\n"
          "       fibril routes APP           print the app's route table\n"
          "       fibril events APP           print the event -> subscriber tree\n"
          "       fibril deferred APP [list|retry ID|retry-all]\n"
          "                                   list or retry dead deferred tasks\n"
          "       fibril new NAME             create a new app directory\n"
          "       fibril FILE.lua [ARGS...]   run a script as the main fiber, loop included\n"
          "       fibril test [PATH...]       run busted specs inside the runtime (default: spec)\n"
          "       fibril version              print the version\n"
          "       fibril help                 print this help\n");
}

static int run_script(const char *exe, const char *path, int argc, char **argv) {
  uv_loop_t *loop = uv_default_loop();
  lua_State *L;
  int i, status;
  struct stat st;

  if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) {
    fprintf(stderr, "fibril: cannot open %s: %s\n", path,
            errno && !S_ISREG(st.st_mode) ? strerror(errno ? errno : EISDIR) : "not a file");
    return 2;
  }
  L = fb_vm_new(loop);
  fb_vm_set_arg(L, exe, path, argc, argv);
  if (luaL_loadfile(L, path) != 0) {
    fprintf(stderr, "fibril: %s\n", lua_tostring(L, -1));
    fb_vm_close(L, loop);
    return 1;
  }
  luaL_checkstack(L, argc, "too many arguments");
  for (i = 0; i < argc; i++) lua_pushstring(L, argv[i]);
  status = fb_sched_run_main(L, argc);
  fb_vm_close(L, loop);
  return status;
}

/* `fibril test ...` runs lua/fibril/test.lua's main(args...) as the main fiber. */
static int run_module_main(const char *exe, const char *module, int argc, char **argv) {
  uv_loop_t *loop = uv_default_loop();
  lua_State *L = fb_vm_new(loop);
  int i, status;
  fb_vm_set_arg(L, exe, module, argc, argv);
  if (luaL_loadstring(L, "local m = require(...); return m.main(select(2, ...))") != 0) {
    fprintf(stderr, "fibril: %s\n", lua_tostring(L, -1));
    fb_vm_close(L, loop);
    return 1;
  }
  luaL_checkstack(L, argc + 1, "too many arguments");
  lua_pushstring(L, module);
  for (i = 0; i < argc; i++) lua_pushstring(L, argv[i]);
  status = fb_sched_run_main(L, argc + 1);
  fb_vm_close(L, loop);
  return status;
}

static int ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), m = strlen(suffix);
  return n >= m && strcmp(s + n - m, suffix) == 0;
}

int main(int argc, char **argv) {
  const char *cmd;
  struct stat st;

  signal(SIGPIPE, SIG_IGN);   /* a peer closing a socket is an error return, not a kill */
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  cmd = argv[1];
  if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
    printf("fibril %s (%s, libuv %s)\n", FIBRIL_VERSION, LUAJIT_VERSION, uv_version_string());
    return 0;
  }
  if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
    usage(stdout);
    return 0;
  }
  if (strcmp(cmd, "test") == 0) return run_module_main(argv[0], "fibril.test", argc - 2, argv + 2);
  if (strcmp(cmd, "run") == 0 || strcmp(cmd, "routes") == 0 || strcmp(cmd, "new") == 0 ||
      strcmp(cmd, "events") == 0 || strcmp(cmd, "deferred") == 0)
    return run_module_main(argv[0], "fibril.cli", argc - 1, argv + 1);
  if (ends_with(cmd, ".lua") || strchr(cmd, '/') || stat(cmd, &st) == 0)
    return run_script(argv[0], cmd, argc - 2, argv + 2);
  fprintf(stderr, "fibril: unknown command '%s' (see 'fibril help')\n", cmd);
  return 2;
}
