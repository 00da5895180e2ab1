/* redis_conn.h: what the three parts of the Redis client share (private to runtime/redis*.c).
 *   redis.c      connection lifetime: connect, AUTH/SELECT, the libuv adapter, close, discard
 *   redis_cmd.c  commands and pipelines: replies matched in order, converted to Lua
 *   redis_sub.c  subscribe mode: pushed messages queued for the fiber that reads them */
#ifndef FB_REDIS_CONN_H
#define FB_REDIS_CONN_H

#include <lua.h>
#include <stddef.h>

#include <hiredis/async.h>

#include "fiber.h"
#include "redis.h"

#define REDIS_MT "fibril.redis"

typedef struct cmd_op_s cmd_op_t;
typedef struct sub_msg_s sub_msg_t;

struct fb_redis_s {
  redisAsyncContext *ac;        /* NULL once hiredis has freed (or will free) it */
  fb_fiber_t *cfiber;           /* the fiber waiting in connect, NULL once resumed/detached */
  char *password, *user;        /* copies kept until AUTH is queued */
  long db;
  int setup_pending;            /* AUTH / SELECT replies still due while connecting */
  unsigned char connecting;     /* the connect op owns the struct (no box yet) */
  unsigned char boxed;          /* a Lua box points here */
  unsigned char in_free;        /* inside our own synchronous redisAsyncFree */
  unsigned char discarding;     /* we asked hiredis to free the context */
  unsigned char subscribed;     /* in subscribe mode for good: commands are refused */
  const char *why, *why_code;   /* static: what ops failed by our discard report */
  size_t max_elements, reply_elements, limit_hit;
  cmd_op_t *ops;                /* commands awaiting replies, oldest last */
  sub_msg_t *sub_head, *sub_tail;   /* pushed messages not read yet, oldest first */
  size_t sub_bytes, sub_max_bytes, sub_dropped;
  fb_fiber_t *sub_fiber;        /* the fiber waiting in next_message */
  fb_redis_t *live_next, *live_prev;
  fb_redis_t *flush_next;       /* in the list of connections to write before the next poll */
  unsigned char flush_queued;
  char lost[192];               /* why the connection ended, for later calls */
  const char *lost_code;        /* static: "closed" or "connection_lost" */
  char where[128];              /* "127.0.0.1:6379", "[::1]:6379", "/run/redis.sock" */
};

typedef struct { fb_redis_t *r; } box_t;   /* the userdata; r is NULL once closed */

/* One command, or a pipeline of n: hiredis calls on_reply once per command, with NULL when
 * the connection goes away first. Freed after the n-th call, whatever they carried. */
struct cmd_op_s {
  fb_fiber_t *fiber;            /* NULL once resumed or detached */
  fb_redis_t *r;
  int n, got;
  unsigned char pipeline;
  cmd_op_t *next, *prev;
};

/* Process-wide bookkeeping: every struct not yet freed (detached at lua_close) and the
 * live counters the leak checks read. */
typedef struct {
  fb_redis_t *conns;
  size_t live_conns, live_polls, live_ops;
} fb_redis_registry_t;
extern fb_redis_registry_t fb_redis_registry;

/* redis.c */
void fb_redis_discard(fb_redis_t *r, const char *why, const char *code);
void fb_redis_poll_ref_update(fb_redis_t *r);
fb_redis_t *fb_redis_check(lua_State *L);
double fb_redis_opt_timeout(lua_State *L, int idx);
int fb_redis_push_error(lua_State *L, const char *msg, const char *code);
int fb_redis_push_lerror(lua_State *L, const char *msg, size_t len, const char *code);
void fb_redis_resume_error(fb_fiber_t *f, const char *msg, const char *code);
void fb_redis_lost_message(fb_redis_t *r, const redisAsyncContext *ac, char *buf, size_t size);

/* redis_cmd.c */
void fb_redis_push_reply(lua_State *co, const redisReply *rp, int nested);
int fb_redis_l_call(lua_State *L);
int fb_redis_l_pipeline(lua_State *L);

/* redis_sub.c */
int fb_redis_l_subscribe(lua_State *L);
int fb_redis_l_next_message(lua_State *L);
void fb_redis_sub_free(fb_redis_t *r);
void fb_redis_sub_detach(fb_redis_t *r);

#endif
