/* fiber.c: fibers (coroutines anchored in the registry) and the one scheduler.
 * Only this file calls lua_resume, always from drain() at C-stack depth one: libuv callbacks
 * and wakers push values and enqueue (fb_fiber_ready), the check handle drains the queue.
 * A fiber is C memory (fb_fiber_t, recycled through a free list) that lives at least as long
 * as the fiber runs, so every pointer to a live fiber (queue, joiners, timer) is valid. Its
 * Lua handle is a small userdata (fiber_box_t) made when Lua first asks for it: fibers the
 * HTTP server starts for requests usually never get one, which saves a userdata (and its
 * share of the collector's atomic phase) per request. A finished fiber's struct outlives it
 * only while a handle can still read its results or error.
 * Values are anchored through runtime/anchor.c (table slots recycled by a C free list). */
#include "fiber.h"

#include <lauxlib.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "anchor.h"
#include "error.h"
#include "log.h"
#include "yieldcheck.h"

/* Resumes per loop turn before I/O gets a look in; high enough that schedule+await in a
 * tight loop pays for a poll only every few thousand fibers. */
#define DRAIN_BUDGET 8192

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

static struct {
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
} S;

#define FREE_FIBERS_MAX 1024

static void fiber_finish(fb_fiber_t *f, int ok);

/* ---- ready queue --------------------------------------------------------------------- */

static void on_idle(uv_idle_t *h) { (void)h; /* only keeps poll from blocking */ }

static void queue_push(fb_fiber_t *f) {
  if (S.qlen == S.qcap) {
    size_t ncap = S.qcap ? S.qcap * 2 : 1024, i;
    fb_fiber_t **nq = malloc(ncap * sizeof *nq);
    if (!nq) {
      fprintf(stderr, "fibril: out of memory growing the ready queue\n");
      abort();
    }
    for (i = 0; i < S.qlen; i++) nq[i] = S.q[(S.qhead + i) & (S.qcap - 1)];
    free(S.q);
    S.q = nq;
    S.qcap = ncap;
    S.qhead = 0;
  }
  S.q[(S.qhead + S.qlen) & (S.qcap - 1)] = f;
  if (S.qlen++ == 0) uv_idle_start(&S.idle, on_idle);
}

static fb_fiber_t *queue_pop(void) {
  fb_fiber_t *f = S.q[S.qhead];
  S.qhead = (S.qhead + 1) & (S.qcap - 1);
  S.qlen--;
  return f;
}

/* ---- timers: one per fiber, for sleeps and wait deadlines ---------------------------- */

static void on_timer_closed(uv_handle_t *h) {
  free(h);
  S.live_handles--;
}

static void timer_close(fb_fiber_t *f) {
  if (!f->timer) return;
  f->timer->data = NULL;
  uv_close((uv_handle_t *)f->timer, on_timer_closed);
  f->timer = NULL;
}

static void wait_detach(fb_fiber_t *f) {
  if (f->wait == W_JOIN) {            /* unlink from the awaited fiber's joiners */
    fb_fiber_t *t = f->target;
    if (f->join_prev) f->join_prev->join_next = f->join_next;
    else t->joiners = f->join_next;
    if (f->join_next) f->join_next->join_prev = f->join_prev;
    f->join_next = f->join_prev = NULL;
    f->target = NULL;
  } else if (f->wait == W_OP && f->on_cancel) {
    fb_fiber_cancel_cb cb = f->on_cancel;
    f->on_cancel = NULL;
    cb(f, f->on_cancel_data);
  }
}

/* Resumes a suspended fiber early with (nil, err): its wait timed out or it was cancelled. */
static void fiber_interrupt(fb_fiber_t *f, const char *code) {
  wait_detach(f);
  lua_checkstack(f->co, 5);                 /* nil, err, and fb_error_push's temporaries */
  lua_pushnil(f->co);
  if (strcmp(code, "timeout") == 0)
    fb_error_push(f->co, "timeout", "%s: timed out after %g s", f->wait_who, f->wait_timeout);
  else
    fb_error_push(f->co, "cancelled", "%s: fiber %llu was cancelled", f->wait_who,
                  (unsigned long long)f->id);
  fb_fiber_ready(f, 2);
}

static void on_timer(uv_timer_t *t) {
  fb_fiber_t *f = t->data;
  if (!f || f->state != FS_SUSPENDED) return;
  if (f->wait == W_SLEEP) {
    lua_checkstack(f->co, 1);
    lua_pushboolean(f->co, 1);
    fb_fiber_ready(f, 1);
  } else {
    fiber_interrupt(f, "timeout");
  }
}

