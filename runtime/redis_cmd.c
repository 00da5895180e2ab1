/* redis_cmd.c: commands and pipelines on a Redis connection. Each command (or pipeline) is
 * an op that hiredis matches to its replies in order; the waiting fiber is always resumed or
 * detached. A timeout or cancel drops the whole connection, since a late reply would answer
 * the next command. No Lua state is touched from a hiredis callback except to push results
 * onto the waiting fiber's thread before fb_fiber_ready. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "error.h"
#include "redis_conn.h"

#define EXACT_INT_MAX (1LL << 53)   /* larger integers come back as decimal strings */
#define R fb_redis_registry

/* Pushes one reply converted to Lua. nested: it is an array element or a pipeline slot,
 * where nil becomes the sentinel (lightuserdata NULL, redis.null) so lists keep their length
 * and an error reply becomes an error object. hiredis 0.14 caps nesting at 7 levels. */
void fb_redis_push_reply(lua_State *co, const redisReply *rp, int nested) {
  size_t i;
  lua_checkstack(co, 6);
  switch (rp->type) {
  case REDIS_REPLY_STATUS:
  case REDIS_REPLY_STRING:
    lua_pushlstring(co, rp->str, rp->len);
    break;
  case REDIS_REPLY_INTEGER:
    if (rp->integer >= -EXACT_INT_MAX && rp->integer <= EXACT_INT_MAX) {
      lua_pushnumber(co, (lua_Number)rp->integer);
    } else {                    /* a double would round it: keep every digit */
      char buf[24];
      int n = snprintf(buf, sizeof buf, "%lld", rp->integer);
      lua_pushlstring(co, buf, (size_t)n);
    }
    break;
  case REDIS_REPLY_ARRAY:
    lua_createtable(co, rp->elements > 0x7fffffff ? 0 : (int)rp->elements, 0);
    for (i = 0; i < rp->elements; i++) {   /* stack: list */
      fb_redis_push_reply(co, rp->element[i], 1);
      lua_rawseti(co, -2, (int)(i + 1));
    }
    break;
  case REDIS_REPLY_ERROR:       /* top-level errors are reported by on_reply instead */
    fb_error_push(co, "redis_error", "redis: %.*s", (int)rp->len, rp->str);
    break;
  default:                      /* REDIS_REPLY_NIL */
    if (nested) lua_pushlightuserdata(co, NULL);
    else lua_pushnil(co);
  }
}


static void op_unlink_free(cmd_op_t *op) {
  fb_redis_t *r = op->r;
  if (op->prev) op->prev->next = op->next;
  else r->ops = op->next;
  if (op->next) op->next->prev = op->prev;
  free(op);
  R.live_ops--;
}

/* Why a reply did not come: our own discard, a reply over the limit, or the peer. */
static void fail_lost(fb_fiber_t *f, fb_redis_t *r, const redisAsyncContext *ac) {
  char msg[256];
  if (r->discarding) {
    fb_redis_resume_error(f, r->why, r->why_code);
  } else if (r->limit_hit) {
    snprintf(msg, sizeof msg, "reply of %zu elements exceeds max_elements (%zu); "
             "connection closed", r->limit_hit, r->max_elements);
    fb_redis_resume_error(f, msg, "limit");
  } else {
    fb_redis_lost_message(r, ac, msg, sizeof msg);
    fb_redis_resume_error(f, msg, "connection_lost");
  }
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  cmd_op_t *op = privdata;
  const redisReply *rp = reply;
  fb_fiber_t *f = op->fiber;
  int i = op->got++;
  if (f) {
    lua_State *co = fb_fiber_thread(f);
    if (!rp) {
      op->fiber = NULL;
      fail_lost(f, op->r, ac);
    } else if (!op->pipeline) {
      op->fiber = NULL;
      if (rp->type == REDIS_REPLY_ERROR) {
        lua_checkstack(co, 3);
        fb_fiber_ready(f, fb_redis_push_lerror(co, rp->str, rp->len, "redis_error"));
      } else {
        fb_redis_push_reply(co, rp, 0);
        fb_fiber_ready(f, 1);
      }
    } else {
      lua_checkstack(co, 2);
      if (i == 0) lua_createtable(co, op->n, 0);   /* stack: replies */
      fb_redis_push_reply(co, rp, 1);
      lua_rawseti(co, -2, i + 1);
      if (op->got == op->n) {
        op->fiber = NULL;
        fb_fiber_ready(f, 1);
      }
    }
  }
  if (op->got == op->n) {
    fb_redis_t *r = op->r;
    op_unlink_free(op);
    fb_redis_poll_ref_update(r);
  }
}

/* A timeout or cancel: a late reply would be matched to the next command, so the whole
 * connection goes; other fibers waiting on it fail with the same reason. */
static void cmd_cancel(fb_fiber_t *f, void *data) {
  cmd_op_t *op = data;
  (void)f;
  op->fiber = NULL;
  fb_redis_discard(op->r, "connection closed: a command on it timed out or was cancelled",
                "closed");
}

