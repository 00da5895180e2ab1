/* pg_batch.c: a batch of statements sent at once in libpq's pipeline mode, one Sync at the
 * end: one round trip, and (outside an explicit transaction) one implicit transaction, so a
 * failing statement rolls back the batch and the rest come back aborted. Results are taken
 * whole per statement (single-row mode is per query in a pipeline), counted against
 * max_bytes as they are converted. The fiber gets a list with one slot per statement. */
#include "pg_conn.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "pg_result.h"

#define PG_MAX_PARAMS 65535
#define PG_MAX_BATCH 10000           /* statements in one batch */

/* What the statement being read has left on the fiber's stack, above the slots list. */
enum { SLOT_NONE, SLOT_ROWS, SLOT_ERROR, SLOT_ABORTED };

/* Ends the current statement: its slot is { rows | false, post | false, affected | false,
 * status } on success, the error table { error = msg, code =, fields... }, or false when it
 * was aborted by an earlier failure. Stack: slots [rows names post | err]. */
static void slot_end(fb_pg_t *p, lua_State *co) {
  lua_checkstack(co, 6);
  if (p->slot == SLOT_ERROR) {
    /* stack: slots err */
  } else if (p->slot == SLOT_ABORTED) {
    lua_pushboolean(co, 0);
  } else {
    lua_createtable(co, 4, 0);                 /* stack: slots [rows names post] t */
    if (p->slot == SLOT_ROWS) {
      lua_pushvalue(co, -4);
      lua_rawseti(co, -2, 1);
      lua_pushvalue(co, -2);
      if (lua_isnil(co, -1)) {
        lua_pop(co, 1);
        lua_pushboolean(co, 0);
      }
      lua_rawseti(co, -2, 2);
      lua_replace(co, -4);                     /* stack: slots t names post */
      lua_pop(co, 2);
      p->pushed -= 2;
    } else {
      lua_pushboolean(co, 0);
      lua_rawseti(co, -2, 1);
      lua_pushboolean(co, 0);
      lua_rawseti(co, -2, 2);
      p->pushed++;
    }
    if (p->affected >= 0) lua_pushnumber(co, p->affected);
    else lua_pushboolean(co, 0);
    lua_rawseti(co, -2, 3);
    lua_pushstring(co, p->status);
    lua_rawseti(co, -2, 4);
  }
  if (p->slot == SLOT_ABORTED) p->pushed++;
  lua_rawseti(co, -2, ++p->cur);               /* stack: slots */
  p->pushed--;
  p->slot = SLOT_NONE;
  p->affected = -1;
  p->status[0] = '\0';
}

/* Takes one result of the current statement onto the fiber's stack. Returns 0 when p was
 * dropped. */
static int slot_result(fb_pg_t *p, lua_State *co, PGresult *res) {
  ExecStatusType st = PQresultStatus(res);
  int i, n;
  switch (st) {
  case PGRES_SINGLE_TUPLE:       /* single-row mode can carry over from the query before */
  case PGRES_TUPLES_OK:
    if (p->slot != SLOT_ROWS) {
      fb_pg_rows_begin(co, res);
      p->pushed += 3;
      p->slot = SLOT_ROWS;
    }
    n = PQntuples(res);
    for (i = 0; i < n; i++) {
      p->bytes += fb_pg_row_push(co, res, i);
      if (p->bytes > p->max_bytes) {
        fb_pg_dead(p, "batch result exceeds max_result_bytes; connection closed", "limit", 1);
        return 0;
      }
    }
    if (st == PGRES_TUPLES_OK) {
      p->affected = PQcmdTuples(res)[0] ? atof(PQcmdTuples(res)) : n;
      strncpy(p->status, PQcmdStatus(res), sizeof p->status - 1);
    }
    break;
  case PGRES_COMMAND_OK:
  case PGRES_EMPTY_QUERY:
    p->affected = PQcmdTuples(res)[0] ? atof(PQcmdTuples(res)) : -1;
    strncpy(p->status, PQcmdStatus(res), sizeof p->status - 1);
    break;
  case PGRES_PIPELINE_ABORTED:
    p->slot = SLOT_ABORTED;
    break;
  default: {                    /* an error: a table { error = msg, code = ..., fields } */
    int top;
    if (p->slot == SLOT_ROWS) {   /* rows came before the error: they do not count */
      lua_pop(co, 3);
      p->pushed -= 3;
    }
    top = lua_gettop(co);
    fb_pg_error_push(co, res, PQerrorMessage(p->conn));   /* stack: nil msg code fields */
    lua_pushvalue(co, -3);
    lua_setfield(co, -2, "error");
    lua_pushvalue(co, -2);
    lua_setfield(co, -2, "code");
    lua_replace(co, top + 1);
    lua_settop(co, top + 1);                  /* stack: slots err */
    p->pushed++;
    p->slot = SLOT_ERROR;
  }
  }
  return 1;
}