/* ---- suspend and resume -------------------------------------------------------------- */

lua_State *fb_fiber_thread(fb_fiber_t *f) { return f->co; }
uv_loop_t *fb_sched_loop(void) { return S.loop; }

fb_fiber_t *fb_fiber_check(lua_State *L, const char *who) {
  fb_fiber_t *f = S.current;
  if (!f || f->co != L) {
    fb_push_app_where(L);
    if (f) lua_pushfstring(L, "%s: called from a coroutine that fibril does not schedule; "
                           "only fibers can suspend (use fibril.schedule)", who);
    else lua_pushfstring(L, "%s: not inside a fiber (use fibril.schedule)", who);
    lua_concat(L, 2);
    lua_error(L);
  }
  if (!lua_isyieldable(L)) fb_raise_cannot_suspend(L, who);
  if (f->cancel_pending) {
    f->cancel_pending = 0;
    fb_error_push(L, "cancelled", "%s: fiber %llu was cancelled", who, (unsigned long long)f->id);
    lua_error(L);
  }
  f->wait_who = who;
  return f;
}

void fb_fiber_on_cancel(fb_fiber_t *f, fb_fiber_cancel_cb cb, void *data) {
  f->wait = W_OP;
  f->on_cancel = cb;
  f->on_cancel_data = data;
}

/* Creates the fiber's timer if it has none; raises on OOM, so call it before linking the
 * fiber into any wait. */
static void timer_ensure(lua_State *L, fb_fiber_t *f) {
  if (f->timer) return;
  f->timer = malloc(sizeof *f->timer);
  if (!f->timer) luaL_error(L, "%s: out of memory", f->wait_who);
  uv_timer_init(S.loop, f->timer);
  S.live_handles++;
}

static void timer_start(lua_State *L, fb_fiber_t *f, double timeout) {
  double ms = ceil(timeout * 1000.0);
  timer_ensure(L, f);
  f->timer->data = f;
  f->wait_timeout = timeout;
  /* The loop's clock was read when this turn began; fibers may have run long since, and a
   * timer due relative to that stale time would fire early. */
  uv_update_time(S.loop);
  uv_timer_start(f->timer, on_timer, (uint64_t)ms, 0);
}

int fb_fiber_suspend(lua_State *L, fb_fiber_t *f, double timeout) {
  if (f->wait == W_NONE) f->wait = W_OP;
  if (timeout >= 0) timer_start(L, f, timeout);
  f->state = FS_SUSPENDED;
  return lua_yield(L, 0);
}

void fb_fiber_ready(fb_fiber_t *f, int nresults) {
  if (f->timer) uv_timer_stop(f->timer);
  f->on_cancel = NULL;
  f->wait = W_NONE;
  f->state = FS_READY;
  f->nargs = nresults;
  queue_push(f);
}

/* Seconds from argument idx: none/nil/math.huge = wait forever (-1). */
static double opt_timeout(lua_State *L, int idx, const char *who) {
  double t;
  if (lua_isnoneornil(L, idx)) return -1;
  if (lua_type(L, idx) != LUA_TNUMBER)
    luaL_error(L, "%s: timeout must be a number of seconds, got %s", who, luaL_typename(L, idx));
  t = lua_tonumber(L, idx);
  if (!(t >= 0)) luaL_error(L, "%s: timeout must be a non-negative number of seconds", who);
  if (t > 1e9) return -1;   /* over 30 years: as good as forever, and no ms overflow */
  return t;
}

/* ---- fiber lifecycle ----------------------------------------------------------------- */

static fiber_box_t *check_box(lua_State *L, int idx, const char *who) {
  fiber_box_t *b = lua_touserdata(L, idx);
  if (b && lua_objlen(L, idx) == sizeof *b && b->magic == FIBER_MAGIC) return b;
  luaL_error(L, "%s: expected a fiber, got %s", who, luaL_typename(L, idx));
  return NULL;
}

/* The fiber behind a handle, or NULL when it finished and was recycled (done, no results). */
static fb_fiber_t *check_fiber(lua_State *L, int idx, const char *who) {
  return check_box(L, idx, who)->f;
}

static fb_fiber_t *fiber_alloc(void) {
  fb_fiber_t *f = S.free_fibers;
  if (f) {
    S.free_fibers = f->live_next;
    S.nfree_fibers--;
  } else if (!(f = malloc(sizeof *f))) {
    return NULL;
  }
  memset(f, 0, sizeof *f);
  return f;
}

