/* redis_sub.c: subscribe mode. A connection that subscribes carries subscriptions only from
 * then on (pushed replies no longer pair with commands, so calls are refused). hiredis calls
 * on_sub_reply for each pushed reply (subscribe confirmations, messages, unsubscribes); each
 * becomes a sub_msg_t queued on the connection until the one fiber that reads them takes it
 * with next_message. The queue is bounded in bytes: beyond it messages are dropped and the
 * reader is told how many, rather than memory growing behind a handler that does not keep up. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "redis_conn.h"

#define SUB_ARGV_STACK 16

struct sub_msg_s {
  sub_msg_t *next;
  char kind[16];                /* "message", "pmessage", "subscribe", "punsubscribe", ... */
  long long count;              /* subscriptions left, in (un)subscribe confirmations */
  size_t channel_len, payload_len, pattern_len;
  char data[];                  /* channel, payload, pattern, back to back */
};

void fb_redis_sub_free(fb_redis_t *r) {
  sub_msg_t *m, *next;
  for (m = r->sub_head; m; m = next) {
    next = m->next;
    free(m);
  }
  r->sub_head = r->sub_tail = NULL;
  r->sub_bytes = 0;
}

void fb_redis_sub_detach(fb_redis_t *r) { r->sub_fiber = NULL; }

static int is_str(const redisReply *e) {
  return e->type == REDIS_REPLY_STRING || e->type == REDIS_REPLY_STATUS;
}

/* Pushes the oldest message (popping it): kind, channel, payload[, pattern] for messages,
 * kind, name, count for confirmations; or "dropped", nil, n after messages were dropped. */
static int push_next(lua_State *L, fb_redis_t *r) {
  sub_msg_t *m = r->sub_head;
  lua_checkstack(L, 4);
  if (r->sub_dropped) {
    lua_pushliteral(L, "dropped");
    lua_pushnil(L);
    lua_pushnumber(L, (lua_Number)r->sub_dropped);
    r->sub_dropped = 0;
    return 3;
  }
  r->sub_head = m->next;
  if (!r->sub_head) r->sub_tail = NULL;
  r->sub_bytes -= sizeof *m + m->channel_len + m->payload_len + m->pattern_len;
  lua_pushstring(L, m->kind);
  lua_pushlstring(L, m->data, m->channel_len);
  if (m->kind[0] == 'm' || m->kind[1] == 'm') {        /* message, pmessage */
    lua_pushlstring(L, m->data + m->channel_len, m->payload_len);
    if (m->pattern_len || m->kind[0] == 'p') {
      lua_pushlstring(L, m->data + m->channel_len + m->payload_len, m->pattern_len);
      free(m);
      return 4;
    }
  } else {
    lua_pushnumber(L, (lua_Number)m->count);
  }
  free(m);
  return 3;
}

static void wake_reader(fb_redis_t *r) {
  fb_fiber_t *f = r->sub_fiber;
  if (!f) return;
  r->sub_fiber = NULL;
  fb_fiber_ready(f, push_next(fb_fiber_thread(f), r));
  fb_redis_poll_ref_update(r);
}

/* Queues one pushed reply; replies of other shapes are ignored. */
static void on_sub_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  fb_redis_t *r = privdata;
  const redisReply *rp = reply, *kind, *chan, *payload = NULL, *pattern = NULL;
  sub_msg_t *m;
  size_t size;
  int is_msg;

  if (!rp) {                    /* the connection is going: once per channel and pattern */
    fb_fiber_t *f = r->sub_fiber;
    if (f && !r->sub_head && !r->sub_dropped) {
      char msg[256];
      r->sub_fiber = NULL;
      if (r->discarding) {
        fb_redis_resume_error(f, r->why, r->why_code);
      } else {
        fb_redis_lost_message(r, ac, msg, sizeof msg);
        fb_redis_resume_error(f, msg, "connection_lost");
      }
    }
    return;
  }
  if (rp->type != REDIS_REPLY_ARRAY || rp->elements < 3 || !is_str(rp->element[0]) ||
      rp->element[0]->len >= sizeof m->kind)
    return;
  kind = rp->element[0];
  is_msg = strcasecmp(kind->str, "message") == 0;
  if (strcasecmp(kind->str, "pmessage") == 0) {
    if (rp->elements < 4) return;
    pattern = rp->element[1];
    chan = rp->element[2];
    payload = rp->element[3];
    is_msg = 1;
  } else {
    chan = rp->element[1];
    if (is_msg) payload = rp->element[2];
  }
  if (!is_str(chan) && chan->type != REDIS_REPLY_NIL) return;
  if (payload && !is_str(payload)) return;
  if (pattern && !is_str(pattern)) return;
  size = sizeof *m + chan->len + (payload ? payload->len : 0) + (pattern ? pattern->len : 0);
  if (is_msg && r->sub_bytes + size > r->sub_max_bytes) {
    r->sub_dropped++;
    wake_reader(r);
    return;
  }
  if (!(m = malloc(size))) {
    r->sub_dropped++;
    wake_reader(r);
    return;
  }
  memcpy(m->kind, kind->str, kind->len);
  m->kind[kind->len] = '\0';
  m->next = NULL;
  m->count = !is_msg && rp->element[2]->type == REDIS_REPLY_INTEGER ? rp->element[2]->integer : 0;
  m->channel_len = chan->type == REDIS_REPLY_NIL ? 0 : chan->len;
  m->payload_len = payload ? payload->len : 0;
  m->pattern_len = pattern ? pattern->len : 0;
  if (m->channel_len) memcpy(m->data, chan->str, m->channel_len);
  if (payload) memcpy(m->data + m->channel_len, payload->str, m->payload_len);
  if (pattern) memcpy(m->data + m->channel_len + m->payload_len, pattern->str, m->pattern_len);
  if (r->sub_tail) r->sub_tail->next = m;
  else r->sub_head = m;
  r->sub_tail = m;
  r->sub_bytes += size;
  wake_reader(r);
}

