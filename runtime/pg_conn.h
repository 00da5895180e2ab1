/* pg_conn.h: a PostgreSQL connection's struct and internals, shared by pg.c (connecting,
 * lifetime, the poll handle, the Lua module) and pg_query.c (queries, results, cancel,
 * notifications). Not for other files: the rest of the runtime sees pg.h only. */
#ifndef FB_PG_CONN_H
#define FB_PG_CONN_H

#include <libpq-fe.h>
#include <lua.h>
#include <stddef.h>
#include <uv.h>

#include "fiber.h"
#include "pg.h"

#define FB_PG_MT "fibril.pg"

enum { FB_PG_CONNECTING, FB_PG_IDLE, FB_PG_BUSY, FB_PG_DRAINING, FB_PG_DEAD };
extern const char *const fb_pg_state_names[];

struct fb_pg_s {
  PGconn *conn;                 /* NULL once dead */
  uv_poll_t *poll;              /* NULL once closing; its data points here until then */
  int fd, events;
  unsigned char state;
  unsigned char boxed;          /* a Lua box points here; else the connect op owns it */
  unsigned char listening;      /* keep notifications for wait_notify, else drop them */
  unsigned char flushing;       /* output still queued in libpq: wait for writable too */
  unsigned char failed;         /* the query's result is an error (already pushed) */
  unsigned char pipeline;       /* a batch runs in pipeline mode (pg_batch.c) */
  unsigned char slot;           /* batch: what the current statement left on the stack */
  int nentries, cur;            /* batch: statements sent, index of the one being read */
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

typedef struct { fb_pg_t *p; } fb_pg_box_t;   /* the userdata; p is NULL once closed */

/* Queries in flight (state busy); pg.c counts the rest for fb_pg_live_*. */
extern size_t fb_pg_live_ops;

/* Resumes the fiber waiting on p with nil, msg, code, dropping what its op had pushed. */
void fb_pg_fail_fiber(fb_pg_t *p, const char *msg, const char *code);
int fb_pg_push_error(lua_State *L, const char *msg, const char *code);
/* Watches p's socket for events (UV_READABLE...); referenced unless p is idle. 0 or -1. */
int fb_pg_poll_watch(fb_pg_t *p, int events);
/* Asks the server, from the thread pool, to cancel what p runs. */
void fb_pg_send_cancel(fb_pg_t *p);
/* p ends: waiting fibers fail with msg, later calls too; cancel: stop its query first. p
 * is freed when no box points to it: do not touch it afterwards. */
void fb_pg_dead(fb_pg_t *p, const char *msg, const char *code, int cancel);
/* The server went away: fb_pg_dead with "connection lost (where: libpq's reason)". */
void fb_pg_lost(fb_pg_t *p);
/* pg_query.c: reads, flushes and takes results; called for every poll event once connected. */
void fb_pg_io_step(fb_pg_t *p);
/* The cancel hook of a query or batch: the fiber is gone; p drains while the server
 * cancels. */
void fb_pg_query_cancel(fb_fiber_t *f, void *data);
/* A drained connection is idle again: wakes a fiber in wait_idle. */
void fb_pg_drained(fb_pg_t *p);
/* pg_batch.c: takes one result (or the NULL ending a statement's) of a pipelined batch.
 * Returns 0 when p was dropped (do not touch it). */
int fb_pg_batch_step(fb_pg_t *p, PGresult *res);
fb_pg_t *fb_pg_check_box(lua_State *L);
double fb_pg_opt_timeout(lua_State *L, int idx);

int fb_pg_l_query(lua_State *L);
int fb_pg_l_query_prepared(lua_State *L);
int fb_pg_l_prepare(lua_State *L);
int fb_pg_l_wait_idle(lua_State *L);
int fb_pg_l_wait_notify(lua_State *L);
int fb_pg_l_batch(lua_State *L);

#endif