static void fiber_free(fb_fiber_t *f) {
  if (S.nfree_fibers >= FREE_FIBERS_MAX) {
    free(f);
    return;
  }
  f->live_next = S.free_fibers;
  S.free_fibers = f;
  S.nfree_fibers++;
}

/* Pushes f's handle, making it (anchored while f is alive) on first use. */
static void push_handle(lua_State *L, fb_fiber_t *f) {
  fiber_box_t *b;
  int t;
  if (f->box) {
    fb_push_anchored(L, f->self_ref);
    return;
  }
  b = lua_newuserdata(L, sizeof *b);
  b->magic = FIBER_MAGIC;
  b->f = f;
  b->id = f->id;
  lua_rawgeti(L, LUA_REGISTRYINDEX, S.mt_ref);
  lua_setmetatable(L, -2);
  t = fb_anchors_push(L);
  lua_pushvalue(L, -2);
  f->self_ref = fb_anchor(L, t);
  lua_pop(L, 1);
  f->box = b;
}

/* Creates a fiber from the function below nargs arguments on L's top (popping them). */
fb_fiber_t *fb_fiber_start(lua_State *L, int nargs) {
  fb_fiber_t *f;
  lua_State *co;
  int t;

  if (!(f = fiber_alloc())) luaL_error(L, "fibril: out of memory starting a fiber");
  f->co_ref = f->self_ref = f->err_ref = f->ctx_ref = NO_SLOT;
  t = fb_anchors_push(L);                       /* stack: fn args... anchors */
  if (S.npool > 0) {
    S.npool--;
    co = S.pool[S.npool];                    /* already anchored by its old slot */
    f->co_ref = S.pool_ref[S.npool];
  } else {
    co = lua_newthread(L);                   /* stack: fn args... anchors co */
    f->co_ref = fb_anchor(L, t);
  }
  f->co = co;
  /* A fiber scheduled from inside a unit of work inherits its context (log tags, locals). */
  if (S.current && S.current->co == L && S.current->ctx_ref != NO_SLOT) {
    lua_rawgeti(L, t, S.current->ctx_ref);
    f->ctx_ref = fb_anchor(L, t);
  }
  lua_pop(L, 1);                             /* stack: fn args... */
  lua_xmove(L, co, nargs + 1);               /* stack: (empty) */
  f->id = ++S.next_id;
  f->nargs = nargs;
  f->state = FS_SCHEDULED;
  f->live_next = S.live;
  if (S.live) S.live->live_prev = f;
  S.live = f;
  S.live_fibers++;
  queue_push(f);
  return f;
}

void fb_fiber_on_done(fb_fiber_t *f, fb_fiber_done_cb cb, uint64_t arg) {
  f->on_done = cb;
  f->done_arg = arg;
}

/* The same, and pushes its handle. */
fb_fiber_t *fb_fiber_spawn(lua_State *L, int nargs) {
  fb_fiber_t *f = fb_fiber_start(L, nargs);
  push_handle(L, f);
  return f;
}

/* Copies the fiber's k results (at 1..k of its stack) onto L. */
static void push_results(lua_State *L, fb_fiber_t *t, int k) {
  int i;
  if (k == 0) return;
  luaL_checkstack(L, k, "too many results");
  lua_checkstack(t->co, k);
  for (i = 1; i <= k; i++) lua_pushvalue(t->co, i);
  lua_xmove(t->co, L, k);
}

static int result_count(fb_fiber_t *t) { return t->co ? lua_gettop(t->co) : 0; }

static int raw_string_field_is(lua_State *L, int idx, const char *key, const char *value) {
  int yes;
  lua_pushstring(L, key);
  lua_rawget(L, idx < 0 ? idx - 1 : idx);
  yes = lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), value) == 0;
  lua_pop(L, 1);
  return yes;
}

/* The fiber's error value is on top of f->co: turn it into an error object that keeps the
 * failing fiber's traceback, anchor it in err_ref, and tell whether it was a cancellation.
 * Raw accesses only: this runs outside any pcall, and an app's error table may have
 * metamethods that raise. */
