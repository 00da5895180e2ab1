/* redis.c: the lifetime of Redis connections for fibers, on hiredis' async API and its libuv
 * adapter: connect with AUTH and SELECT, close, discard, and the Lua module. Commands are in
 * redis_cmd.c, subscribe mode in redis_sub.c (redis_conn.h says what they share). The
 * fb_redis_t outlives hiredis' context: it is freed only once hiredis is done with it
 * (disconnect callback, or a synchronous redisAsyncFree) and no box points to it. */
#include "redis_conn.h"

#include <errno.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

#include <hiredis/async.h>
#include <hiredis/adapters/libuv.h>

#include "error.h"

/* Default bound on the array elements one reply may hold, nested arrays summed: hiredis 0.14
 * has no maxelements, so bounded_create_array checks it before hiredis allocates. */
#define REDIS_MAX_ELEMENTS (1u << 20)
#define REDIS_MAX_ELEMENTS_CEIL (1u << 28)
/* Pushed messages a subscriber has not read yet, in bytes: beyond it new ones are dropped
 * (and counted) rather than growing without bound behind a handler that does not keep up. */
#define REDIS_SUB_MAX_BYTES (64u << 20)
#define R fb_redis_registry

fb_redis_registry_t fb_redis_registry;

size_t fb_redis_live_conns(void) { return R.live_conns + R.live_polls; }
size_t fb_redis_live_requests(void) { return R.live_ops; }

/* ---- results and errors: C reports (nil, msg, code), lua/fibril/redis.lua raises ----- */

int fb_redis_push_lerror(lua_State *L, const char *msg, size_t len, const char *code) {
  lua_pushnil(L);
  lua_pushlstring(L, msg, len);
  lua_pushstring(L, code);
  return 3;
}

int fb_redis_push_error(lua_State *L, const char *msg, const char *code) {
  return fb_redis_push_lerror(L, msg, strlen(msg), code);
}

void fb_redis_resume_error(fb_fiber_t *f, const char *msg, const char *code) {
  lua_State *co = fb_fiber_thread(f);
  lua_checkstack(co, 3);
  fb_fiber_ready(f, fb_redis_push_error(co, msg, code));
}

/* "connection lost (127.0.0.1:6379: <hiredis' reason>)" into buf. */
void fb_redis_lost_message(fb_redis_t *r, const redisAsyncContext *ac, char *buf, size_t size) {
  snprintf(buf, size, "connection lost (%s: %s)", r->where,
           ac->errstr[0] ? ac->errstr : "closed by the server");
}

static const char *errno_code(int e) {
  return e > 0 ? uv_err_name(-e) : "connect_failed";
}

/* ---- bounding replies ------------------------------------------------------------- */

static void *(*default_create_array)(const redisReadTask *, int);
static redisReplyObjectFunctions bounded_fns;   /* hiredis' defaults, createArray checked */

/* Returning NULL makes hiredis fail the reader ("Out of memory") and drop the connection;
 * r->limit_hit lets the failed ops say what happened instead. */
static void *bounded_create_array(const redisReadTask *task, int elements) {
  fb_redis_t *r = task->privdata;
  if (!task->parent) r->reply_elements = 0;   /* a new reply begins */
  r->reply_elements += (size_t)elements;
  if (r->reply_elements > r->max_elements) {
    r->limit_hit = r->reply_elements;
    return NULL;
  }
  return default_create_array(task, elements);
}

/* ---- lifetime ---------------------------------------------------------------------- */

static void flush_unlink(fb_redis_t *r);

static void redis_maybe_free(fb_redis_t *r) {
  if (r->ac || r->boxed || r->connecting || r->in_free) return;
  if (r->live_prev) r->live_prev->live_next = r->live_next;
  else R.conns = r->live_next;
  if (r->live_next) r->live_next->live_prev = r->live_prev;
  flush_unlink(r);
  fb_redis_sub_free(r);
  free(r->password);
  free(r->user);
  free(r);
  R.live_conns--;
}

/* Drops the connection: every op still waiting fails with why (a static string). Outside a
 * hiredis callback the context is gone when this returns, and r too unless boxed; inside
 * one, hiredis frees it after the callback and on_disconnect follows. */
void fb_redis_discard(fb_redis_t *r, const char *why, const char *code) {
  redisAsyncContext *ac = r->ac;
  if (!ac) {
    redis_maybe_free(r);
    return;
  }
  if (r->discarding) return;
  r->discarding = 1;
  r->why = why;
  r->why_code = code;
  snprintf(r->lost, sizeof r->lost, "%s", why);
  r->lost_code = "closed";
  if (ac->c.flags & REDIS_IN_CALLBACK) {
    redisAsyncFree(ac);
    return;
  }
  r->in_free = 1;
  redisAsyncFree(ac);           /* runs each pending on_reply with NULL, then on_disconnect */
  r->in_free = 0;
  r->ac = NULL;
  redis_maybe_free(r);
}

