/* fiber.h: fibers (Lua coroutines scheduled on the libuv loop) and the C API that suspends one.
 * Every I/O entry point in runtime/ follows the same three steps (see docs/architecture.md):
 *   fb_fiber_t *f = fb_fiber_check(L, "redis.call");   raises unless L may suspend
 *   op->fiber = f; fb_fiber_on_cancel(f, op_cancel, op);
 *   return fb_fiber_suspend(L, f, timeout);            yields; resumed via fb_fiber_ready()
 * A libuv callback never resumes a coroutine itself: it pushes the results onto
 * fb_fiber_thread(f) and calls fb_fiber_ready(f, nresults). */
#ifndef FB_FIBER_H
#define FB_FIBER_H

#include <lua.h>
#include <stdint.h>
#include <uv.h>

typedef struct fb_fiber_s fb_fiber_t;

/* Called when a suspended fiber is cancelled or its wait times out, before the scheduler
 * resumes it with (nil, err). The operation must detach (op->fiber = NULL) and may not
 * touch the fiber afterwards; its own libuv callback then only frees it. */
typedef void (*fb_fiber_cancel_cb)(fb_fiber_t *f, void *data);

void fb_sched_init(lua_State *L, uv_loop_t *loop);
/* Runs the function on top of L (below it nargs arguments) as the main fiber, then the loop
 * until nothing is pending or fibril.exit() is called. Returns the process exit status. */
int fb_sched_run_main(lua_State *L, int nargs);
/* Before lua_close: closes the timers of fibers still alive (they have no __gc). */
void fb_sched_shutdown(void);
/* After lua_close: closes the scheduler's own handles and frees its queue. */
void fb_sched_close(void);
uv_loop_t *fb_sched_loop(void);
/* Runs the ready fibers now, when called from a libuv callback (a no-op inside a fiber). */
void fb_sched_run_ready(void);

/* Creates a fiber running the function below nargs arguments on L's top (they are moved into
 * it) and pushes its handle; it starts on the next loop turn. Callable outside any fiber. */
fb_fiber_t *fb_fiber_spawn(lua_State *L, int nargs);
/* The same without a handle (none is made unless the fiber asks for fibril.current()): its
 * results are dropped, and an error it ends with is logged. The HTTP server's request fibers. */
fb_fiber_t *fb_fiber_start(lua_State *L, int nargs);

/* Called once when f finishes, however it ends (returned, raised, cancelled), before its
 * struct is recycled: the HTTP server checks that the request it ran was answered. */
typedef void (*fb_fiber_done_cb)(uint64_t arg);
void fb_fiber_on_done(fb_fiber_t *f, fb_fiber_done_cb cb, uint64_t arg);

/* Registers a function lua_close calls (once, in reverse order of registration) before any
 * fiber is freed: a module detaches the fibers its operations in flight point to, whose
 * callbacks, delivered by the loop run after lua_close, then only free. Registering the same
 * function again does nothing. For the modules' luaopen functions. */
typedef void (*fb_close_hook)(void);
void fb_sched_on_close(fb_close_hook hook);

/* Raises a clear Lua error unless L is the running fiber and may yield here; raises the
 * "cancelled" error when the fiber was cancelled since it last suspended. */
fb_fiber_t *fb_fiber_check(lua_State *L, const char *who);
void fb_fiber_on_cancel(fb_fiber_t *f, fb_fiber_cancel_cb cb, void *data);
/* Cancels f as fibril.cancel does: its current or next suspension raises "cancelled".
 * Returns 0 when f had already finished. */
int fb_fiber_cancel(fb_fiber_t *f);
/* Yields the fiber; timeout < 0 waits forever, else after timeout seconds it resumes with
 * (nil, err) where err.code == "timeout". Use as `return fb_fiber_suspend(L, f, t);`. */
int fb_fiber_suspend(lua_State *L, fb_fiber_t *f, double timeout);
/* Queues a suspended fiber to be resumed with the nresults values on top of its thread. */
void fb_fiber_ready(fb_fiber_t *f, int nresults);
lua_State *fb_fiber_thread(fb_fiber_t *f);

int luaopen_fibril_core_fiber(lua_State *L);

#endif