static int fiber_capture_error(fb_fiber_t *f) {
  lua_State *L = S.L;
  int cancelled = 0;
  lua_xmove(f->co, L, 1);                    /* stack: errvalue */
  if (lua_type(L, -1) == LUA_TTABLE) {
    if (lua_getmetatable(L, -1)) {           /* stack: err mt */
      luaL_getmetatable(L, FB_ERROR_MT);     /* stack: err mt errmt */
      cancelled = lua_rawequal(L, -1, -2) && raw_string_field_is(L, -3, "code", "cancelled");
      lua_pop(L, 2);
    }
    lua_pushliteral(L, "traceback");
    lua_rawget(L, -2);
    if (lua_isnil(L, -1)) {
      lua_pushliteral(L, "traceback");
      luaL_traceback(L, f->co, NULL, 0);
      lua_rawset(L, -4);
    }
    lua_pop(L, 1);
  } else {
    int t = lua_type(L, -1);
    fb_error_push(L, NULL, "%s", t == LUA_TSTRING || t == LUA_TNUMBER ? lua_tostring(L, -1)
                                 : t == LUA_TNIL ? "nil" : luaL_typename(L, -1));
    lua_insert(L, -2);                       /* stack: err errvalue */
    lua_setfield(L, -2, "value");
    luaL_traceback(L, f->co, NULL, 0);
    lua_setfield(L, -2, "traceback");
  }
  lua_pushliteral(L, "fiber");             /* the fiber where it started, kept across awaits */
  lua_rawget(L, -2);
  if (lua_isnil(L, -1)) {
    lua_pushliteral(L, "fiber");
    lua_pushnumber(L, (lua_Number)f->id);
    lua_rawset(L, -4);
  }
  lua_pop(L, 1);
  fb_anchors_push(L);                           /* stack: err anchors */
  lua_insert(L, -2);                         /* stack: anchors err */
  f->err_ref = fb_anchor(L, lua_gettop(L) - 1);
  lua_pop(L, 1);
  return cancelled;
}

static void report_main_error(fb_fiber_t *f) {
  fb_push_anchored(S.L, f->err_ref);
  fprintf(stderr, "fibril: %s\n", fb_error_describe(S.L, NULL));
  fflush(stderr);
  lua_pop(S.L, 2);
}

/* A finished fiber that no handle can read any more: an error nobody awaited is logged, and
 * its results and error are released. */
static void release_finished(lua_State *L, fb_fiber_t *f) {
  int t;
  if (f->state == FS_FAILED && !f->err_observed) {
    char msg[8192];
    size_t len = 0;
    const char *s;
    f->err_observed = 1;
    fb_push_anchored(L, f->err_ref);
    s = fb_error_describe(L, &len);
    fb_log(FB_ERROR, "fiber", "msg=\"fiber failed and was never awaited\" fiber=%llu err=%s",
           (unsigned long long)f->id, fb_log_quote(msg, sizeof msg, s, len));
    lua_pop(L, 2);
  }
  t = fb_anchors_push(L);
  fb_unanchor(L, t, f->co_ref);
  fb_unanchor(L, t, f->err_ref);
  lua_pop(L, 1);
  f->co_ref = f->err_ref = NO_SLOT;
  f->co = NULL;
}

static void fiber_finish(fb_fiber_t *f, int ok) {
  fb_fiber_t *j;
  int k = 0, cancelled = 0, t;

  if (ok) {
    f->state = FS_DONE;
    k = f->box ? lua_gettop(f->co) : 0;      /* without a handle nobody can read them */
  } else {
    f->state = FS_FAILED;
    cancelled = fiber_capture_error(f);
  }
  t = fb_anchors_push(S.L);                     /* S.L stack: anchors (popped at the end) */
  if (k == 0) {                              /* nothing on its stack is needed any more */
    if (ok && S.npool < (int)(sizeof S.pool / sizeof S.pool[0])) {
      lua_settop(f->co, 0);
      S.pool[S.npool] = f->co;               /* finished cleanly: reusable */
      S.pool_ref[S.npool++] = f->co_ref;
    } else {
      fb_unanchor(S.L, t, f->co_ref);
    }
    f->co_ref = NO_SLOT;
    f->co = NULL;
  }
  timer_close(f);
  f->on_cancel = NULL;
  f->wait = W_NONE;
  if (f->on_done) {
    fb_fiber_done_cb cb = f->on_done;
    f->on_done = NULL;
    cb(f->done_arg);
  }

  /* Wake every fiber awaiting this one with (true, results...) or (false, err). */
  while ((j = f->joiners) != NULL) {
    f->joiners = j->join_next;
    j->join_next = j->join_prev = NULL;
    j->target = NULL;
    j->wait = W_NONE;
    lua_checkstack(j->co, k + 1);
    lua_pushboolean(j->co, ok);
    if (ok) push_results(j->co, f, k);
    else {
      lua_rawgeti(S.L, t, f->err_ref);
      lua_xmove(S.L, j->co, 1);
      f->err_observed = 1;
    }
    fb_fiber_ready(j, ok ? k + 1 : 2);
  }
  if (cancelled) f->err_observed = 1;        /* cancellation is asked for, not a fault */

  if (f->box && (!ok || k > 0)) {            /* refs to release: __gc from now on */
    lua_rawgeti(S.L, t, f->self_ref);
    lua_rawgeti(S.L, LUA_REGISTRYINDEX, S.mt_gc_ref);
    lua_setmetatable(S.L, -2);
    lua_pop(S.L, 1);
  }
  if (f->is_main) {
    S.main_finished = 1;
    if (!ok) {
      f->err_observed = 1;
      report_main_error(f);
      S.exit_requested = 1;
      S.exit_code = 1;
      uv_stop(S.loop);
    }
  }
  if (f->live_prev) f->live_prev->live_next = f->live_next;
  else S.live = f->live_next;
  if (f->live_next) f->live_next->live_prev = f->live_prev;
  f->live_next = f->live_prev = NULL;
  fb_unanchor(S.L, t, f->ctx_ref);
  f->ctx_ref = NO_SLOT;
  fb_unanchor(S.L, t, f->self_ref);
  f->self_ref = NO_SLOT;
  lua_settop(S.L, t - 1);
  S.live_fibers--;
  if (!f->box) {                   /* nothing can reach it: say what failed, then recycle */
    release_finished(S.L, f);
    fiber_free(f);
  } else if (ok && k == 0) {       /* the handle answers "done" on its own */
    f->box->f = NULL;
    fiber_free(f);
  }
}