/* ---- the libuv adapter ------------------------------------------------------------- */

/* hiredis' adapters/libuv.h provides the struct and redisLibuvAttach; its hooks are replaced
 * for two reasons. libuv (1.44) reports POLLERR, a refused connect for one, by stopping the
 * handle and calling back with UV_EBADF, which the adapter ignores: the connect would hang
 * until its timeout. And live() counts the poll handle until its close callback. */
static void on_poll(uv_poll_t *h, int status, int events) {
  redisLibuvEvents *p = h->data;
  if (!p->context) return;
  if (status < 0) {             /* let hiredis read the socket's error and disconnect */
    if (!(p->context->c.flags & REDIS_CONNECTED)) redisAsyncHandleWrite(p->context);
    else redisAsyncHandleRead(p->context);
    return;
  }
  if (p->context && (events & UV_READABLE)) redisAsyncHandleRead(p->context);
  if (p->context && (events & UV_WRITABLE)) redisAsyncHandleWrite(p->context);
}

static void poll_set(redisLibuvEvents *p, int events) {
  if (p->events == events) return;   /* uv_poll_start re-registers the fd: 2 syscalls */
  p->events = events;
  if (events) uv_poll_start(&p->handle, events, on_poll);
  else uv_poll_stop(&p->handle);
}

static void ev_add_read(void *data) {
  redisLibuvEvents *p = data;
  poll_set(p, p->events | UV_READABLE);
}

static void ev_del_read(void *data) {
  redisLibuvEvents *p = data;
  poll_set(p, p->events & ~UV_READABLE);
}

/* Writes are coalesced: a command queued on a connected context does not start a writable
 * poll (an fd re-registration, then a wait for the next poll) but puts the connection in a
 * list that the prepare handle flushes right before the loop polls, one write per connection
 * for everything fibers queued in that turn. Only a write that cannot finish polls. */
static struct {
  uv_prepare_t prepare;
  int ready, flushing;
  fb_redis_t *head;
} F;

static void on_flush(uv_prepare_t *h) {
  fb_redis_t *r;
  F.flushing = 1;
  while ((r = F.head)) {
    F.head = r->flush_next;     /* unlinked first: a failed write may free r */
    r->flush_next = NULL;
    r->flush_queued = 0;
    if (r->ac && !r->discarding) redisAsyncHandleWrite(r->ac);
  }
  F.flushing = 0;
  uv_prepare_stop(h);
}

static void flush_unlink(fb_redis_t *r) {
  fb_redis_t **pp;
  if (!r->flush_queued) return;
  for (pp = &F.head; *pp; pp = &(*pp)->flush_next)
    if (*pp == r) {
      *pp = r->flush_next;
      break;
    }
  r->flush_queued = 0;
}

static void ev_add_write(void *data) {
  redisLibuvEvents *p = data;
  redisAsyncContext *ac = p->context;
  fb_redis_t *r = ac ? ac->data : NULL;
  if (!r || F.flushing || !(ac->c.flags & REDIS_CONNECTED)) {   /* connecting: must poll */
    poll_set(p, p->events | UV_WRITABLE);
    return;
  }
  if (r->flush_queued) return;
  r->flush_queued = 1;
  r->flush_next = F.head;
  F.head = r;
  if (!F.ready) {
    uv_prepare_init(fb_sched_loop(), &F.prepare);
    uv_unref((uv_handle_t *)&F.prepare);
    F.ready = 1;
  }
  uv_prepare_start(&F.prepare, on_flush);
}

static void ev_del_write(void *data) {
  redisLibuvEvents *p = data;
  poll_set(p, p->events & ~UV_WRITABLE);
}

static void on_poll_closed(uv_handle_t *h) {
  free(h->data);                /* the adapter's redisLibuvEvents */
  R.live_polls--;
}

/* hiredis calls this as it frees the context: the context pointer goes, the handle closes. */
static void ev_cleanup(void *data) {
  redisLibuvEvents *p = data;
  p->context = NULL;
  uv_close((uv_handle_t *)&p->handle, on_poll_closed);
}

/* An idle connection does not keep the process alive: its poll handle is referenced only
 * while a connect or a command is in flight (a timeout-less wait would otherwise end). */
