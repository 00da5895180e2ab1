/* pg.c: PostgreSQL connections for fibers on libpq's asynchronous API, with a uv_poll on
 * PQsocket: connecting (PQconnectStartParams/PQconnectPoll), the poll handle, the end of a
 * connection (its waiting fibers always resumed), cancel requests on the thread pool (PQcancel
 * blocks), and the Lua module fibril.core.pg. Queries are in pg_query.c. The struct is freed
 * once it is dead and no Lua box points to it; lua_close detaches its fibers (fb_sched_on_close). */
#include "pg.h"

#include <lauxlib.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "pg_conn.h"
#include "pg_result.h"

#define PG_MAX_BYTES_DEFAULT (64u << 20)

const char *const fb_pg_state_names[] = { "connecting", "idle", "busy", "draining", "dead" };

typedef struct {                 /* a PQcancel running on the thread pool */
  uv_work_t req;
  PGcancel *cancel;
  char err[256];
} cancel_work_t;

size_t fb_pg_live_ops;

static struct {
  fb_pg_t *conns;               /* every struct not yet freed: detached at lua_close */
  size_t live_conns, live_polls, live_cancels;
} P;

size_t fb_pg_live_conns(void) { return P.live_conns + P.live_polls; }
size_t fb_pg_live_requests(void) { return fb_pg_live_ops + P.live_cancels; }

static void connect_step(fb_pg_t *p);

/* ---- errors: C reports (nil, msg, code), lua/fibril/pg.lua raises ---------------------- */

int fb_pg_push_error(lua_State *L, const char *msg, const char *code) {
  lua_pushnil(L);
  lua_pushstring(L, msg);
  lua_pushstring(L, code);
  return 3;
}

/* Resumes the waiting fiber with nil, msg, code, dropping what the op had pushed. */
void fb_pg_fail_fiber(fb_pg_t *p, const char *msg, const char *code) {
  fb_fiber_t *f = p->fiber;
  lua_State *co;
  if (!f) return;
  p->fiber = NULL;
  co = fb_fiber_thread(f);
  if (p->pushed) lua_pop(co, p->pushed);
  p->pushed = 0;
  lua_checkstack(co, 3);
  fb_fiber_ready(f, fb_pg_push_error(co, msg, code));
}

/* ---- the poll handle ------------------------------------------------------------------ */

static void on_poll_closed(uv_handle_t *h) {
  free(h);
  P.live_polls--;
}

static void poll_close(fb_pg_t *p) {
  if (!p->poll) return;
  p->poll->data = NULL;
  uv_close((uv_handle_t *)p->poll, on_poll_closed);
  p->poll = NULL;
  p->events = 0;
}

static void on_poll(uv_poll_t *h, int status, int events) {
  fb_pg_t *p = h->data;
  (void)events;
  if (!p) return;
  /* libuv reports POLLERR by stopping the handle: the socket's error is libpq's to read,
   * and the next poll_watch must start the handle again. */
  if (status < 0) p->events = 0;
  if (p->state == FB_PG_CONNECTING) connect_step(p);
  else fb_pg_io_step(p);
}

/* Watches the connection's current socket for events; libpq may change the socket while
 * connecting (another host, or SSL refused), so a new fd gets a new handle. */
int fb_pg_poll_watch(fb_pg_t *p, int events) {
  int fd = PQsocket(p->conn);
  if (fd < 0) return -1;
  if (p->poll && fd != p->fd) poll_close(p);
  if (!p->poll) {
    if (!(p->poll = malloc(sizeof *p->poll))) return -1;
    if (uv_poll_init(fb_sched_loop(), p->poll, fd) != 0) {
      free(p->poll);
      p->poll = NULL;
      return -1;
    }
    P.live_polls++;
    p->poll->data = p;
    p->fd = fd;
    p->events = 0;
  }
  if (events != p->events) {
    p->events = events;
    uv_poll_start(p->poll, events, on_poll);
  }
  /* An idle connection does not keep the process alive; one in use does. */
  if (p->state == FB_PG_IDLE) uv_unref((uv_handle_t *)p->poll);
  else uv_ref((uv_handle_t *)p->poll);
  return 0;
}

/* ---- lifetime -------------------------------------------------------------------------- */

static void pg_maybe_free(fb_pg_t *p) {
  if (p->state != FB_PG_DEAD || p->boxed || p->fiber || p->nfiber) return;
  if (p->live_prev) p->live_prev->live_next = p->live_next;
  else P.conns = p->live_next;
  if (p->live_next) p->live_next->live_prev = p->live_prev;
  free(p);
  P.live_conns--;
}