static void fiber_resume(fb_fiber_t *f) {
  int status, nargs = f->nargs;

  if (f->state == FS_SCHEDULED && f->cancel_pending) {
    /* Cancelled before it ever ran: it finishes as cancelled without running. */
    lua_settop(f->co, 0);
    fb_error_push(f->co, "cancelled", "fiber %llu was cancelled before it started",
                  (unsigned long long)f->id);
    fiber_finish(f, 0);
    return;
  }
  f->state = FS_RUNNING;
  f->nargs = 0;
  S.current = f;
  status = lua_resume(f->co, nargs);
  S.current = NULL;
  if (status == LUA_YIELD) {
    if (f->state == FS_RUNNING) {
      /* A bare coroutine.yield() in a fiber gives up the CPU until the next turn. */
      lua_settop(f->co, 0);
      f->state = FS_READY;
      queue_push(f);
    }
  } else {
    fiber_finish(f, status == 0);
  }
}

static void drain(uv_check_t *h) {
  int budget = DRAIN_BUDGET;
  (void)h;
  while (S.qlen > 0 && budget-- > 0 && !S.exit_requested) fiber_resume(queue_pop());
  if (S.qlen == 0) uv_idle_stop(&S.idle);
}

/* Runs the fibers that are ready now, from a libuv callback (never from inside a fiber). The
 * HTTP server calls it after each read it parsed: a request's handler runs, and its response
 * leaves, before the loop reads the next connection, as nginx does, instead of after every
 * ready connection was read (each response would wait for the whole loop turn). */
void fb_sched_run_ready(void) {
  if (S.current || S.qlen == 0) return;
  drain(NULL);
}

/* ---- Lua API (module fibril.core.fiber; lua/fibril/init.lua wraps it) ---------------- */

static int l_spawn(lua_State *L) {
  if (lua_type(L, 1) != LUA_TFUNCTION)
    return luaL_error(L, "fibril.schedule: expected a function, got %s", luaL_typename(L, 1));
  fb_fiber_spawn(L, lua_gettop(L) - 1);
  return 1;
}

static int l_current(lua_State *L) {
  fb_fiber_t *f = S.current;
  if (!f || f->co != L) return 0;
  push_handle(L, f);
  return 1;
}

/* join(handle [, timeout]) -> true, results... | false, err (it failed) | nil, err (timeout,
 * cancelled). Returns at once when the fiber has finished. */
static int l_join(lua_State *L) {
  fb_fiber_t *t = check_fiber(L, 1, "fibril.await"), *f, *c;
  double timeout = opt_timeout(L, 2, "fibril.await");
  if (!t) {                                  /* done, with no results */
    lua_pushboolean(L, 1);
    return 1;
  }
  if (t->state == FS_DONE) {
    int k = result_count(t);
    lua_pushboolean(L, 1);
    push_results(L, t, k);
    return k + 1;
  }
  if (t->state == FS_FAILED) {
    t->err_observed = 1;
    lua_pushboolean(L, 0);
    fb_push_anchored(L, t->err_ref);
    return 2;
  }
  f = fb_fiber_check(L, "fibril.await");
  for (c = t; c; c = c->wait == W_JOIN ? c->target : NULL)
    if (c == f) {
      fb_error_push(L, "deadlock", "fibril.await: deadlock: fiber %llu would wait for itself "
                    "(through fiber %llu)", (unsigned long long)f->id, (unsigned long long)t->id);
      return lua_error(L);
    }
  if (timeout >= 0) timer_ensure(L, f);
  f->target = t;
  f->join_prev = NULL;
  f->join_next = t->joiners;
  if (t->joiners) t->joiners->join_prev = f;
  t->joiners = f;
  f->wait = W_JOIN;
  return fb_fiber_suspend(L, f, timeout);
}