static int sub_kind(const char *k) {
  return strcmp(k, "subscribe") == 0 || strcmp(k, "psubscribe") == 0 ||
         strcmp(k, "unsubscribe") == 0 || strcmp(k, "punsubscribe") == 0;
}

/* subscribe(conn, kind, name...) -> true | nil, msg, code. kind is "subscribe",
 * "psubscribe", "unsubscribe" or "punsubscribe"; the server's confirmations arrive through
 * next_message like messages do. The first subscribe puts the connection in subscribe mode. */
int fb_redis_l_subscribe(lua_State *L) {
  fb_redis_t *r = fb_redis_check(L);
  const char *kind = luaL_checkstring(L, 2);
  int argc = lua_gettop(L) - 1, i, rc;
  const char *sargv[SUB_ARGV_STACK], **argv = sargv;
  size_t slens[SUB_ARGV_STACK], *lens = slens;

  if (!sub_kind(kind))
    return luaL_error(L, "redis: subscribe kind must be subscribe, psubscribe, unsubscribe "
                      "or punsubscribe");
  for (i = 3; i <= lua_gettop(L); i++)
    if (lua_type(L, i) != LUA_TSTRING)
      return luaL_error(L, "redis: channel %d is not a string", i - 2);
  int undo = strstr(kind, "unsubscribe") != NULL;
  if (argc < 2 && !undo)
    return luaL_error(L, "redis: %s needs at least one channel", kind);
  if (!r->ac || r->discarding) return fb_redis_push_error(L, r->lost, r->lost_code);
  if (r->ops)
    return luaL_error(L, "redis: a connection with commands in flight cannot subscribe");
  if (undo && !(r->ac->c.flags & REDIS_SUBSCRIBED)) {   /* nothing to undo: hiredis refuses */
    lua_pushboolean(L, 1);
    return 1;
  }
  if (argc > SUB_ARGV_STACK) {
    argv = malloc(sizeof *argv * (size_t)argc);
    lens = malloc(sizeof *lens * (size_t)argc);
    if (!argv || !lens) {
      free(argv);
      free(lens);
      return luaL_error(L, "redis: out of memory");
    }
  }
  for (i = 0; i < argc; i++) argv[i] = lua_tolstring(L, i + 2, &lens[i]);
  r->subscribed = 1;
  rc = redisAsyncCommandArgv(r->ac, on_sub_reply, r, argc, argv, lens);
  if (argv != sargv) {
    free(argv);
    free(lens);
  }
  if (rc != REDIS_OK) return fb_redis_push_error(L, "cannot queue the subscription", "ENOMEM");
  lua_pushboolean(L, 1);
  return 1;
}

static void sub_cancel(fb_fiber_t *f, void *data) {
  fb_redis_t *r = data;
  (void)f;
  r->sub_fiber = NULL;
  fb_redis_poll_ref_update(r);
}

/* next_message(conn, timeout) -> kind, channel, payload[, pattern] | kind, name, count |
 * "dropped", nil, n | nil, msg, code once the connection is gone and nothing is queued.
 * One fiber reads at a time; while it waits the connection keeps the loop alive. */
int fb_redis_l_next_message(lua_State *L) {
  fb_redis_t *r = fb_redis_check(L);
  double timeout = fb_redis_opt_timeout(L, 2);
  fb_fiber_t *f;
  if (r->sub_head || r->sub_dropped) return push_next(L, r);
  if (!r->ac || r->discarding) return fb_redis_push_error(L, r->lost, r->lost_code);
  if (r->sub_fiber) return luaL_error(L, "redis: another fiber is reading these messages");
  f = fb_fiber_check(L, "redis.next_message");
  r->sub_fiber = f;
  fb_redis_poll_ref_update(r);
  fb_fiber_on_cancel(f, sub_cancel, r);
  return fb_fiber_suspend(L, f, timeout);
}
