/* pg_query.c: queries on a connection: sending (parameters apart from the SQL), taking the
 * results as they arrive (rows pushed onto the waiting fiber's thread in single-row mode,
 * counted against max_bytes), draining a cancelled query, and LISTEN notifications. The
 * waiting fiber is always resumed or detached; a detached query drains, then p is idle. */
#include "pg_conn.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pg_result.h"

#define PG_PARAMS_STACK 16           /* parameter arrays up to this size live on the C stack */
#define PG_MAX_PARAMS 65535          /* the protocol's limit */

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
  p->state = FB_PG_IDLE;
  fb_pg_live_ops--;
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
        fb_pg_dead(p, msg, "limit", 1);
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
      p->pushed = fb_pg_push_error(co, "COPY is not supported by fibril.pg", "unsupported");
      p->failed = 1;
    }
    break;
  case PGRES_COPY_OUT:
  case PGRES_COPY_BOTH:         /* the rows would follow: nothing to do but drop it */
    fb_pg_dead(p, "COPY is not supported by fibril.pg; connection closed", "unsupported", 1);
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

void fb_pg_drained(fb_pg_t *p) {
  fb_fiber_t *f = p->fiber;     /* a fiber may wait in wait_idle */
  p->state = FB_PG_IDLE;
  p->fiber = NULL;
  if (f) {
    lua_pushboolean(fb_fiber_thread(f), 1);
    fb_fiber_ready(f, 1);
  }
}

/* Takes one result of a cancelled query, whose fiber is gone. A COPY would never end (libpq
 * keeps returning it): drop the connection. Returns 0 when it was dropped. */
static int drain_result(fb_pg_t *p, PGresult *res) {
  ExecStatusType st = PQresultStatus(res);
  if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
    fb_pg_dead(p, "connection closed: a cancelled query was a COPY", "closed", 1);
    return 0;
  }
  return 1;
}

/* Reads what arrived, sends what is queued, and takes every result that is complete. */
void fb_pg_io_step(fb_pg_t *p) {
  if (!PQconsumeInput(p->conn)) {
    fb_pg_lost(p);
    return;
  }
  if (p->flushing) {
    int r = PQflush(p->conn);
    if (r < 0) {
      fb_pg_lost(p);
      return;
    }
    if (r == 0) p->flushing = 0;
  }
  while ((p->state == FB_PG_BUSY || p->state == FB_PG_DRAINING) && !PQisBusy(p->conn)) {
    PGresult *res = PQgetResult(p->conn);
    if (p->pipeline) {          /* a batch: NULL ends one statement, not the whole */
      if (!fb_pg_batch_step(p, res)) return;   /* p may be freed */
      continue;
    }
    if (!res) {
      if (p->state == FB_PG_BUSY) query_done(p);
      else fb_pg_drained(p);
      break;
    }
    if (p->state == FB_PG_BUSY ? !query_result(p, res) : !drain_result(p, res)) {
      PQclear(res);
      return;                   /* p may be freed */
    }
    PQclear(res);
  }
  notifies_deliver(p);
  if (PQstatus(p->conn) == CONNECTION_BAD) {
    fb_pg_lost(p);
    return;
  }
  if (fb_pg_poll_watch(p, UV_READABLE | (p->flushing ? UV_WRITABLE : 0)) != 0)
    fb_pg_dead(p, "cannot watch the socket", "ENOMEM", 1);
}

/* A timeout or cancel on a query: the fiber is gone, the query goes on in the server until
 * the cancel request reaches it; the connection drains its results and is idle again. */
