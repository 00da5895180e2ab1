/* vm.h: the Lua state: libraries, module paths, preloaded runtime modules, `arg`. */
#ifndef FB_VM_H
#define FB_VM_H

#include <lua.h>
#include <uv.h>

/* A new state with the standard libraries, fibril's module paths and the runtime's C
 * modules in package.preload, its scheduler bound to loop. Exits the process on OOM. */
lua_State *fb_vm_new(uv_loop_t *loop);
/* Sets the global `arg` as the lua binary does: arg[0] = script, arg[1..] = args,
 * arg[-1] = the fibril executable. */
void fb_vm_set_arg(lua_State *L, const char *exe, const char *script, int argc, char **argv);
/* Closes the state (finalizing every handle), then the scheduler and the loop. */
void fb_vm_close(lua_State *L, uv_loop_t *loop);

/* The directory of fibril's own Lua modules (lua/ of the source tree, or the installed one). */
const char *fb_vm_lua_dir(void);

int luaopen_fibril_core_vm(lua_State *L);

#endif
