/* fiber.c: fibers (coroutines anchored in the registry) and the one scheduler.
 * Only this file calls lua_resume, always from drain() at C-stack depth one: libuv callbacks
 * and wakers push values and enqueue (fb_fiber_ready), the check handle drains the queue.
 * A fiber is C memory (fb_fiber_t, recycled through a free list) that lives at least as long
 * as the fiber runs, so every pointer to a live fiber (queue, joiners, timer) is valid. Its
 * Lua handle is a small userdata (fiber_box_t) made when Lua first asks for it: fibers the
 * HTTP server starts for requests usually never get one, which saves a userdata (and its
 * share of the collector's atomic phase) per request. A finished fiber's struct outlives it
 * only while a handle can still read its results or error.
 * Values are anchored through runtime/anchor.c (table slots recycled by a C free list).
 * The Lua API (fibril.core.fiber) is fiber_api.c; fiber_internal.h is what the two share. */
#include "fiber_internal.h"

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

#define S fb_sched            /* the one scheduler (fiber_internal.h) */
fb_sched_t fb_sched;

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
void fb_fiber_timer_ensure(lua_State *L, fb_fiber_t *f) {
  if (f->timer) return;
  f->timer = malloc(sizeof *f->timer);
  if (!f->timer) luaL_error(L, "%s: out of memory", f->wait_who);
  uv_timer_init(S.loop, f->timer);
  S.live_handles++;
}

static void timer_start(lua_State *L, fb_fiber_t *f, double timeout) {
  double ms = ceil(timeout * 1000.0);
  fb_fiber_timer_ensure(L, f);
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
double fb_fiber_opt_timeout(lua_State *L, int idx, const char *who) {
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

fiber_box_t *fb_fiber_check_box(lua_State *L, int idx, const char *who) {
  fiber_box_t *b = lua_touserdata(L, idx);
  if (b && lua_objlen(L, idx) == sizeof *b && b->magic == FIBER_MAGIC) return b;
  luaL_error(L, "%s: expected a fiber, got %s", who, luaL_typename(L, idx));
  return NULL;
}

/* The fiber behind a handle, or NULL when it finished and was recycled (done, no results). */
fb_fiber_t *fb_fiber_check_handle(lua_State *L, int idx, const char *who) {
  return fb_fiber_check_box(L, idx, who)->f;
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

void fb_fiber_free(fb_fiber_t *f) {
  if (S.nfree_fibers >= FREE_FIBERS_MAX) {
    free(f);
    return;
  }
  f->live_next = S.free_fibers;
  S.free_fibers = f;
  S.nfree_fibers++;
}

/* Pushes f's handle, making it (anchored while f is alive) on first use. */
void fb_fiber_push_handle(lua_State *L, fb_fiber_t *f) {
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
  fb_fiber_push_handle(L, f);
  return f;
}

/* Copies the fiber's k results (at 1..k of its stack) onto L. */
void fb_fiber_push_results(lua_State *L, fb_fiber_t *t, int k) {
  int i;
  if (k == 0) return;
  luaL_checkstack(L, k, "too many results");
  lua_checkstack(t->co, k);
  for (i = 1; i <= k; i++) lua_pushvalue(t->co, i);
  lua_xmove(t->co, L, k);
}

int fb_fiber_result_count(fb_fiber_t *t) { return t->co ? lua_gettop(t->co) : 0; }

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
void fb_fiber_release_finished(lua_State *L, fb_fiber_t *f) {
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
    if (ok) fb_fiber_push_results(j->co, f, k);
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
    fb_fiber_release_finished(S.L, f);
    fb_fiber_free(f);
  } else if (ok && k == 0) {       /* the handle answers "done" on its own */
    f->box->f = NULL;
    fb_fiber_free(f);
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

/* ---- cancellation ------------------------------------------------------------------- */

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


/* ---- scheduler set-up and the main fiber ----------------------------------------------- */

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

  fb_fiber_api_init(L);                      /* handle metatables, os.exit */
  fb_error_init(L);
  lua_newuserdata(L, 1);                     /* stack: sentinel */
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, l_close_sentinel_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  luaL_ref(L, LUA_REGISTRYINDEX);            /* lives until lua_close */
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