int fb_pg_batch_step(fb_pg_t *p, PGresult *res) {
  lua_State *co = p->state == FB_PG_BUSY && p->fiber ? fb_fiber_thread(p->fiber) : NULL;
  ExecStatusType st = res ? PQresultStatus(res) : PGRES_EMPTY_QUERY;
  if (res && (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH)) {
    PQclear(res);
    fb_pg_dead(p, "COPY is not supported in a batch; connection closed", "unsupported", 1);
    return 0;
  }
  if (res && st == PGRES_PIPELINE_SYNC) {     /* the batch is over */
    PQclear(res);
    PQexitPipelineMode(p->conn);
    p->pipeline = 0;
    if (p->state == FB_PG_DRAINING) {
      fb_pg_drained(p);
    } else {
      fb_fiber_t *f = p->fiber;
      p->state = FB_PG_IDLE;
      fb_pg_live_ops--;
      p->fiber = NULL;
      p->pushed = 0;
      if (f) fb_fiber_ready(f, 1);            /* stack: slots */
    }
    return 1;
  }
  if (!co) {                                  /* draining, or nobody waits any more */
    if (res) PQclear(res);
    return 1;
  }
  if (p->pushed == 0) {
    lua_checkstack(co, 2);
    lua_createtable(co, p->nentries, 0);      /* stack: slots */
    p->pushed = 1;
  }
  if (!res) {
    slot_end(p, co);
    return 1;
  }
  if (p->slot == SLOT_NONE || p->slot == SLOT_ROWS || st == PGRES_PIPELINE_ABORTED) {
    int ok = slot_result(p, co, res);
    PQclear(res);
    return ok;
  }
  PQclear(res);                               /* a second result for one statement: none */
  return 1;
}

/* Sends one entry { kind, text, params... } of the batch; 0 on failure. */
static int send_entry(lua_State *L, fb_pg_t *p, int i, const char **vals, int *lens, int *fmts) {
  size_t klen;
  const char *kind, *text;
  int n, j;
  lua_rawgeti(L, 3, i);                       /* stack: ... entry */
  lua_rawgeti(L, -1, 1);
  kind = lua_tolstring(L, -1, &klen);
  lua_rawgeti(L, -2, 2);
  text = lua_tostring(L, -1);                 /* borrowed: anchored in the entry */
  lua_pop(L, 2);
  n = (int)lua_objlen(L, -1) - 2;
  if (kind[0] == 'p') {
    lua_rawgeti(L, -1, 3);
    j = PQsendPrepare(p->conn, text, lua_tostring(L, -1), 0, NULL);
    lua_pop(L, 2);
    return j;
  }
  for (j = 0; j < n; j++) {
    size_t len = 0;
    lua_rawgeti(L, -1, j + 3);
    if (lua_type(L, -1) == LUA_TSTRING) {
      vals[j] = lua_tolstring(L, -1, &len);
      fmts[j] = memchr(vals[j], 0, len) != NULL;
    } else {
      vals[j] = NULL;
      fmts[j] = 0;
    }
    lens[j] = (int)len;
    lua_pop(L, 1);                            /* the value stays anchored in the entry */
  }
  lua_pop(L, 1);
  if (kind[0] == 'q') return PQsendQueryParams(p->conn, text, n, NULL, vals, lens, fmts, 0);
  return PQsendQueryPrepared(p->conn, text, n, vals, lens, fmts, 0);
}

/* Raises unless argument 3 is a list of entries { "q"|"x"|"p", text, params... } (params
 * strings or pg.null; for "p", the SQL); returns the count and the most parameters. */
