/* pg.c: PostgreSQL connections for fibers on libpq's asynchronous API, with a uv_poll on
 * PQsocket. One operation at a time per connection (the pool in lua/fibril/pg gives each
 * connection to one fiber); its waiting fiber is always resumed or detached. A detached query
 * (timeout, cancel) is cancelled on the server from the thread pool (PQcancel blocks) while
 * the connection drains its results, then it is idle again. Rows are pushed onto the waiting
 * fiber's thread as they arrive (single-row mode), counted against max_bytes. */
#include "pg.h"

#include <lauxlib.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "fiber.h"
#include "pg_result.h"

#define PG_MT "fibril.pg"
#define PG_PARAMS_STACK 16           /* parameter arrays up to this size live on the C stack */
#define PG_MAX_PARAMS 65535          /* the protocol's limit */
#define PG_MAX_BYTES_DEFAULT (64u << 20)

enum { ST_CONNECTING, ST_IDLE, ST_BUSY, ST_DRAINING, ST_DEAD };
static const char *const state_names[] = { "connecting", "idle", "busy", "draining", "dead" };

struct fb_pg_s {
  PGconn *conn;                 /* NULL once dead */
  uv_poll_t *poll;              /* NULL once closing; its data points here until then */
  int fd, events;
  unsigned char state;
  unsigned char boxed;          /* a Lua box points here; else the connect op owns it */
  unsigned char listening;      /* keep notifications for wait_notify, else drop them */
  unsigned char flushing;       /* output still queued in libpq: wait for writable too */
  unsigned char failed;         /* the query's result is an error (already pushed) */
  int pushed;                   /* values pushed onto the waiting fiber's thread so far */
  fb_pg_t *live_next, *live_prev;
  fb_fiber_t *fiber;            /* waiting in connect, a query or wait_idle */
  fb_fiber_t *nfiber;           /* waiting in wait_notify */
  size_t max_bytes, bytes;      /* bound on one result's row bytes; this one's so far */
  double affected;              /* PQcmdTuples of the last result, -1 when none */
  char status[64];              /* PQcmdStatus of the last result ("INSERT 0 1") */
  char lost[256];               /* why the connection is dead, for later calls */
  const char *lost_code;        /* static: "closed", "connection_lost", "limit"... */
  char where[128];              /* "127.0.0.1:5432" or the socket directory */
};

typedef struct { fb_pg_t *p; } box_t;   /* the userdata; p is NULL once closed */

typedef struct {                 /* a PQcancel running on the thread pool */
  uv_work_t req;
  PGcancel *cancel;
  char err[256];
} cancel_work_t;

static struct {
  fb_pg_t *conns;               /* every struct not yet freed: detached at lua_close */
  size_t live_conns, live_polls, live_ops, live_cancels;
} P;

size_t fb_pg_live_conns(void) { return P.live_conns + P.live_polls; }
size_t fb_pg_live_requests(void) { return P.live_ops + P.live_cancels; }

static void io_step(fb_pg_t *p);
static void connect_step(fb_pg_t *p);

/* ---- errors: C reports (nil, msg, code), lua/fibril/pg.lua raises ---------------------- */

static int push_error(lua_State *L, const char *msg, const char *code) {
  lua_pushnil(L);
  lua_pushstring(L, msg);
  lua_pushstring(L, code);
  return 3;
}

/* Resumes the waiting fiber with nil, msg, code, dropping what the op had pushed. */
static void fail_fiber(fb_pg_t *p, const char *msg, const char *code) {
  fb_fiber_t *f = p->fiber;
  lua_State *co;
  if (!f) return;
  p->fiber = NULL;
  co = fb_fiber_thread(f);
  if (p->pushed) lua_pop(co, p->pushed);
  p->pushed = 0;
  lua_checkstack(co, 3);
  fb_fiber_ready(f, push_error(co, msg, code));
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
  (void)status;                 /* an error (POLLERR) is read by libpq from the socket */
  (void)events;
  if (!p) return;
  if (p->state == ST_CONNECTING) connect_step(p);
  else io_step(p);
}

