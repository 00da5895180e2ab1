/* fiber_api.c: the Lua API of fibers, module fibril.core.fiber (lua/fibril/init.lua wraps
 * it): schedule, await, sleep, park/wake, cancel, status, exit, a unit of work's context, the
 * clocks, and the handle's methods. The scheduler and a fiber's lifecycle are fiber.c's. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "anchor.h"
#include "error.h"
#include "fiber_internal.h"

#define S fb_sched            /* the one scheduler (fiber_internal.h) */

static int l_spawn(lua_State *L) {
  if (lua_type(L, 1) != LUA_TFUNCTION)
    return luaL_error(L, "fibril.schedule: expected a function, got %s", luaL_typename(L, 1));
  fb_fiber_spawn(L, lua_gettop(L) - 1);
  return 1;
}

static int l_current(lua_State *L) {
  fb_fiber_t *f = S.current;
  if (!f || f->co != L) return 0;
  fb_fiber_push_handle(L, f);
  return 1;
}

/* join(handle [, timeout]) -> true, results... | false, err (it failed) | nil, err (timeout,
 * cancelled). Returns at once when the fiber has finished. */
static int l_join(lua_State *L) {
  fb_fiber_t *t = fb_fiber_check_handle(L, 1, "fibril.await"), *f, *c;
  double timeout = fb_fiber_opt_timeout(L, 2, "fibril.await");
  if (!t) {                                  /* done, with no results */
    lua_pushboolean(L, 1);
    return 1;
  }
  if (t->state == FS_DONE) {
    int k = fb_fiber_result_count(t);
    lua_pushboolean(L, 1);
    fb_fiber_push_results(L, t, k);
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
  if (timeout >= 0) fb_fiber_timer_ensure(L, f);
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
  double timeout = fb_fiber_opt_timeout(L, 1, who);
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
  fb_fiber_t *t = fb_fiber_check_handle(L, 1, "fibril.wake");
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


static int l_cancel(lua_State *L) {
  fb_fiber_t *t = fb_fiber_check_handle(L, 1, "fibril.cancel");
  lua_pushboolean(L, t && fb_fiber_cancel(t));
  return 1;
}

static const char *state_names[] = { "scheduled", "ready", "running", "suspended", "done",
                                     "failed" };

static int l_status(lua_State *L) {
  fb_fiber_t *t = fb_fiber_check_handle(L, 1, "fiber:status");
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
  lua_pushnumber(L, (lua_Number)fb_fiber_check_box(L, 1, "fiber:id")->id);
  return 1;
}

static int l_fiber_tostring(lua_State *L) {
  fiber_box_t *b = fb_fiber_check_box(L, 1, "tostring");
  lua_pushfstring(L, "fiber %d (%s)", (int)b->id, state_names[b->f ? b->f->state : FS_DONE]);
  return 1;
}

/* One idempotent release for a finished fiber's handle that Lua no longer reaches (live
 * fibers have no __gc: fb_sched_shutdown closes their timers before lua_close). */
static int l_fiber_gc(lua_State *L) {
  fiber_box_t *b = fb_fiber_check_box(L, 1, "__gc");
  fb_fiber_t *f = b->f;
  if (!f) return 0;
  b->f = NULL;
  fb_fiber_release_finished(L, f);
  fb_fiber_free(f);
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

void fb_fiber_api_init(lua_State *L) {
  lua_newtable(L);                           /* stack: methods */
  luaL_setfuncs(L, fiber_methods, 0);
  S.mt_ref = new_fiber_metatable(L, 0);
  S.mt_gc_ref = new_fiber_metatable(L, 1);
  lua_pop(L, 1);
  lua_getglobal(L, "os");
  lua_pushcfunction(L, l_os_exit);
  lua_setfield(L, -2, "exit");
  lua_pop(L, 1);
}