/* Commands whose replies do not pair one-to-one with requests (pub/sub, MONITOR, CLIENT
 * REPLY): hiredis 0.14 aborts on unsolicited replies, so they are refused here. */
static int unpaired(const char *cmd, size_t len, const char *arg, size_t alen) {
  static const char *const names[] = { "subscribe", "psubscribe", "ssubscribe",
    "unsubscribe", "punsubscribe", "sunsubscribe", "monitor", NULL };
  int i;
  if (len < 6 || len > 12) return 0;    /* "client" .. "punsubscribe": most commands leave */
  for (i = 0; names[i]; i++)
    if (len == strlen(names[i]) && strncasecmp(cmd, names[i], len) == 0) return 1;
  return len == 6 && strncasecmp(cmd, "client", 6) == 0 && arg && alen == 5 &&
         strncasecmp(arg, "reply", 5) == 0;
}

static cmd_op_t *op_new(lua_State *L, fb_redis_t *r, int n, int pipeline) {
  cmd_op_t *op = calloc(1, sizeof *op);
  if (!op) luaL_error(L, "redis: out of memory");
  op->r = r;
  op->n = n;
  op->pipeline = (unsigned char)pipeline;
  op->next = r->ops;
  if (r->ops) r->ops->prev = op;
  r->ops = op;
  R.live_ops++;
  return op;
}

/* ---- the protocol, formatted here ----------------------------------------------------
 * Commands are written in RESP into one reusable buffer and handed to hiredis already
 * formatted: hiredis' own formatter (sdscatfmt per argument) was the largest cost of a
 * pipeline. The buffer is process-wide (one thread), trimmed back after a very large command,
 * and a luaL_error part way leaks nothing. */
static struct {
  char *p;
  size_t len, cap;
  size_t *ends;                 /* pipeline: where each command ends in p */
  size_t ends_cap;
} W;

#define W_KEEP (1u << 20)       /* a buffer grown beyond this is freed after use */

static void w_reserve(lua_State *L, size_t more) {
  size_t cap;
  char *p;
  if (W.len + more <= W.cap) return;
  cap = W.cap ? W.cap : 4096;
  while (cap < W.len + more) cap *= 2;
  if (!(p = realloc(W.p, cap))) luaL_error(L, "redis: out of memory");
  W.p = p;
  W.cap = cap;
}

static void w_trim(void) {
  if (W.cap > W_KEEP) {
    free(W.p);
    W.p = NULL;
    W.cap = 0;
  }
  if (W.ends_cap > W_KEEP / sizeof *W.ends) {
    free(W.ends);
    W.ends = NULL;
    W.ends_cap = 0;
  }
  W.len = 0;
}

/* "<c><n>\r\n": an array or bulk string header (room reserved by the caller). */
static void w_header(char c, size_t n) {
  char digits[24];
  int k = 0;
  do digits[k++] = (char)('0' + n % 10); while ((n /= 10) > 0);
  W.p[W.len++] = c;
  while (k > 0) W.p[W.len++] = digits[--k];
  W.p[W.len++] = '\r';
  W.p[W.len++] = '\n';
}

static void w_bulk(lua_State *L, const char *s, size_t len) {
  w_reserve(L, len + 32);
  w_header('$', len);
  memcpy(W.p + W.len, s, len);
  W.len += len;
  W.p[W.len++] = '\r';
  W.p[W.len++] = '\n';
}

/* A NUL after the formatted bytes, not counted in W.len: hiredis finds the command name with
 * strchr, which may read (ASan's strict_string_checks: does read) up to a terminator. */
static void w_terminate(lua_State *L) {
  w_reserve(L, 1);
  W.p[W.len] = '\0';
}

static int queue_formatted(fb_redis_t *r, cmd_op_t *op, const char *cmd, size_t len) {
  return redisAsyncFormattedCommand(r->ac, on_reply, op, cmd, len) == REDIS_OK;
}

/* call(conn, timeout, cmd, ...) -> reply | nil, msg, code. Arguments are strings or
 * numbers; each goes as one bulk string, so nothing is spliced into the protocol. */