/* Watches the connection's current socket for events; libpq may change the socket while
 * connecting (another host, or SSL refused), so a new fd gets a new handle. */
static int poll_watch(fb_pg_t *p, int events) {
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
  if (p->state == ST_IDLE) uv_unref((uv_handle_t *)p->poll);
  else uv_ref((uv_handle_t *)p->poll);
  return 0;
}

/* ---- lifetime -------------------------------------------------------------------------- */

static void pg_maybe_free(fb_pg_t *p) {
  if (p->state != ST_DEAD || p->boxed || p->fiber || p->nfiber) return;
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
static void send_cancel(fb_pg_t *p) {
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
static void pg_dead(fb_pg_t *p, const char *msg, const char *code, int cancel) {
  if (p->state == ST_DEAD) return;
  snprintf(p->lost, sizeof p->lost, "%s", msg);
  p->lost_code = code;
  fail_fiber(p, msg, code);
  if (p->nfiber) {
    fb_fiber_t *f = p->nfiber;
    p->nfiber = NULL;
    lua_checkstack(fb_fiber_thread(f), 3);
    fb_fiber_ready(f, push_error(fb_fiber_thread(f), msg, code));
  }
  if (cancel && (p->state == ST_BUSY || p->state == ST_DRAINING)) send_cancel(p);
  if (p->state == ST_BUSY) P.live_ops--;
  p->state = ST_DEAD;
  poll_close(p);                /* before PQfinish closes the socket */
  PQfinish(p->conn);
  p->conn = NULL;
  pg_maybe_free(p);
}

/* The server went away or the socket failed: "connection lost (where: libpq's reason)". */
static void pg_lost(fb_pg_t *p) {
  char line[120], msg[sizeof line + sizeof p->where + 32];
  fb_pg_first_line(line, sizeof line, PQerrorMessage(p->conn));
  snprintf(msg, sizeof msg, "connection lost (%s: %s)", p->where,
           line[0] ? line : "server closed the connection");
  pg_dead(p, msg, "connection_lost", 0);
}

/* ---- notifications ------------------------------------------------------------------------ */

/* Pushes the queued notifications as a list of { channel, payload, pid }; returns how many
 * (nothing is pushed when there are none). */
static int notifies_push(lua_State *co, PGconn *conn) {
  PGnotify *n;
  int i = 0;
  while ((n = PQnotifies(conn))) {
    lua_checkstack(co, 4);
    if (i == 0) lua_newtable(co);            /* stack: list */
    lua_createtable(co, 0, 3);
    lua_pushstring(co, n->relname);
    lua_setfield(co, -2, "channel");
    lua_pushstring(co, n->extra);
    lua_setfield(co, -2, "payload");
    lua_pushnumber(co, n->be_pid);
    lua_setfield(co, -2, "pid");
    lua_rawseti(co, -2, ++i);
    PQfreemem(n);
  }
  return i;
}

/* Hands queued notifications to the fiber in wait_notify; on a connection nobody listens
 * on, frees them so they cannot pile up. */
static void notifies_deliver(fb_pg_t *p) {
  PGnotify *n;
  if (!p->listening) {
    while ((n = PQnotifies(p->conn))) PQfreemem(n);
    return;
  }
  if (p->nfiber && notifies_push(fb_fiber_thread(p->nfiber), p->conn) > 0) {
    fb_fiber_t *f = p->nfiber;
    p->nfiber = NULL;
    fb_fiber_ready(f, 1);
  }
}

/* ---- queries ----------------------------------------------------------------------------- */

/* The query's last result has come (PQgetResult gave NULL): resume its fiber with
 * rows, post, affected, status, or the error already pushed. */
static void query_done(fb_pg_t *p) {
  fb_fiber_t *f = p->fiber;
  int n = p->pushed;
  p->state = ST_IDLE;
  P.live_ops--;
  p->fiber = NULL;
  p->pushed = 0;
  if (!f) return;
  if (!p->failed) {
    lua_State *co = fb_fiber_thread(f);
    lua_checkstack(co, 4);
    if (n == 3) {
      lua_remove(co, -2);                    /* stack: rows post */
    } else {
      lua_pushnil(co);
      lua_pushnil(co);
    }
    if (p->affected >= 0) lua_pushnumber(co, p->affected);
    else lua_pushnil(co);
    lua_pushstring(co, p->status);
    n = 4;
  }
  fb_fiber_ready(f, n);
}

/* Takes one result of the running query. Returns 0 when the connection was dropped. */
static int query_result(fb_pg_t *p, PGresult *res) {
  lua_State *co = p->fiber ? fb_fiber_thread(p->fiber) : NULL;
  ExecStatusType st = PQresultStatus(res);
  int i, ntuples;
  switch (st) {
  case PGRES_SINGLE_TUPLE:
  case PGRES_TUPLES_OK:
    if (!co || p->failed) break;
    if (p->pushed == 0) {
      fb_pg_rows_begin(co, res);
      p->pushed = 3;
    }
    ntuples = PQntuples(res);
    for (i = 0; i < ntuples; i++) {
      p->bytes += fb_pg_row_push(co, res, i);
      if (p->bytes > p->max_bytes) {
        char msg[200];
        snprintf(msg, sizeof msg, "result exceeds max_result_bytes (%zu); connection closed",
                 p->max_bytes);
        pg_dead(p, msg, "limit", 1);
        return 0;
      }
    }
    if (st == PGRES_TUPLES_OK) {
      p->affected = ntuples;
      if (PQcmdTuples(res)[0]) p->affected = atof(PQcmdTuples(res));
      snprintf(p->status, sizeof p->status, "%s", PQcmdStatus(res));
    }
    break;
  case PGRES_COMMAND_OK:
  case PGRES_EMPTY_QUERY:
    p->affected = PQcmdTuples(res)[0] ? atof(PQcmdTuples(res)) : -1;
    snprintf(p->status, sizeof p->status, "%s", PQcmdStatus(res));
    break;
  case PGRES_COPY_IN:           /* refuse the data: the server answers with an error */
    PQputCopyEnd(p->conn, "COPY FROM STDIN is not supported by fibril.pg");
    if (co && !p->failed) {
      if (p->pushed) lua_pop(co, p->pushed);
      p->pushed = push_error(co, "COPY is not supported by fibril.pg", "unsupported");
      p->failed = 1;
    }
    break;
  case PGRES_COPY_OUT:
  case PGRES_COPY_BOTH:         /* the rows would follow: nothing to do but drop it */
    pg_dead(p, "COPY is not supported by fibril.pg; connection closed", "unsupported", 1);
    return 0;
  default:                      /* PGRES_FATAL_ERROR and the like */
    if (co && !p->failed) {
      if (p->pushed) lua_pop(co, p->pushed);
      p->pushed = fb_pg_error_push(co, res, PQerrorMessage(p->conn));
      p->failed = 1;
    }
  }
  return 1;
}

/* Reads what arrived, sends what is queued, and takes every result that is complete. */
static void io_step(fb_pg_t *p) {
  if (!PQconsumeInput(p->conn)) {
    pg_lost(p);
    return;
  }
  if (p->flushing) {
    int r = PQflush(p->conn);
    if (r < 0) {
      pg_lost(p);
      return;
    }
    if (r == 0) p->flushing = 0;
  }
  while ((p->state == ST_BUSY || p->state == ST_DRAINING) && !PQisBusy(p->conn)) {
    PGresult *res = PQgetResult(p->conn);
    if (!res) {
      if (p->state == ST_BUSY) {
        query_done(p);
      } else {
        fb_fiber_t *f = p->fiber;       /* a fiber may wait in wait_idle */
        p->state = ST_IDLE;
        p->fiber = NULL;
        if (f) {
          lua_pushboolean(fb_fiber_thread(f), 1);
          fb_fiber_ready(f, 1);
        }
      }
      break;
    }
    if (p->state == ST_BUSY && !query_result(p, res)) {
      PQclear(res);
      return;                   /* p may be freed */
    }
    PQclear(res);
  }
  notifies_deliver(p);
  if (PQstatus(p->conn) == CONNECTION_BAD) {
    pg_lost(p);
    return;
  }
  if (poll_watch(p, UV_READABLE | (p->flushing ? UV_WRITABLE : 0)) != 0)
    pg_dead(p, "cannot watch the socket", "ENOMEM", 1);
}

/* A timeout or cancel on a query: the fiber is gone, the query goes on in the server until
 * the cancel request reaches it; the connection drains its results and is idle again. */
static void query_cancel(fb_fiber_t *f, void *data) {
  fb_pg_t *p = data;
  (void)f;
  p->fiber = NULL;
  p->pushed = 0;
  if (p->state != ST_BUSY) return;
  p->state = ST_DRAINING;
  P.live_ops--;
  send_cancel(p);
}

static void wait_cancel(fb_fiber_t *f, void *data) {
  fb_pg_t *p = data;
  (void)f;
  p->fiber = NULL;
}

static void notify_cancel(fb_fiber_t *f, void *data) {
  fb_pg_t *p = data;
  (void)f;
  p->nfiber = NULL;
}

static fb_pg_t *check_box(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, PG_MT);
  if (!box->p) luaL_error(L, "pg: connection is closed");
  return box->p;
}

/* Seconds from argument idx: none/nil = wait forever (-1). */
static double opt_timeout(lua_State *L, int idx) {
  double s;
  if (lua_isnoneornil(L, idx)) return -1;
  s = luaL_checknumber(L, idx);
  if (!(s >= 0)) luaL_error(L, "pg: timeout must be a non-negative number of seconds");
  return s > 1e9 ? -1 : s;
}

/* Starts a query of kind 'q' (text is SQL, parameters from index first), 'x' (text names a
 * prepared statement) or 'p' (prepare text as the statement named by the string at first).
 * Parameters are strings, sent as text, or as binary when they hold a NUL (bytea), or the
 * NULL lightuserdata for SQL NULL. Nothing is spliced into the SQL. */
static int query_start(lua_State *L, int kind) {
  fb_pg_t *p = check_box(L);
  double timeout = opt_timeout(L, 2);
  const char *text = luaL_checkstring(L, 3);      /* borrowed: arguments stay put */
  const char *psql = kind == 'p' ? luaL_checkstring(L, 4) : NULL;
  int first = 4, n = kind == 'p' ? 0 : lua_gettop(L) - 3, i, ok;
  const char *svals[PG_PARAMS_STACK], **vals = svals;
  int slens[PG_PARAMS_STACK], sfmts[PG_PARAMS_STACK], *lens = slens, *fmts = sfmts;
  fb_fiber_t *f;

  if (n > PG_MAX_PARAMS) return luaL_error(L, "pg: at most %d parameters", PG_MAX_PARAMS);
  for (i = 0; i < n; i++) {
    int t = lua_type(L, first + i);
    if (t != LUA_TSTRING && !(t == LUA_TLIGHTUSERDATA && !lua_touserdata(L, first + i)))
      return luaL_error(L, "pg: parameter $%d must be a string or pg.null, got %s", i + 1,
                        lua_typename(L, t));
  }
  if (p->state == ST_DEAD) return push_error(L, p->lost, p->lost_code);
  if (p->state != ST_IDLE)
    return luaL_error(L, "pg: connection is %s (one query at a time per connection: use a "
                      "pool, or wait for the other fiber)", state_names[p->state]);
  f = fb_fiber_check(L, "pg.query");
  if (n > PG_PARAMS_STACK) {
    vals = malloc(sizeof *vals * (size_t)n);
    lens = malloc(sizeof *lens * (size_t)n);
    fmts = malloc(sizeof *fmts * (size_t)n);
    if (!vals || !lens || !fmts) {
      free(vals); free(lens); free(fmts);
      return luaL_error(L, "pg: out of memory");
    }
  }
  for (i = 0; i < n; i++) {
    size_t len = 0;
    if (lua_type(L, first + i) == LUA_TSTRING) {
      vals[i] = lua_tolstring(L, first + i, &len);
      if (len > 0x7fffffff) len = 0x7fffffff;   /* the server refuses it: over 1 GB */
      fmts[i] = memchr(vals[i], 0, len) != NULL;
    } else {
      vals[i] = NULL;
      fmts[i] = 0;
    }
    lens[i] = (int)len;
  }
  if (kind == 'q')
    ok = PQsendQueryParams(p->conn, text, n, NULL, vals, lens, fmts, 0);
  else if (kind == 'x')
    ok = PQsendQueryPrepared(p->conn, text, n, vals, lens, fmts, 0);
  else
    ok = PQsendPrepare(p->conn, text, psql, 0, NULL);
  if (vals != svals) {
    free(vals); free(lens); free(fmts);
  }
  if (!ok) {
    char line[200];
    if (PQstatus(p->conn) == CONNECTION_BAD) {
      pg_lost(p);
      return push_error(L, p->lost, p->lost_code);
    }
    fb_pg_first_line(line, sizeof line, PQerrorMessage(p->conn));
    return push_error(L, line, "pg_error");
  }
  if (kind != 'p') PQsetSingleRowMode(p->conn);
  p->state = ST_BUSY;
  P.live_ops++;
  p->failed = 0;
  p->pushed = 0;
  p->bytes = 0;
  p->affected = -1;
  p->status[0] = '\0';
  ok = PQflush(p->conn);
  p->flushing = ok == 1;
  if (ok < 0) {
    pg_lost(p);
    return push_error(L, p->lost, p->lost_code);
  }
  if (poll_watch(p, UV_READABLE | (p->flushing ? UV_WRITABLE : 0)) != 0) {
    pg_dead(p, "cannot watch the socket", "ENOMEM", 1);
    return push_error(L, p->lost, p->lost_code);
  }
  p->fiber = f;
  fb_fiber_on_cancel(f, query_cancel, p);
  return fb_fiber_suspend(L, f, timeout);
}

/* query(conn, timeout, sql, params...) -> rows, post, affected, status | nil, msg, code[,
 * fields]. rows is nil for a command; post maps json and array columns to their type oid. */
static int l_pg_query(lua_State *L) { return query_start(L, 'q'); }
/* query_prepared(conn, timeout, name, params...): the same for a prepared statement. */
static int l_pg_query_prepared(lua_State *L) { return query_start(L, 'x'); }
/* prepare(conn, timeout, name, sql) -> nil, nil, nil, "" | nil, msg, code, fields. */
static int l_pg_prepare(lua_State *L) { return query_start(L, 'p'); }

/* wait_idle(conn, timeout) -> true | nil, msg, code: waits while a cancelled query drains. */
static int l_pg_wait_idle(lua_State *L) {
  fb_pg_t *p = check_box(L);
  double timeout = opt_timeout(L, 2);
  fb_fiber_t *f;
  if (p->state == ST_IDLE) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (p->state == ST_DEAD) return push_error(L, p->lost, p->lost_code);
  if (p->state != ST_DRAINING || p->fiber)
    return luaL_error(L, "pg: wait_idle on a connection that is %s", state_names[p->state]);
  f = fb_fiber_check(L, "pg.wait_idle");
  p->fiber = f;
  fb_fiber_on_cancel(f, wait_cancel, p);
  return fb_fiber_suspend(L, f, timeout);
}

/* wait_notify(conn, timeout) -> { {channel=, payload=, pid=}, ... } | nil, msg, code.
 * From the first call on, the connection keeps its notifications for this. */
static int l_pg_wait_notify(lua_State *L) {
  fb_pg_t *p = check_box(L);
  double timeout = opt_timeout(L, 2);
  fb_fiber_t *f;
  if (p->state == ST_DEAD) return push_error(L, p->lost, p->lost_code);
  if (p->nfiber) return luaL_error(L, "pg: another fiber already waits for notifications");
  f = fb_fiber_check(L, "pg.wait_notify");
  p->listening = 1;
  if (notifies_push(L, p->conn) > 0) return 1;   /* some were queued already */
  p->nfiber = f;
  fb_fiber_on_cancel(f, notify_cancel, p);
  return fb_fiber_suspend(L, f, timeout);
}

/* ---- connecting ---------------------------------------------------------------------------- */

static void connect_done(fb_pg_t *p) {
  fb_fiber_t *f = p->fiber;
  lua_State *co = fb_fiber_thread(f);
  box_t *box;
  lua_checkstack(co, 2);
  box = lua_newuserdata(co, sizeof *box);    /* stack: box; from here the box owns p */
  box->p = p;
  luaL_getmetatable(co, PG_MT);
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
    pg_dead(p, line[0] ? line : "connection failed", "connect_failed", 0);
    return;
  }
  if (st == PGRES_POLLING_OK) {
    p->state = ST_IDLE;
    PQsetnonblocking(p->conn, 1);
    PQsetNoticeProcessor(p->conn, on_notice, NULL);
    if (poll_watch(p, UV_READABLE) != 0) {
      pg_dead(p, "cannot watch the socket", "ENOMEM", 0);
      return;
    }
    connect_done(p);
    return;
  }
  events = st == PGRES_POLLING_READING ? UV_READABLE : UV_WRITABLE;
  if (poll_watch(p, events) != 0) pg_dead(p, "cannot watch the socket", "ENOMEM", 0);
}