static void cancel_work(uv_work_t *req) {
  cancel_work_t *w = req->data;
  PQcancel(w->cancel, w->err, sizeof w->err);   /* blocks: a connect and a packet */
}

static void cancel_done(uv_work_t *req, int status) {
  cancel_work_t *w = req->data;
  (void)status;
  PQfreeCancel(w->cancel);
  free(w);
  P.live_cancels--;
}

/* Asks the server to cancel what the connection runs, from the thread pool: PQcancel opens
 * a new connection and blocks. The work holds its own PGcancel, not the connection. */
void fb_pg_send_cancel(fb_pg_t *p) {
  cancel_work_t *w = calloc(1, sizeof *w);
  if (!w) return;
  if (!(w->cancel = PQgetCancel(p->conn))) {
    free(w);
    return;
  }
  w->req.data = w;
  if (uv_queue_work(fb_sched_loop(), &w->req, cancel_work, cancel_done) != 0) {
    PQfreeCancel(w->cancel);
    free(w);
    return;
  }
  P.live_cancels++;
}

/* The connection ends: waiting fibers fail with msg (and later calls too). cancel: the
 * server may still be running our query (a discard, not a loss), so ask it to stop. */
void fb_pg_dead(fb_pg_t *p, const char *msg, const char *code, int cancel) {
  if (p->state == FB_PG_DEAD) return;
  snprintf(p->lost, sizeof p->lost, "%s", msg);
  p->lost_code = code;
  fb_pg_fail_fiber(p, msg, code);
  if (p->nfiber) {
    fb_fiber_t *f = p->nfiber;
    p->nfiber = NULL;
    lua_checkstack(fb_fiber_thread(f), 3);
    fb_fiber_ready(f, fb_pg_push_error(fb_fiber_thread(f), msg, code));
  }
  if (cancel && (p->state == FB_PG_BUSY || p->state == FB_PG_DRAINING)) fb_pg_send_cancel(p);
  if (p->state == FB_PG_BUSY) fb_pg_live_ops--;
  p->state = FB_PG_DEAD;
  poll_close(p);                /* before PQfinish closes the socket */
  PQfinish(p->conn);
  p->conn = NULL;
  pg_maybe_free(p);
}

/* The server went away or the socket failed: "connection lost (where: libpq's reason)". */
void fb_pg_lost(fb_pg_t *p) {
  char line[120], msg[sizeof line + sizeof p->where + 32];
  fb_pg_first_line(line, sizeof line, PQerrorMessage(p->conn));
  snprintf(msg, sizeof msg, "connection lost (%s: %s)", p->where,
           line[0] ? line : "server closed the connection");
  fb_pg_dead(p, msg, "connection_lost", 0);
}

/* ---- connecting ---------------------------------------------------------------------------- */

static void connect_done(fb_pg_t *p) {
  fb_fiber_t *f = p->fiber;
  lua_State *co = fb_fiber_thread(f);
  fb_pg_box_t *box;
  lua_checkstack(co, 2);
  box = lua_newuserdata(co, sizeof *box);    /* stack: box; from here the box owns p */
  box->p = p;
  luaL_getmetatable(co, FB_PG_MT);
  lua_setmetatable(co, -2);
  p->boxed = 1;
  p->fiber = NULL;
  fb_fiber_ready(f, 1);
}

static void on_notice(void *arg, const char *msg) {
  (void)arg;                    /* NOTICE and WARNING lines: libpq would print them */
  (void)msg;
}

static void connect_step(fb_pg_t *p) {
  PostgresPollingStatusType st = PQconnectPoll(p->conn);
  int events;
  if (st == PGRES_POLLING_FAILED) {
    char line[256];
    fb_pg_first_line(line, sizeof line, PQerrorMessage(p->conn));
    fb_pg_dead(p, line[0] ? line : "connection failed", "connect_failed", 0);
    return;
  }
  if (st == PGRES_POLLING_OK) {
    p->state = FB_PG_IDLE;
    PQsetnonblocking(p->conn, 1);
    PQsetNoticeProcessor(p->conn, on_notice, NULL);
    if (fb_pg_poll_watch(p, UV_READABLE) != 0) {
      fb_pg_dead(p, "cannot watch the socket", "ENOMEM", 0);
      return;
    }
    connect_done(p);
    return;
  }
  events = st == PGRES_POLLING_READING ? UV_READABLE : UV_WRITABLE;
  if (fb_pg_poll_watch(p, events) != 0) fb_pg_dead(p, "cannot watch the socket", "ENOMEM", 0);
}