void fb_redis_poll_ref_update(fb_redis_t *r) {
  redisLibuvEvents *p;
  if (!r->ac || r->discarding || !(p = r->ac->ev.data)) return;
  if (r->ops || r->connecting || r->sub_fiber) uv_ref((uv_handle_t *)&p->handle);
  else uv_unref((uv_handle_t *)&p->handle);
}

/* ---- commands ----------------------------------------------------------------------- */

fb_redis_t *fb_redis_check(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, REDIS_MT);
  if (!box->r) luaL_error(L, "redis: connection is closed");
  return box->r;
}

/* Seconds from argument idx: none/nil = wait forever (-1). */
double fb_redis_opt_timeout(lua_State *L, int idx) {
  double s;
  if (lua_isnoneornil(L, idx)) return -1;
  s = luaL_checknumber(L, idx);
  if (!(s >= 0)) luaL_error(L, "redis: timeout must be a non-negative number of seconds");
  return s > 1e9 ? -1 : s;
}

/* ---- connecting ------------------------------------------------------------------- */

static void connect_done(fb_redis_t *r) {
  fb_fiber_t *f = r->cfiber;
  lua_State *co = fb_fiber_thread(f);
  box_t *box;
  lua_checkstack(co, 2);
  box = lua_newuserdata(co, sizeof *box);   /* stack: box; from here the box owns r */
  box->r = r;
  luaL_getmetatable(co, REDIS_MT);
  lua_setmetatable(co, -2);
  r->boxed = 1;
  r->connecting = 0;
  r->cfiber = NULL;
  fb_redis_poll_ref_update(r);
  fb_fiber_ready(f, 1);
}

/* Fails the connect with msg; hiredis frees the context once the callback returns. */
static void connect_fail(fb_redis_t *r, const char *msg, const char *code) {
  fb_fiber_t *f = r->cfiber;
  r->cfiber = NULL;
  r->connecting = 0;
  if (f) fb_redis_resume_error(f, msg, code);
}

/* AUTH, then SELECT: privdata is r; replies come in the order they were queued. */
static void on_setup_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  fb_redis_t *r = privdata;
  const redisReply *rp = reply;
  int auth = r->password != NULL;
  char msg[256];
  (void)ac;
  r->setup_pending--;
  if (!r->cfiber) return;       /* failed already: the rest are NULL replies from the free */
  if (auth) {                   /* this reply was AUTH's; the password is no longer needed */
    free(r->password);
    r->password = NULL;
  }
  if (!rp) {
    snprintf(msg, sizeof msg, "connection lost while connecting (%s: %s)", r->where,
             ac->errstr && ac->errstr[0] ? ac->errstr : "closed by the server");
    connect_fail(r, msg, "connection_lost");
    return;                     /* on_disconnect follows and frees r */
  }
  if (rp->type == REDIS_REPLY_ERROR) {
    snprintf(msg, sizeof msg, "%s failed: %.*s", auth ? "AUTH" : "SELECT",
             (int)(rp->len > 200 ? 200 : rp->len), rp->str);
    connect_fail(r, msg, auth ? "auth" : "redis_error");
    fb_redis_discard(r, "connection closed: its setup failed", "closed");
    return;
  }
  if (r->setup_pending == 0) connect_done(r);
}

static void on_connect(const redisAsyncContext *cac, int status) {
  redisAsyncContext *ac = (redisAsyncContext *)cac;
  fb_redis_t *r = ac->data;
  int e = errno;                /* the connect's SO_ERROR, set by hiredis just before */
  if (status != REDIS_OK) {
    r->ac = NULL;               /* hiredis frees it when this returns; no on_disconnect */
    connect_fail(r, ac->c.errstr, errno_code(e));
    redis_maybe_free(r);
    return;
  }
  if (r->password) {
    const char *argv[3] = { "AUTH", r->user ? r->user : r->password, r->password };
    size_t lens[3] = { 4, strlen(argv[1]), strlen(r->password) };
    int argc = r->user ? 3 : 2;
    if (!r->user) lens[1] = lens[2];
    if (redisAsyncCommandArgv(ac, on_setup_reply, r, argc, argv, lens) == REDIS_OK)
      r->setup_pending++;
    free(r->user);
    r->user = NULL;
  }
  if (r->db != 0) {
    char db[24];
    const char *argv[2] = { "SELECT", db };
    size_t lens[2] = { 6, (size_t)snprintf(db, sizeof db, "%ld", r->db) };
    if (redisAsyncCommandArgv(ac, on_setup_reply, r, 2, argv, lens) == REDIS_OK)
      r->setup_pending++;
    r->db = 0;                  /* on_setup_reply tells AUTH from SELECT by password */
  }
  if (r->setup_pending == 0) connect_done(r);
}