static void connect_cancel(fb_fiber_t *f, void *data) {
  fb_pg_t *p = data;
  (void)f;
  p->fiber = NULL;
  pg_dead(p, "connect timed out or was cancelled", "closed", 0);
}

/* connect(conninfo, timeout, max_bytes) -> conn | nil, msg, code. conninfo is a URL
 * (postgresql://...) or a keyword string (host=... dbname=...). A host name is resolved by
 * libpq with a blocking getaddrinfo: give an address (or hostaddr=) where DNS may be slow. */
static int l_pg_connect(lua_State *L) {
  const char *conninfo = luaL_checkstring(L, 1);
  double timeout = opt_timeout(L, 2);
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
  p->state = ST_CONNECTING;
  p->fd = -1;
  p->live_next = P.conns;
  if (P.conns) P.conns->live_prev = p;
  P.conns = p;
  P.live_conns++;
  p->conn = PQconnectStartParams(keys, vals, 1);
  if (!p->conn) {
    pg_dead(p, "out of memory", "ENOMEM", 0);
    return push_error(L, "out of memory", "ENOMEM");
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
    pg_dead(p, "connect failed", "connect_failed", 0);
    return 3;
  }
  p->fiber = f;
  /* libpq's own first step is to wait for writable (its docs: act as if POLLING_WRITING). */
  if (poll_watch(p, UV_WRITABLE) != 0) {
    p->fiber = NULL;
    pg_dead(p, "cannot watch the socket", "ENOMEM", 0);
    return push_error(L, "cannot watch the socket", "ENOMEM");
  }
  fb_fiber_on_cancel(f, connect_cancel, p);
  return fb_fiber_suspend(L, f, timeout);
}