static void connect_cancel(fb_fiber_t *f, void *data) {
  fb_pg_t *p = data;
  (void)f;
  p->fiber = NULL;
  fb_pg_dead(p, "connect timed out or was cancelled", "closed", 0);
}

/* connect(conninfo, timeout, max_bytes) -> conn | nil, msg, code. conninfo is a URL
 * (postgresql://...) or a keyword string (host=... dbname=...). A host name is resolved by
 * libpq with a blocking getaddrinfo: give an address (or hostaddr=) where DNS may be slow. */
static int l_pg_connect(lua_State *L) {
  const char *conninfo = luaL_checkstring(L, 1);
  double timeout = fb_pg_opt_timeout(L, 2);
  lua_Number maxb = luaL_optnumber(L, 3, PG_MAX_BYTES_DEFAULT);
  static const char *const keys[] = { "dbname", "fallback_application_name", NULL };
  const char *vals[] = { conninfo, "fibril", NULL };
  fb_fiber_t *f;
  fb_pg_t *p;
  const char *host, *port;

  if (!(maxb >= 1)) return luaL_error(L, "pg.connect: max_result_bytes must be positive");
  f = fb_fiber_check(L, "pg.connect");
  if (!(p = calloc(1, sizeof *p))) return luaL_error(L, "pg.connect: out of memory");
  p->max_bytes = maxb > 1e15 ? (size_t)1e15 : (size_t)maxb;
  p->state = FB_PG_CONNECTING;
  p->fd = -1;
  p->live_next = P.conns;
  if (P.conns) P.conns->live_prev = p;
  P.conns = p;
  P.live_conns++;
  p->conn = PQconnectStartParams(keys, vals, 1);
  if (!p->conn) {
    fb_pg_dead(p, "out of memory", "ENOMEM", 0);
    return fb_pg_push_error(L, "out of memory", "ENOMEM");
  }
  host = PQhost(p->conn);
  port = PQport(p->conn);
  if (host && host[0] == '/') snprintf(p->where, sizeof p->where, "%s", host);
  else if (host && strchr(host, ':')) snprintf(p->where, sizeof p->where, "[%s]:%s", host, port ? port : "");
  else snprintf(p->where, sizeof p->where, "%s:%s", host ? host : "?", port ? port : "5432");
  if (PQstatus(p->conn) == CONNECTION_BAD) {   /* malformed conninfo, refused at once... */
    char line[200];
    fb_pg_first_line(line, sizeof line, PQerrorMessage(p->conn));
    lua_pushnil(L);
    lua_pushstring(L, line[0] ? line : "connection failed");
    lua_pushliteral(L, "connect_failed");
    fb_pg_dead(p, "connect failed", "connect_failed", 0);
    return 3;
  }
  p->fiber = f;
  /* libpq's own first step is to wait for writable (its docs: act as if POLLING_WRITING). */
  if (fb_pg_poll_watch(p, UV_WRITABLE) != 0) {
    p->fiber = NULL;
    fb_pg_dead(p, "cannot watch the socket", "ENOMEM", 0);
    return fb_pg_push_error(L, "cannot watch the socket", "ENOMEM");
  }
  fb_fiber_on_cancel(f, connect_cancel, p);
  return fb_fiber_suspend(L, f, timeout);
}

/* ---- connection methods -------------------------------------------------------------------- */

/* Forgets the fibers waiting on p, whose threads are going away (lua_close). */
static void detach(fb_pg_t *p) {
  if (p->state == FB_PG_BUSY) {
    fb_pg_live_ops--;
    p->state = FB_PG_DRAINING;
  }
  p->fiber = NULL;
  p->nfiber = NULL;
}

/* close: idempotent. Fibers waiting on the connection fail with "connection is closed"; a
 * query still running in the server is cancelled there. */
static int l_pg_close(lua_State *L) {
  fb_pg_box_t *box = luaL_checkudata(L, 1, FB_PG_MT);
  fb_pg_t *p = box->p;
  if (!p) return 0;
  box->p = NULL;
  p->boxed = 0;
  if (p->state == FB_PG_DEAD) pg_maybe_free(p);
  else fb_pg_dead(p, "connection is closed", "closed", 1);
  return 0;
}

/* __gc: only at lua_close can a fiber still wait on an unreachable connection, and its
 * thread is going away: detach it first. */
static int l_pg_gc(lua_State *L) {
  fb_pg_box_t *box = luaL_checkudata(L, 1, FB_PG_MT);
  if (box->p) detach(box->p);
  return l_pg_close(L);
}