void fb_pg_query_cancel(fb_fiber_t *f, void *data) {
  fb_pg_t *p = data;
  (void)f;
  p->fiber = NULL;
  p->pushed = 0;
  if (p->state != FB_PG_BUSY) return;
  p->state = FB_PG_DRAINING;
  fb_pg_live_ops--;
  fb_pg_send_cancel(p);
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

fb_pg_t *fb_pg_check_box(lua_State *L) {
  fb_pg_box_t *box = luaL_checkudata(L, 1, FB_PG_MT);
  if (!box->p) luaL_error(L, "pg: connection is closed");
  return box->p;
}

/* Seconds from argument idx: none/nil = wait forever (-1). */
double fb_pg_opt_timeout(lua_State *L, int idx) {
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
  fb_pg_t *p = fb_pg_check_box(L);
  double timeout = fb_pg_opt_timeout(L, 2);
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
  if (p->state == FB_PG_DEAD) return fb_pg_push_error(L, p->lost, p->lost_code);
  if (p->state != FB_PG_IDLE)
    return luaL_error(L, "pg: connection is %s (one query at a time per connection: use a "
                      "pool, or wait for the other fiber)", fb_pg_state_names[p->state]);
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
      fb_pg_lost(p);
      return fb_pg_push_error(L, p->lost, p->lost_code);
    }
    fb_pg_first_line(line, sizeof line, PQerrorMessage(p->conn));
    return fb_pg_push_error(L, line, "pg_error");
  }
  if (kind != 'p') PQsetSingleRowMode(p->conn);
  p->state = FB_PG_BUSY;
  fb_pg_live_ops++;
  p->failed = 0;
  p->pushed = 0;
  p->bytes = 0;
  p->affected = -1;
  p->status[0] = '\0';
  ok = PQflush(p->conn);
  p->flushing = ok == 1;
  if (ok < 0) {
    fb_pg_lost(p);
    return fb_pg_push_error(L, p->lost, p->lost_code);
  }
  if (fb_pg_poll_watch(p, UV_READABLE | (p->flushing ? UV_WRITABLE : 0)) != 0) {
    fb_pg_dead(p, "cannot watch the socket", "ENOMEM", 1);
    return fb_pg_push_error(L, p->lost, p->lost_code);
  }
  p->fiber = f;
  fb_fiber_on_cancel(f, fb_pg_query_cancel, p);
  return fb_fiber_suspend(L, f, timeout);
}

/* query(conn, timeout, sql, params...) -> rows, post, affected, status | nil, msg, code[,
 * fields]. rows is nil for a command; post maps json and array columns to their type oid. */
int fb_pg_l_query(lua_State *L) { return query_start(L, 'q'); }
/* query_prepared(conn, timeout, name, params...): the same for a prepared statement. */
int fb_pg_l_query_prepared(lua_State *L) { return query_start(L, 'x'); }
/* prepare(conn, timeout, name, sql) -> nil, nil, nil, "" | nil, msg, code, fields. */
int fb_pg_l_prepare(lua_State *L) { return query_start(L, 'p'); }

/* wait_idle(conn, timeout) -> true | nil, msg, code: waits while a cancelled query drains. */
int fb_pg_l_wait_idle(lua_State *L) {
  fb_pg_t *p = fb_pg_check_box(L);
  double timeout = fb_pg_opt_timeout(L, 2);
  fb_fiber_t *f;
  if (p->state == FB_PG_IDLE) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (p->state == FB_PG_DEAD) return fb_pg_push_error(L, p->lost, p->lost_code);
  if (p->state != FB_PG_DRAINING || p->fiber)
    return luaL_error(L, "pg: wait_idle on a connection that is %s", fb_pg_state_names[p->state]);
  f = fb_fiber_check(L, "pg.wait_idle");
  p->fiber = f;
  fb_fiber_on_cancel(f, wait_cancel, p);
  return fb_fiber_suspend(L, f, timeout);
}

/* wait_notify(conn, timeout) -> { {channel=, payload=, pid=}, ... } | nil, msg, code.
 * From the first call on, the connection keeps its notifications for this. */
int fb_pg_l_wait_notify(lua_State *L) {
  fb_pg_t *p = fb_pg_check_box(L);
  double timeout = fb_pg_opt_timeout(L, 2);
  fb_fiber_t *f;
  if (p->state == FB_PG_DEAD) return fb_pg_push_error(L, p->lost, p->lost_code);
  if (p->nfiber) return luaL_error(L, "pg: another fiber already waits for notifications");
  f = fb_fiber_check(L, "pg.wait_notify");
  p->listening = 1;
  if (notifies_push(L, p->conn) > 0) return 1;   /* some were queued already */
  p->nfiber = f;
  fb_fiber_on_cancel(f, notify_cancel, p);
  return fb_fiber_suspend(L, f, timeout);
}