static int l_sleep(lua_State *L) {
  fb_fiber_t *f;
  double s;
  if (lua_type(L, 1) != LUA_TNUMBER || !(lua_tonumber(L, 1) >= 0))
    return luaL_error(L, "fibril.sleep: seconds must be a non-negative number");
  s = lua_tonumber(L, 1);
  f = fb_fiber_check(L, "fibril.sleep");
  f->wait = W_SLEEP;
  return fb_fiber_suspend(L, f, s > 1e9 ? 1e9 : s);
}

/* park([timeout [, who]]): suspends until wake(), a timeout or cancel. The building block of
 * channels, semaphores and conditions in Lua. */
static int l_park(lua_State *L) {
  const char *who = luaL_optstring(L, 2, "fibril.park");
  double timeout = opt_timeout(L, 1, who);
  fb_fiber_t *f = fb_fiber_check(L, who);
  /* The Lua string may be collected while we wait: keep a copy. */
  snprintf(f->park_who, sizeof f->park_who, "%s", who);
  f->wait_who = f->park_who;
  f->wait = W_PARK;
  return fb_fiber_suspend(L, f, timeout);
}

/* wake(handle, values...) -> true when the fiber was parked and is now queued with
 * (true, values...); false otherwise (it already timed out, was cancelled or finished). */
static int l_wake(lua_State *L) {
  fb_fiber_t *t = check_fiber(L, 1, "fibril.wake");
  int n = lua_gettop(L) - 1;
  if (!t || t->state != FS_SUSPENDED || t->wait != W_PARK) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_checkstack(t->co, n + 1);
  lua_pushboolean(t->co, 1);
  lua_xmove(L, t->co, n);
  fb_fiber_ready(t, n + 1);
  lua_pushboolean(L, 1);
  return 1;
}

int fb_fiber_cancel(fb_fiber_t *t) {
  switch (t->state) {
  case FS_DONE:
  case FS_FAILED:
    return 0;
  case FS_SUSPENDED:
    if (t->wait != W_FOREVER) {
      fiber_interrupt(t, "cancelled");
      break;
    }
    /* fall through */
  default:
    t->cancel_pending = 1;
  }
  return 1;
}

static int l_cancel(lua_State *L) {
  fb_fiber_t *t = check_fiber(L, 1, "fibril.cancel");
  lua_pushboolean(L, t && fb_fiber_cancel(t));
  return 1;
}

static const char *state_names[] = { "scheduled", "ready", "running", "suspended", "done",
                                     "failed" };

static int l_status(lua_State *L) {
  fb_fiber_t *t = check_fiber(L, 1, "fiber:status");
  if (!t) {
    lua_pushstring(L, state_names[FS_DONE]);
    return 1;
  }
  if (t->state == FS_FAILED) {
    fb_push_anchored(L, t->err_ref);
    lua_getfield(L, -1, "code");
    if (lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "cancelled") == 0) {
      lua_pushliteral(L, "cancelled");
      return 1;
    }
    lua_pop(L, 2);
  }
  lua_pushstring(L, state_names[t->state]);
  return 1;
}

static int l_id(lua_State *L) {
  lua_pushnumber(L, (lua_Number)check_box(L, 1, "fiber:id")->id);
  return 1;
}

static int l_fiber_tostring(lua_State *L) {
  fiber_box_t *b = check_box(L, 1, "tostring");
  lua_pushfstring(L, "fiber %d (%s)", (int)b->id, state_names[b->f ? b->f->state : FS_DONE]);
  return 1;
}

/* One idempotent release for a finished fiber's handle that Lua no longer reaches (live
 * fibers have no __gc: fb_sched_shutdown closes their timers before lua_close). */
static int l_fiber_gc(lua_State *L) {
  fiber_box_t *b = check_box(L, 1, "__gc");
  fb_fiber_t *f = b->f;
  if (!f) return 0;
  b->f = NULL;
  release_finished(L, f);
  fiber_free(f);
  return 0;
}

/* exit(code): stops the loop after this turn; the calling fiber never resumes. Returns false
 * when called where it cannot suspend, and the caller then exits the process directly. */