/* ---- connection methods -------------------------------------------------------------------- */

/* Forgets the fibers waiting on p, whose threads are going away (lua_close). */
static void detach(fb_pg_t *p) {
  if (p->state == ST_BUSY) {
    P.live_ops--;
    p->state = ST_DRAINING;
  }
  p->fiber = NULL;
  p->nfiber = NULL;
}

/* close: idempotent. Fibers waiting on the connection fail with "connection is closed"; a
 * query still running in the server is cancelled there. */
static int l_pg_close(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, PG_MT);
  fb_pg_t *p = box->p;
  if (!p) return 0;
  box->p = NULL;
  p->boxed = 0;
  if (p->state == ST_DEAD) pg_maybe_free(p);
  else pg_dead(p, "connection is closed", "closed", 1);
  return 0;
}

/* __gc: only at lua_close can a fiber still wait on an unreachable connection, and its
 * thread is going away: detach it first. */
static int l_pg_gc(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, PG_MT);
  if (box->p) detach(box->p);
  return l_pg_close(L);
}

/* state(conn) -> "idle" | "busy" | "draining" | "dead" | "closed". With check = true, an
 * idle connection first reads what its socket holds without waiting (poll with timeout 0),
 * so one the server closed while it sat idle reads as "dead" before it is handed out. */