static void on_disconnect(const redisAsyncContext *ac, int status) {
  fb_redis_t *r = ac->data;
  (void)status;
  r->ac = NULL;
  if (!r->discarding) {
    fb_redis_lost_message(r, ac, r->lost, sizeof r->lost);
    r->lost_code = "connection_lost";
  }
  redis_maybe_free(r);          /* not while in_free: redis_discard finishes that */
}

static void connect_cancel(fb_fiber_t *f, void *data) {
  fb_redis_t *r = data;
  (void)f;
  r->cfiber = NULL;
  r->connecting = 0;
  fb_redis_discard(r, "connection closed: connect timed out or was cancelled", "closed");
}

/* connect(host, port, path, timeout, password, user, db, max_elements) -> conn |
 * nil, msg, code. host+port for TCP (a numeric address connects without blocking; a name
 * is resolved by hiredis, blocking), or path for a unix socket. */
static int l_redis_connect(lua_State *L) {
  const char *host = luaL_optstring(L, 1, NULL);   /* borrowed: arguments stay put */
  lua_Integer port = luaL_optinteger(L, 2, 6379);
  const char *path = luaL_optstring(L, 3, NULL);
  double timeout = fb_redis_opt_timeout(L, 4);
  const char *password = luaL_optstring(L, 5, NULL);
  const char *user = luaL_optstring(L, 6, NULL);
  lua_Integer db = luaL_optinteger(L, 7, 0);
  lua_Number maxel = luaL_optnumber(L, 8, REDIS_MAX_ELEMENTS);
  redisAsyncContext *ac;
  fb_redis_t *r;
  fb_fiber_t *f;
  int e;

  if (!host == !path) return luaL_error(L, "redis.connect: give a host or a socket path");
  if (port < 1 || port > 65535) return luaL_error(L, "redis.connect: port must be 1..65535");
  if (db < 0 || db > 1000000) return luaL_error(L, "redis.connect: bad database number");
  if (!(maxel >= 1 && maxel <= REDIS_MAX_ELEMENTS_CEIL))
    return luaL_error(L, "redis.connect: max_elements must be from 1 to %d",
                      (int)REDIS_MAX_ELEMENTS_CEIL);
  f = fb_fiber_check(L, "redis.connect");
  if (!(r = calloc(1, sizeof *r))) return luaL_error(L, "redis.connect: out of memory");
  if (host && strchr(host, ':')) snprintf(r->where, sizeof r->where, "[%s]:%d", host, (int)port);
  else if (host) snprintf(r->where, sizeof r->where, "%s:%d", host, (int)port);
  else snprintf(r->where, sizeof r->where, "%s", path);
  snprintf(r->lost, sizeof r->lost, "connection is closed");
  r->lost_code = "closed";
  r->db = (long)db;
  r->max_elements = (size_t)maxel;
  r->sub_max_bytes = REDIS_SUB_MAX_BYTES;
  if ((password && !(r->password = strdup(password))) || (user && !(r->user = strdup(user)))) {
    free(r->password);
    free(r);
    return luaL_error(L, "redis.connect: out of memory");
  }
  r->live_next = R.conns;
  if (R.conns) R.conns->live_prev = r;
  R.conns = r;
  R.live_conns++;
  r->connecting = 1;

  errno = 0;
  ac = host ? redisAsyncConnect(host, (int)port) : redisAsyncConnectUnix(path);
  e = errno;
  if (!ac || ac->err) {         /* failed at once (a unix path that does not exist...) */
    char msg[128];
    snprintf(msg, sizeof msg, "%s", ac ? ac->errstr : "out of memory");
    if (ac) redisAsyncFree(ac);
    r->connecting = 0;
    redis_maybe_free(r);
    return fb_redis_push_error(L, msg, ac ? errno_code(e) : "ENOMEM");
  }
  r->ac = ac;
  ac->data = r;
  if (redisLibuvAttach(ac, fb_sched_loop()) != REDIS_OK) {
    r->connecting = 0;
    fb_redis_discard(r, "cannot watch the socket", "ENOMEM");
    return fb_redis_push_error(L, "cannot watch the socket", "ENOMEM");
  }
  ac->ev.addRead = ev_add_read;
  ac->ev.delRead = ev_del_read;
  ac->ev.addWrite = ev_add_write;
  ac->ev.delWrite = ev_del_write;
  ac->ev.cleanup = ev_cleanup;
  R.live_polls++;
  if (!default_create_array) {  /* every reader starts with hiredis' default functions */
    bounded_fns = *ac->c.reader->fn;
    default_create_array = bounded_fns.createArray;
    bounded_fns.createArray = bounded_create_array;
  }
  ac->c.reader->fn = &bounded_fns;
  ac->c.reader->privdata = r;
  redisAsyncSetConnectCallback(ac, on_connect);
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  /* hiredis 0.14 learns the connect's outcome on the first writable event, and asks for one
   * only when a command is queued: ask now, so on_connect comes even with nothing to send. */
  ac->ev.addWrite(ac->ev.data);
  r->cfiber = f;
  fb_fiber_on_cancel(f, connect_cancel, r);
  return fb_fiber_suspend(L, f, timeout);
}