int fb_redis_l_call(lua_State *L) {
  fb_redis_t *r = fb_redis_check(L);
  double timeout = fb_redis_opt_timeout(L, 2);
  int argc = lua_gettop(L) - 2, i, ok;
  fb_fiber_t *f;
  cmd_op_t *op;

  if (argc < 1) return luaL_error(L, "redis: call needs a command name");
  for (i = 0; i < argc; i++) {
    int t = lua_type(L, i + 3);
    if (t != LUA_TSTRING && t != LUA_TNUMBER)
      return luaL_error(L, "redis: argument %d must be a string or a number, got %s", i + 1,
                        lua_typename(L, t));
  }
  if (!r->ac || r->discarding) return fb_redis_push_error(L, r->lost, r->lost_code);
  if (r->subscribed)
    return luaL_error(L, "redis: this connection is subscribed: it carries subscriptions only");
  {
    size_t l0, l1 = 0;
    const char *c0 = lua_tolstring(L, 3, &l0);
    const char *c1 = argc > 1 ? lua_tolstring(L, 4, &l1) : NULL;
    if (unpaired(c0, l0, c1, l1))
      return luaL_error(L, "redis: %s is not supported on this connection (pub/sub and "
                        "MONITOR need a dedicated connection)", c0);
  }
  f = fb_fiber_check(L, "redis.call");
  W.len = 0;
  w_reserve(L, 24);
  w_header('*', (size_t)argc);
  for (i = 0; i < argc; i++) {  /* numbers are converted in place on the stack */
    size_t len;
    const char *a = lua_tolstring(L, i + 3, &len);
    w_bulk(L, a, len);
  }
  w_terminate(L);
  op = op_new(L, r, 1, 0);
  ok = queue_formatted(r, op, W.p, W.len);
  w_trim();
  if (!ok) {
    op_unlink_free(op);
    return fb_redis_push_error(L, "cannot queue the command (out of memory)", "ENOMEM");
  }
  op->fiber = f;
  fb_redis_poll_ref_update(r);
  fb_fiber_on_cancel(f, cmd_cancel, op);
  return fb_fiber_suspend(L, f, timeout);
}

/* Formats the command list on top of the stack (command i of the pipeline): a non-empty
 * list of strings, refused when it is a pub/sub command. */
static void format_command(lua_State *L, int i) {
  int n, j;
  if (!lua_istable(L, -1)) luaL_error(L, "redis: pipeline command %d is not a list", i);
  n = (int)lua_objlen(L, -1);
  if (n < 1) luaL_error(L, "redis: pipeline command %d is empty", i);
  w_reserve(L, 24);
  w_header('*', (size_t)n);
  for (j = 1; j <= n; j++) {
    size_t len;
    const char *a;
    lua_rawgeti(L, -1, j);
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "redis: pipeline command %d argument %d is not a string", i, j);
    a = lua_tolstring(L, -1, &len);
    if (j == 1) {
      size_t l1 = 0;
      const char *c1 = NULL;
      if (n > 1) {
        lua_rawgeti(L, -2, 2);
        c1 = lua_tolstring(L, -1, &l1);
        lua_pop(L, 1);          /* still anchored in the command list */
      }
      if (unpaired(a, len, c1, l1)) luaL_error(L, "redis: %s is not supported in a pipeline", a);
    }
    w_bulk(L, a, len);
    lua_pop(L, 1);
  }
}

/* pipeline(conn, timeout, { {cmd, ...}, ... }) -> { reply, ... } | nil, msg, code. Every
 * command is queued before the loop runs again, so they leave in one write; error replies
 * stand in their slots as error objects. Arguments must be strings (redis.lua converts). */
int fb_redis_l_pipeline(lua_State *L) {
  fb_redis_t *r = fb_redis_check(L);
  double timeout = fb_redis_opt_timeout(L, 2);
  int n, i;
  size_t start;
  fb_fiber_t *f;
  cmd_op_t *op;

  luaL_checktype(L, 3, LUA_TTABLE);
  n = (int)lua_objlen(L, 3);
  if (n == 0) {
    lua_newtable(L);
    return 1;
  }
  if ((size_t)n > W.ends_cap) {
    size_t *ends = realloc(W.ends, sizeof *ends * (size_t)n);
    if (!ends) return luaL_error(L, "redis: out of memory");
    W.ends = ends;
    W.ends_cap = (size_t)n;
  }
  W.len = 0;
  for (i = 1; i <= n; i++) {    /* raise on a bad command before anything is queued */
    lua_rawgeti(L, 3, i);
    format_command(L, i);
    lua_pop(L, 1);
    W.ends[i - 1] = W.len;
  }
  if (!r->ac || r->discarding) return fb_redis_push_error(L, r->lost, r->lost_code);
  if (r->subscribed)
    return luaL_error(L, "redis: this connection is subscribed: it carries subscriptions only");
  f = fb_fiber_check(L, "redis.pipeline");
  w_terminate(L);
  op = op_new(L, r, n, 1);
  for (i = 0, start = 0; i < n; start = W.ends[i++])
    if (!queue_formatted(r, op, W.p + start, W.ends[i] - start)) break;
  w_trim();
  if (i < n) {                  /* out of memory part way: some commands are queued */
    op->n = i;
    if (op->n == 0) op_unlink_free(op);
    else fb_redis_discard(r, "connection closed: a pipeline could not be queued", "ENOMEM");
    return fb_redis_push_error(L, "cannot queue the pipeline (out of memory)", "ENOMEM");
  }
  op->fiber = f;
  fb_redis_poll_ref_update(r);
  fb_fiber_on_cancel(f, cmd_cancel, op);
  return fb_fiber_suspend(L, f, timeout);
}