static int l_pg_state(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, PG_MT);
  fb_pg_t *p = box->p;
  if (p && p->state == ST_IDLE && lua_toboolean(L, 2)) {
    struct pollfd pfd = { PQsocket(p->conn), POLLIN, 0 };
    if (poll(&pfd, 1, 0) > 0) io_step(p);
  }
  lua_pushstring(L, !p ? "closed" : state_names[p->state]);
  return 1;
}

/* txstatus(conn) -> "idle" | "active" | "intrans" | "inerror" | "unknown" */
static int l_pg_txstatus(lua_State *L) {
  fb_pg_t *p = check_box(L);
  static const char *const names[] = { "idle", "active", "intrans", "inerror", "unknown" };
  PGTransactionStatusType t = p->conn ? PQtransactionStatus(p->conn) : PQTRANS_UNKNOWN;
  lua_pushstring(L, names[t <= PQTRANS_UNKNOWN ? t : PQTRANS_UNKNOWN]);
  return 1;
}

/* info(conn) -> where, backend pid, server version, why it died (or nil), its code. */
static int l_pg_info(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, PG_MT);
  fb_pg_t *p = box->p;
  if (!p) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushstring(L, p->where);
  lua_pushnumber(L, p->conn ? PQbackendPID(p->conn) : 0);
  lua_pushnumber(L, p->conn ? PQserverVersion(p->conn) : 0);
  if (p->state == ST_DEAD) {
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

/* __gc of a registry-anchored sentinel, run by lua_close: detach every waiting fiber, then
 * drop every connection; the loop run after lua_close delivers the close callbacks. */
static int l_pg_sentinel_gc(lua_State *L) {
  fb_pg_t *p, *next;
  (void)L;
  for (p = P.conns; p; p = p->live_next) detach(p);
  for (p = P.conns; p; p = next) {
    next = p->live_next;        /* pg_dead may free p */
    p->boxed = 0;
    pg_dead(p, "connection is closed", "closed", 0);
  }
  return 0;
}

static const luaL_Reg pg_methods[] = {
  { "query", l_pg_query },
  { "query_prepared", l_pg_query_prepared },
  { "prepare", l_pg_prepare },
  { "wait_idle", l_pg_wait_idle },
  { "wait_notify", l_pg_wait_notify },
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
  if (luaL_newmetatable(L, PG_MT)) {         /* stack: module methods mt */
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_pg_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_pg_close);
    lua_setfield(L, -2, "__close");
    lua_newuserdata(L, 1);                   /* stack: mt sentinel */
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, l_pg_sentinel_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, "fibril.pg.sentinel");
  }
  lua_pop(L, 1);
  lua_setfield(L, -2, "methods");            /* for lua/fibril/pg.lua */
  lua_pushlightuserdata(L, NULL);            /* SQL NULL: the same value as json.null */
  lua_setfield(L, -2, "null");
  lua_pushnumber(L, PG_MAX_BYTES_DEFAULT);
  lua_setfield(L, -2, "MAX_RESULT_BYTES");
  return 1;
}