/* ---- connection methods ----------------------------------------------------------- */

/* close: idempotent. Fibers waiting on the connection fail with "connection is closed";
 * the struct is freed once hiredis has let go of it. */
static int l_redis_close(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, REDIS_MT);
  fb_redis_t *r = box->r;
  if (!r) return 0;
  box->r = NULL;
  r->boxed = 0;
  fb_redis_discard(r, "connection is closed", "closed");
  return 0;
}

/* __gc: no fiber can be waiting on an unreachable connection except at lua_close, when
 * their threads are going away: detach them before dropping the connection. */
static int l_redis_gc(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, REDIS_MT);
  cmd_op_t *op;
  if (box->r)
    for (op = box->r->ops; op; op = op->next) op->fiber = NULL;
  if (box->r) fb_redis_sub_detach(box->r);
  return l_redis_close(L);
}

/* state(conn) -> "open" | "lost" (it went away, or was dropped after a timeout or a
 * cancel: only close() is left) | "closed". */
static int l_redis_state(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, REDIS_MT);
  fb_redis_t *r = box->r;
  lua_pushstring(L, !r ? "closed" : r->ac && !r->discarding ? "open" : "lost");
  return 1;
}

/* live() -> connections + poll handles, commands in flight. */
static int l_redis_live(lua_State *L) {
  lua_pushnumber(L, (lua_Number)fb_redis_live_conns());
  lua_pushnumber(L, (lua_Number)fb_redis_live_requests());
  return 2;
}

/* Run by lua_close (fb_sched_on_close): detach every waiting fiber, then
 * drop every context; the loop run after lua_close delivers the adapters' close callbacks. */
static void on_lua_close(void) {
  fb_redis_t *r, *next;
  cmd_op_t *op;
  for (r = R.conns; r; r = r->live_next) {
    r->cfiber = NULL;
    r->connecting = 0;
    for (op = r->ops; op; op = op->next) op->fiber = NULL;
    fb_redis_sub_detach(r);
  }
  F.head = NULL;
  for (r = R.conns; r; r = r->live_next) r->flush_queued = 0;
  if (F.ready) {
    uv_close((uv_handle_t *)&F.prepare, NULL);
    F.ready = 0;
  }
  for (r = R.conns; r; r = next) {
    next = r->live_next;        /* redis_discard may free r */
    fb_redis_discard(r, "connection is closed", "closed");
  }
}

static const luaL_Reg redis_methods[] = {
  { "call", fb_redis_l_call },
  { "pipeline", fb_redis_l_pipeline },
  { "subscribe", fb_redis_l_subscribe },
  { "next_message", fb_redis_l_next_message },
  { "close", l_redis_close },
  { "state", l_redis_state },
  { NULL, NULL }
};

static const luaL_Reg redis_funcs[] = {
  { "connect", l_redis_connect },
  { "live", l_redis_live },
  { NULL, NULL }
};

int luaopen_fibril_core_redis(lua_State *L) {
  lua_newtable(L);                           /* stack: module */
  luaL_setfuncs(L, redis_funcs, 0);
  lua_newtable(L);                           /* stack: module methods */
  luaL_setfuncs(L, redis_methods, 0);
  if (luaL_newmetatable(L, REDIS_MT)) {      /* stack: module methods mt */
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_redis_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_redis_close);
    lua_setfield(L, -2, "__close");
    fb_sched_on_close(on_lua_close);
  }
  lua_pop(L, 1);
  lua_setfield(L, -2, "methods");            /* for lua/fibril/redis.lua */
  lua_pushlightuserdata(L, NULL);            /* the nil inside arrays: same as json.null */
  lua_setfield(L, -2, "null");
  lua_pushnumber(L, REDIS_MAX_ELEMENTS);
  lua_setfield(L, -2, "MAX_ELEMENTS");
  return 1;
}
