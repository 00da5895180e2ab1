/* fiber_internal.h: what fiber.c (the scheduler, a fiber's lifecycle) and fiber_api.c (the
 * Lua API, fibril.core.fiber) share: the fiber struct, the one scheduler's state and the
 * helpers both use. Nothing else includes it: other modules go through fiber.h. */
#ifndef FB_FIBER_INTERNAL_H
#define FB_FIBER_INTERNAL_H

#include <lua.h>
#include <stdint.h>
#include <uv.h>

#include "fiber.h"

typedef enum {
  FS_SCHEDULED,   /* created and queued, never resumed */
  FS_READY,       /* queued with values to resume with */
  FS_RUNNING,
  FS_SUSPENDED,
  FS_DONE,
  FS_FAILED
} fiber_state_t;

typedef enum { W_NONE, W_SLEEP, W_JOIN, W_PARK, W_OP, W_FOREVER } wait_kind_t;

#define FIBER_MAGIC 0x66696272u   /* "fibr": tells a fiber handle from other userdata */

/* A fiber's handle. f is NULL once the fiber finished with nothing a handle could read
 * (no results, no error): its struct is then recycled and the handle answers from id. */
typedef struct {
  unsigned magic;
  fb_fiber_t *f;
  uint64_t id;
} fiber_box_t;

struct fb_fiber_s {
  fiber_box_t *box;       /* the handle, or NULL while Lua has never asked for one */
  lua_State *co;          /* NULL once nothing on its stack is needed any more */
  int co_ref;             /* anchor slot of co while alive and, once done, of its results;
                             released in fiber_finish() (no results) or fiber_gc() */
  int self_ref;           /* anchor slot of the handle (when there is one) while alive;
                             released in fiber_finish() only */
  int err_ref;            /* FS_FAILED: anchor slot of the error object; fiber_gc() only */
  int ctx_ref;            /* anchor slot of the unit-of-work context table (executor), shared
                             with the fibers it schedules; released in fiber_finish() */
  uint64_t id;
  uint8_t state, wait;
  uint8_t cancel_pending; /* raise "cancelled" at the next suspension point */
  uint8_t err_observed;   /* an await saw the error: no "never awaited" report */
  uint8_t is_main;
  int nargs;              /* values on co's stack for the next resume */
  const char *wait_who;   /* API name of the current wait, for timeout and deadlock messages:
                             a static string, or park_who */
  char park_who[40];      /* the name a Lua-level wait (channel, semaphore) gave park() */
  double wait_timeout;
  fb_fiber_t *target;     /* W_JOIN: the fiber awaited */
  fb_fiber_t *joiners;    /* fibers awaiting this one, linked through join_next/join_prev */
  fb_fiber_t *join_next, *join_prev;
  uv_timer_t *timer;      /* created on first timed wait; closed in fiber_finish() */
  fb_fiber_t *live_next, *live_prev;   /* S.live while alive; S.free_fibers once recycled */
  fb_fiber_cancel_cb on_cancel;
  void *on_cancel_data;
  fb_fiber_done_cb on_done;
  uint64_t done_arg;
};

/* The one scheduler (S in fiber.c and fiber_api.c). */
typedef struct {
  lua_State *L;           /* the main state: builds error objects, owns the registry */
  uv_loop_t *loop;
  uv_check_t check;       /* drains the ready queue after each poll */
  uv_idle_t idle;         /* active while the queue is non-empty, so poll does not block */
  fb_fiber_t **q;         /* ready queue: ring buffer, capacity a power of two */
  size_t qhead, qlen, qcap;
  fb_fiber_t *current;
  fb_fiber_t *main;
  int main_finished;
  int exit_requested, exit_code;
  uint64_t next_id;
  int mt_ref;             /* handle metatable: no __gc, so collecting a handle that holds
                             nothing costs no finalizer call */
  int mt_gc_ref;          /* the same with __gc: set at finish on handles holding results or
                             an error (refs to release, an unobserved error to report) */
  fb_fiber_t *live;       /* every live fiber (live_next/live_prev): closed at shutdown */
  size_t live_fibers, live_handles;
  /* Coroutines of fibers that returned nothing, kept anchored for the next fiber: LuaJIT
   * resumes a finished coroutine afresh when a new function is pushed on it, and reuse saves
   * a lua_newthread and its collection per fiber (one per HTTP request). */
  lua_State *pool[256];
  int pool_ref[256];
  int npool;
  fb_fiber_t *free_fibers;   /* recycled structs (at most FREE_FIBERS_MAX), linked by live_next */
  size_t nfree_fibers;
  fb_close_hook close_hooks[16];   /* fb_sched_on_close, run by the close sentinel's __gc */
  int nclose_hooks;
} fb_sched_t;

extern fb_sched_t fb_sched;

/* fiber.c */
void fb_fiber_timer_ensure(lua_State *L, fb_fiber_t *f);
double fb_fiber_opt_timeout(lua_State *L, int idx, const char *who);
fiber_box_t *fb_fiber_check_box(lua_State *L, int idx, const char *who);
fb_fiber_t *fb_fiber_check_handle(lua_State *L, int idx, const char *who);
void fb_fiber_push_handle(lua_State *L, fb_fiber_t *f);
void fb_fiber_push_results(lua_State *L, fb_fiber_t *t, int k);
int fb_fiber_result_count(fb_fiber_t *t);
void fb_fiber_release_finished(lua_State *L, fb_fiber_t *f);
void fb_fiber_free(fb_fiber_t *f);

/* fiber_api.c: the handle metatables (S.mt_ref, S.mt_gc_ref) and os.exit, at fb_sched_init */
void fb_fiber_api_init(lua_State *L);

#endif