/* state(conn) -> "idle" | "busy" | "draining" | "dead" | "closed". With check = true, an
 * idle connection first reads what its socket holds without waiting (poll with timeout 0),
 * so one the server closed while it sat idle reads as "dead" before it is handed out. */
static int l_pg_state(lua_State *L) {
  fb_pg_box_t *box = luaL_checkudata(L, 1, FB_PG_MT);
  fb_pg_t *p = box->p;
  if (p && p->state == FB_PG_IDLE && lua_toboolean(L, 2)) {
    struct pollfd pfd = { PQsocket(p->conn), POLLIN, 0 };
    if (poll(&pfd, 1, 0) > 0) fb_pg_io_step(p);
  }
  lua_pushstring(L, !p ? "closed" : fb_pg_state_names[p->state]);
  return 1;
}

/* txstatus(conn) -> "idle" | "active" | "intrans" | "inerror" | "unknown" */
static int l_pg_txstatus(lua_State *L) {
  fb_pg_t *p = fb_pg_check_box(L);
  static const char *const names[] = { "idle", "active", "intrans", "inerror", "unknown" };
  PGTransactionStatusType t = p->conn ? PQtransactionStatus(p->conn) : PQTRANS_UNKNOWN;
  lua_pushstring(L, names[t <= PQTRANS_UNKNOWN ? t : PQTRANS_UNKNOWN]);
  return 1;
}

/* info(conn) -> where, backend pid, server version, why it died (or nil), its code. */
static int l_pg_info(lua_State *L) {
  fb_pg_box_t *box = luaL_checkudata(L, 1, FB_PG_MT);
  fb_pg_t *p = box->p;
  if (!p) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushstring(L, p->where);
  lua_pushnumber(L, p->conn ? PQbackendPID(p->conn) : 0);
  lua_pushnumber(L, p->conn ? PQserverVersion(p->conn) : 0);
  if (p->state == FB_PG_DEAD) {
    lua_pushstring(L, p->lost);
    lua_pushstring(L, p->lost_code);
    return 5;
  }
  return 3;
}

/* live() -> connections + poll handles, operations in flight + cancel requests. */
static int l_pg_live(lua_State *L) {
  lua_pushnumber(L, (lua_Number)fb_pg_live_conns());
  lua_pushnumber(L, (lua_Number)fb_pg_live_requests());
  return 2;
}

/* Run by lua_close (fb_sched_on_close): detach every waiting fiber, then
 * drop every connection; the loop run after lua_close delivers the close callbacks. */
static void on_lua_close(void) {
  fb_pg_t *p, *next;
  for (p = P.conns; p; p = p->live_next) detach(p);
  for (p = P.conns; p; p = next) {
    next = p->live_next;        /* pg_dead may free p */
    p->boxed = 0;
    fb_pg_dead(p, "connection is closed", "closed", 0);
  }
}

static const luaL_Reg pg_methods[] = {
  { "query", fb_pg_l_query },
  { "query_prepared", fb_pg_l_query_prepared },
  { "prepare", fb_pg_l_prepare },
  { "wait_idle", fb_pg_l_wait_idle },
  { "wait_notify", fb_pg_l_wait_notify },
  { "batch", fb_pg_l_batch },
  { "state", l_pg_state },
  { "txstatus", l_pg_txstatus },
  { "info", l_pg_info },
  { "close", l_pg_close },
  { NULL, NULL }
};

static const luaL_Reg pg_funcs[] = {
  { "connect", l_pg_connect },
  { "live", l_pg_live },
  { NULL, NULL }
};

int luaopen_fibril_core_pg(lua_State *L) {
  lua_newtable(L);                           /* stack: module */
  luaL_setfuncs(L, pg_funcs, 0);
  lua_newtable(L);                           /* stack: module methods */
  luaL_setfuncs(L, pg_methods, 0);
  if (luaL_newmetatable(L, FB_PG_MT)) {         /* stack: module methods mt */
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_pg_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_pg_close);
    lua_setfield(L, -2, "__close");
    fb_sched_on_close(on_lua_close);
  }
  lua_pop(L, 1);
  lua_setfield(L, -2, "methods");            /* for lua/fibril/pg.lua */
  lua_pushlightuserdata(L, NULL);            /* SQL NULL: the same value as json.null */
  lua_setfield(L, -2, "null");
  lua_pushnumber(L, PG_MAX_BYTES_DEFAULT);
  lua_setfield(L, -2, "MAX_RESULT_BYTES");
  return 1;
}