static int l_exit(lua_State *L) {
  fb_fiber_t *f = S.current;
  S.exit_code = (int)luaL_optinteger(L, 1, 0);
  S.exit_requested = 1;
  uv_stop(S.loop);
  if (f && f->co == L && lua_isyieldable(L)) {
    f->wait = W_FOREVER;
    f->wait_who = "fibril.exit";
    f->state = FS_SUSPENDED;
    return lua_yield(L, 0);
  }
  lua_pushboolean(L, 0);
  return 1;
}

/* os.exit(code [, close]): inside a fiber it is fibril.exit, so the process ends through the
 * usual teardown (every handle closed, every __gc run) instead of C's exit() in the middle of
 * a coroutine, which leaves C memory held by Lua objects unreleased. */
static int l_os_exit(lua_State *L) {
  int code = lua_isboolean(L, 1) ? (lua_toboolean(L, 1) ? 0 : 1) : (int)luaL_optinteger(L, 1, 0);
  fb_fiber_t *f = S.current;
  fflush(stdout);
  S.exit_code = code;
  if (f && f->co == L && lua_isyieldable(L)) {
    S.exit_requested = 1;
    uv_stop(S.loop);
    f->wait = W_FOREVER;
    f->wait_who = "os.exit";
    f->state = FS_SUSPENDED;
    return lua_yield(L, 0);
  }
  exit(code);
}

/* context() -> the running fiber's context table, or nil (none, or not in a fiber). */
static int l_context(lua_State *L) {
  fb_fiber_t *f = S.current;
  if (!f || f->co != L || f->ctx_ref == NO_SLOT) return 0;
  fb_push_anchored(L, f->ctx_ref);
  return 1;
}

/* set_context(table|nil): replaces the running fiber's context; fibers it schedules from now
 * on inherit the new one. Returns true and the context it replaced (nil if none), or false
 * outside a fiber. */
static int l_set_context(lua_State *L) {
  fb_fiber_t *f = S.current;
  int t;
  if (!f || f->co != L) {
    lua_pushboolean(L, 0);
    return 1;
  }
  if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TTABLE);
  t = fb_anchors_push(L);
  lua_pushboolean(L, 1);                     /* stack: ... anchors true */
  if (f->ctx_ref != NO_SLOT) lua_rawgeti(L, t, f->ctx_ref);
  else lua_pushnil(L);                       /* stack: ... anchors true previous */
  fb_unanchor(L, t, f->ctx_ref);
  f->ctx_ref = NO_SLOT;
  if (!lua_isnoneornil(L, 1)) {
    lua_pushvalue(L, 1);
    f->ctx_ref = fb_anchor(L, t);
  }
  return 2;
}

static int l_walltime(lua_State *L) {
  uv_timeval64_t tv;
  uv_gettimeofday(&tv);
  lua_pushnumber(L, (lua_Number)tv.tv_sec + (lua_Number)tv.tv_usec / 1e6);
  return 1;
}

static int l_now(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_hrtime() / 1e9);
  return 1;
}

static int l_new_error(lua_State *L) {
  fb_error_push(L, luaL_optstring(L, 1, NULL), "%s", luaL_checkstring(L, 2));
  return 1;
}

static int l_live(lua_State *L) {
  lua_createtable(L, 0, 4);
  lua_pushnumber(L, (lua_Number)S.live_fibers);
  lua_setfield(L, -2, "fibers");
  lua_pushnumber(L, (lua_Number)(fb_anchor_live() - (size_t)S.npool));  /* the pool: a cache */
  lua_setfield(L, -2, "refs");
  lua_pushnumber(L, (lua_Number)S.live_handles);
  lua_setfield(L, -2, "handles");
  lua_pushnumber(L, (lua_Number)S.qlen);
  lua_setfield(L, -2, "queued");
  return 1;
}

static const luaL_Reg fiber_methods[] = {
  { "cancel", l_cancel },
  { "status", l_status },
  { "id", l_id },
  { NULL, NULL }
};

static const luaL_Reg core_funcs[] = {
  { "spawn", l_spawn },
  { "current", l_current },
  { "join", l_join },
  { "sleep", l_sleep },
  { "park", l_park },
  { "wake", l_wake },
  { "cancel", l_cancel },
  { "status", l_status },
  { "exit", l_exit },
  { "now", l_now },
  { "walltime", l_walltime },
  { "error", l_new_error },
  { "live", l_live },
  { "context", l_context },
  { "set_context", l_set_context },
  { NULL, NULL }
};