static int check_entries(lua_State *L, int *maxp) {
  int n = (int)lua_objlen(L, 3), i, j, np;
  *maxp = 0;
  if (n < 1 || n > PG_MAX_BATCH) luaL_error(L, "pg: a batch holds 1 to %d statements", PG_MAX_BATCH);
  for (i = 1; i <= n; i++) {
    const char *kind;
    lua_rawgeti(L, 3, i);
    if (!lua_istable(L, -1)) luaL_error(L, "pg: batch entry %d is not a table", i);
    lua_rawgeti(L, -1, 1);
    kind = lua_tostring(L, -1);
    if (!kind || (strcmp(kind, "q") && strcmp(kind, "x") && strcmp(kind, "p")))
      luaL_error(L, "pg: batch entry %d has no kind", i);
    lua_pop(L, 1);
    np = (int)lua_objlen(L, -1);
    for (j = 2; j <= np; j++) {
      int t;
      lua_rawgeti(L, -1, j);
      t = lua_type(L, -1);
      if (t != LUA_TSTRING && !(j > 2 && t == LUA_TLIGHTUSERDATA && !lua_touserdata(L, -1)))
        luaL_error(L, "pg: batch entry %d: value %d must be a string or pg.null", i, j);
      lua_pop(L, 1);
    }
    if (np - 2 > PG_MAX_PARAMS) luaL_error(L, "pg: at most %d parameters", PG_MAX_PARAMS);
    if (np - 2 > *maxp) *maxp = np - 2;
    lua_pop(L, 1);
  }
  return n;
}

/* batch(conn, timeout, entries) -> slots | nil, msg, code. */
int fb_pg_l_batch(lua_State *L) {
  fb_pg_t *p = fb_pg_check_box(L);
  double timeout = fb_pg_opt_timeout(L, 2);
  int n, maxp, i, ok = 1;
  const char **vals;
  int *lens, *fmts;
  fb_fiber_t *f;

  luaL_checktype(L, 3, LUA_TTABLE);
  n = check_entries(L, &maxp);
  if (p->state == FB_PG_DEAD) return fb_pg_push_error(L, p->lost, p->lost_code);
  if (p->state != FB_PG_IDLE)
    return luaL_error(L, "pg: connection is %s (one query at a time per connection)",
                      fb_pg_state_names[p->state]);
  f = fb_fiber_check(L, "pg.batch");
  vals = malloc(sizeof *vals * (size_t)(maxp + 1));
  lens = malloc(sizeof *lens * (size_t)(maxp + 1));
  fmts = malloc(sizeof *fmts * (size_t)(maxp + 1));
  if (!vals || !lens || !fmts || !PQenterPipelineMode(p->conn)) {
    free(vals); free(lens); free(fmts);
    return fb_pg_push_error(L, "cannot start a batch (out of memory, or pipeline mode refused)",
                            "ENOMEM");
  }
  for (i = 1; i <= n && ok; i++) ok = send_entry(L, p, i, vals, lens, fmts);
  free(vals); free(lens); free(fmts);
  if (!ok || !PQpipelineSync(p->conn)) {      /* part of the batch may be queued: drop it */
    fb_pg_dead(p, "connection closed: a batch could not be sent", "connection_lost", 1);
    return fb_pg_push_error(L, p->lost, p->lost_code);
  }
  p->state = FB_PG_BUSY;
  p->pipeline = 1;
  fb_pg_live_ops++;
  p->nentries = n;
  p->cur = 0;
  p->slot = SLOT_NONE;
  p->failed = 0;
  p->pushed = 0;
  p->bytes = 0;
  p->affected = -1;
  p->status[0] = '\0';
  ok = PQflush(p->conn);
  p->flushing = ok == 1;
  if (ok < 0 || fb_pg_poll_watch(p, UV_READABLE | (p->flushing ? UV_WRITABLE : 0)) != 0) {
    fb_pg_lost(p);
    return fb_pg_push_error(L, p->lost, p->lost_code);
  }
  p->fiber = f;
  fb_fiber_on_cancel(f, fb_pg_query_cancel, p);
  return fb_fiber_suspend(L, f, timeout);
}
