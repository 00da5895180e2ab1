/* signals.c: wait(names...) suspends a fiber until one of the named signals arrives and
 * returns its name. Each wait owns one uv_signal_t per name; all are closed when it ends
 * (signal, timeout or cancel), so no handle outlives the wait. */
#include "signals.h"

#include <lauxlib.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "fiber.h"

#define MAX_SIGNALS 4

typedef struct sigwait_s sigwait_t;
struct sigwait_s {
  uv_signal_t h[MAX_SIGNALS];
  int n, closing;
  fb_fiber_t *fiber;      /* NULL once the wait is over */
  sigwait_t *next, *prev; /* waits in progress, ended at lua_close (on_lua_close) */
};

static sigwait_t *live;

static const struct { const char *name; int signum; } known[] = {
  { "SIGTERM", SIGTERM }, { "SIGINT", SIGINT }, { "SIGHUP", SIGHUP },
  { "SIGUSR1", SIGUSR1 }, { "SIGUSR2", SIGUSR2 }, { "SIGQUIT", SIGQUIT },
  { "SIGCHLD", SIGCHLD }, { NULL, 0 }
};

static const char *signal_name(int signum) {
  int i;
  for (i = 0; known[i].name; i++)
    if (known[i].signum == signum) return known[i].name;
  return "?";
}

static void on_closed(uv_handle_t *h) {
  sigwait_t *w = h->data;
  if (--w->closing == 0) free(w);
}

static void wait_end(sigwait_t *w) {
  int i;
  if (w->prev) w->prev->next = w->next;
  else live = w->next;
  if (w->next) w->next->prev = w->prev;
  w->next = w->prev = NULL;
  w->fiber = NULL;
  w->closing = w->n;
  for (i = 0; i < w->n; i++) uv_close((uv_handle_t *)&w->h[i], on_closed);
}

static void on_signal(uv_signal_t *h, int signum) {
  sigwait_t *w = h->data;
  fb_fiber_t *f = w->fiber;
  if (!f) return;
  lua_pushstring(fb_fiber_thread(f), signal_name(signum));
  wait_end(w);
  fb_fiber_ready(f, 1);
}

static void on_cancel(fb_fiber_t *f, void *data) {
  (void)f;
  wait_end(data);
}

/* wait(name, ... [, timeout]) -> name | nil, err (timeout or cancel, from the scheduler).
 * Every argument is checked before any handle starts: nothing can raise after that. */
static int l_wait(lua_State *L) {
  int top = lua_gettop(L), i, signums[MAX_SIGNALS];
  double timeout = -1;
  sigwait_t *w;
  fb_fiber_t *f;
  if (top > 0 && lua_type(L, top) == LUA_TNUMBER) {
    timeout = lua_tonumber(L, top--);
    if (!(timeout >= 0)) return luaL_error(L, "signal.wait: timeout must be a non-negative number");
  }
  luaL_argcheck(L, top >= 1 && top <= MAX_SIGNALS, 1, "one to four signal names");
  for (i = 1; i <= top; i++) {
    const char *name = luaL_checkstring(L, i);
    int k;
    signums[i - 1] = 0;
    for (k = 0; known[k].name; k++)
      if (strcmp(known[k].name, name) == 0) signums[i - 1] = known[k].signum;
    if (!signums[i - 1]) return luaL_error(L, "signal.wait: unknown signal '%s'", name);
  }
  f = fb_fiber_check(L, "signal.wait");
  w = calloc(1, sizeof *w);
  if (!w) return luaL_error(L, "signal.wait: out of memory");
  for (i = 0; i < top; i++) {
    uv_signal_init(fb_sched_loop(), &w->h[i]);
    w->h[i].data = w;
    uv_signal_start(&w->h[i], on_signal, signums[i]);
  }
  w->n = top;
  w->fiber = f;
  w->next = live;
  if (live) live->prev = w;
  live = w;
  fb_fiber_on_cancel(f, on_cancel, w);
  return fb_fiber_suspend(L, f, timeout);
}

/* Run by lua_close (fb_sched_on_close): waits still pending belong to fibers
 * about to be freed; end them so their handles close and no signal touches a freed fiber. */
static void on_lua_close(void) {
  while (live) wait_end(live);
}

int luaopen_fibril_core_signal(lua_State *L) {
  fb_sched_on_close(on_lua_close);
  lua_newtable(L);
  lua_pushcfunction(L, l_wait);
  lua_setfield(L, -2, "wait");
  return 1;
}