int luaopen_fibril_core_fiber(lua_State *L) {
  lua_newtable(L);
  luaL_setfuncs(L, core_funcs, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, S.mt_ref);
  lua_setfield(L, -2, "fiber_metatable");
  lua_rawgeti(L, LUA_REGISTRYINDEX, S.mt_gc_ref);
  lua_setfield(L, -2, "done_fiber_metatable");
  luaL_getmetatable(L, FB_ERROR_MT);
  lua_setfield(L, -2, "error_metatable");
  return 1;
}

/* ---- scheduler set-up and the main fiber ----------------------------------------------- */

/* With the methods table on top, makes a handle metatable and returns a registry ref. */
static int new_fiber_metatable(lua_State *L, int with_gc) {
  lua_createtable(L, 0, 4);
  lua_pushvalue(L, -2);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_fiber_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushliteral(L, "fiber");
  lua_setfield(L, -2, "__name");
  if (with_gc) {
    lua_pushcfunction(L, l_fiber_gc);
    lua_setfield(L, -2, "__gc");
  }
  return luaL_ref(L, LUA_REGISTRYINDEX);
}

void fb_sched_on_close(fb_close_hook hook) {
  int i;
  for (i = 0; i < S.nclose_hooks; i++)
    if (S.close_hooks[i] == hook) return;
  if (S.nclose_hooks == (int)(sizeof S.close_hooks / sizeof S.close_hooks[0])) {
    fprintf(stderr, "fibril: too many close hooks (fb_sched_on_close)\n");
    abort();                                 /* a build mistake: a new module over the limit */
  }
  S.close_hooks[S.nclose_hooks++] = hook;
}

/* __gc of a userdata the registry holds from fb_sched_init: lua_close finalizes it after the
 * userdata made later (the modules' objects), and before it frees anything. */
static int l_close_sentinel_gc(lua_State *L) {
  (void)L;
  while (S.nclose_hooks > 0) S.close_hooks[--S.nclose_hooks]();
  return 0;
}

void fb_sched_init(lua_State *L, uv_loop_t *loop) {
  memset(&S, 0, sizeof S);
  S.L = L;
  fb_anchor_init(L);
  S.loop = loop;
  uv_check_init(loop, &S.check);
  uv_check_start(&S.check, drain);
  uv_unref((uv_handle_t *)&S.check);         /* draining alone never keeps the process up */
  uv_idle_init(loop, &S.idle);

  lua_newtable(L);                           /* stack: methods */
  luaL_setfuncs(L, fiber_methods, 0);
  S.mt_ref = new_fiber_metatable(L, 0);
  S.mt_gc_ref = new_fiber_metatable(L, 1);
  lua_pop(L, 1);
  fb_error_init(L);
  lua_newuserdata(L, 1);                     /* stack: sentinel */
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, l_close_sentinel_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  luaL_ref(L, LUA_REGISTRYINDEX);            /* lives until lua_close */
  lua_getglobal(L, "os");
  lua_pushcfunction(L, l_os_exit);
  lua_setfield(L, -2, "exit");
  lua_pop(L, 1);
}

int fb_sched_run_main(lua_State *L, int nargs) {
  fb_fiber_t *f = fb_fiber_spawn(L, nargs);
  f->is_main = 1;
  S.main = f;
  lua_pop(L, 1);                             /* the handle: its self_ref slot anchors it */
  uv_run(S.loop, UV_RUN_DEFAULT);
  if (!S.exit_requested && !S.main_finished) {
    fprintf(stderr, "fibril: the main fiber is still waiting in %s, but nothing is left that "
            "could wake it (deadlock)\n", f->wait_who ? f->wait_who : "a wait");
    return 1;
  }
  return S.exit_code;
}

void fb_sched_shutdown(void) {
  fb_fiber_t *f;
  for (f = S.live; f; f = f->live_next) timer_close(f);
}

static void on_sched_handle_closed(uv_handle_t *h) { (void)h; }

void fb_sched_close(void) {
  uv_close((uv_handle_t *)&S.check, on_sched_handle_closed);
  uv_close((uv_handle_t *)&S.idle, on_sched_handle_closed);
  uv_run(S.loop, UV_RUN_DEFAULT);            /* lets every close callback run */
  free(S.q);
  S.q = NULL;
  fb_anchor_close();
  S.qlen = S.qcap = S.qhead = 0;
  while (S.live) {                           /* fibers still alive when the state closed */
    fb_fiber_t *f = S.live;
    S.live = f->live_next;
    free(f);
  }
  while (S.free_fibers) {
    fb_fiber_t *f = S.free_fibers;
    S.free_fibers = f->live_next;
    free(f);
  }
  S.nfree_fibers = 0;
}
