/* tcp.c: TCP client sockets for fibers: connect (resolving names), bounded reads, writes
 * with a high-water mark, half-close. The userdata holds only a pointer to a malloc'd
 * fb_tcp_t, which is freed in its close callback: libuv may use the handle after Lua has
 * dropped it. A waiting fiber is always either resumed or detached, never left pointing here. */
#include "tcp.h"

#include <lauxlib.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "dial.h"
#include "fiber.h"

#define TCP_MT "fibril.tcp"
#define TCP_READ_MAX (16u << 20)   /* default and ceiling of a socket's read buffer */
#define TCP_READ_AHEAD 65536u      /* buffered with no reader waiting, before reading stops */
#define TCP_HIGH_WATER (256u << 10)  /* a writer suspends while more than this is unsent */
#define TCP_HIGH_WATER_MAX (1u << 30)

typedef enum { R_CHUNK, R_LINE, R_BYTES, R_ALL } read_mode_t;

/* A fiber waiting in write() for the unsent bytes to drop to the high-water mark. */
typedef struct writer_s {
  fb_fiber_t *fiber;
  fb_tcp_t *t;
  struct writer_s *next, *prev;
} writer_t;

struct fb_tcp_s {
  uv_tcp_t tcp;                 /* tcp.data points back here */
  uv_shutdown_t shutdown_req;
  /* Read buffer: bytes rbuf[rstart .. rstart+rlen), never more than rmax of them. */
  char *rbuf;
  size_t rstart, rlen, rcap, rmax;
  size_t rscan;                 /* leading buffered bytes known to hold no "\n" */
  fb_fiber_t *reader;           /* the one fiber waiting to read, if any */
  read_mode_t rmode;
  size_t rwant;                 /* R_BYTES: how many */
  int rerr, werr;               /* first read / write failure (a libuv code), sticky */
  unsigned char reading, eof, closing;
  unsigned char shut;           /* 0, 1 = uv_shutdown pending, 2 = done */
  size_t queued, hwm;           /* bytes handed to uv_write and not yet called back */
  writer_t *writers;
  fb_fiber_t *shutter;          /* the fiber waiting in shutdown(), if any */
  char peer[64];                /* "127.0.0.1:8080", "[::1]:8080" */
};

typedef struct { fb_tcp_t *t; } box_t;   /* the userdata; t is NULL once closed */

/* Bytes of a queued write, copied out of the Lua string (see l_tcp_write). */
typedef struct {
  uv_write_t req;
  size_t len;
  char data[];
} write_req_t;

static struct {
  size_t live_handles, live_ops, live_writes;   /* live_ops: dials in flight (dial.c) */
} T;

size_t fb_tcp_live_handles(void) { return T.live_handles; }
size_t fb_tcp_live_requests(void) { return T.live_ops + T.live_writes; }

/* ---- results and errors: C reports (nil, msg, code), lua/fibril/tcp.lua raises ------- */

static int push_error(lua_State *L, const char *msg, const char *code) {
  lua_pushnil(L);
  lua_pushstring(L, msg);
  lua_pushstring(L, code);
  return 3;
}

static int push_uv_error(lua_State *L, int err) {
  return push_error(L, uv_strerror(err), uv_err_name(err));
}

static void resume_error(fb_fiber_t *f, const char *msg, const char *code) {
  lua_State *co = fb_fiber_thread(f);
  lua_checkstack(co, 3);
  fb_fiber_ready(f, push_error(co, msg, code));
}

static void resume_uv_error(fb_fiber_t *f, int err) {
  resume_error(f, uv_strerror(err), uv_err_name(err));
}

static void resume_true(fb_fiber_t *f) {
  lua_State *co = fb_fiber_thread(f);
  lua_checkstack(co, 1);
  lua_pushboolean(co, 1);
  fb_fiber_ready(f, 1);
}

/* Seconds from argument idx: none/nil = wait forever (-1). */
static double opt_timeout(lua_State *L, int idx) {
  double s;
  if (lua_isnoneornil(L, idx)) return -1;
  s = luaL_checknumber(L, idx);
  if (!(s >= 0)) luaL_error(L, "tcp: timeout must be a non-negative number of seconds");
  return s > 1e9 ? -1 : s;
}

/* ---- handles ---------------------------------------------------------------------- */

static void on_tcp_closed(uv_handle_t *h) {
  fb_tcp_t *t = h->data;
  free(t->rbuf);
  free(t);
  T.live_handles--;
}

static fb_tcp_t *tcp_new(size_t rmax, size_t hwm) {
  fb_tcp_t *t = calloc(1, sizeof *t);
  if (!t) return NULL;
  if (uv_tcp_init(fb_sched_loop(), &t->tcp) != 0) {
    free(t);
    return NULL;
  }
  t->tcp.data = t;
  t->rmax = rmax;
  t->hwm = hwm;
  T.live_handles++;
  return t;
}

/* libuv calls back every pending connect, write and shutdown with UV_ECANCELED before
 * on_tcp_closed, so those callbacks may still read t; nothing else may after this. */
static void tcp_close_handle(fb_tcp_t *t) {
  if (t->closing) return;
  t->closing = 1;
  uv_close((uv_handle_t *)&t->tcp, on_tcp_closed);
}

static void peer_name(fb_tcp_t *t) {
  struct sockaddr_storage ss;
  int len = sizeof ss;
  char ip[48] = "?";              /* INET6_ADDRSTRLEN is 46 */
  snprintf(t->peer, sizeof t->peer, "?");
  if (uv_tcp_getpeername(&t->tcp, (struct sockaddr *)&ss, &len) != 0) return;
  if (ss.ss_family == AF_INET6) {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
    uv_ip6_name(a, ip, sizeof ip);
    snprintf(t->peer, sizeof t->peer, "[%s]:%d", ip, ntohs(a->sin6_port));
  } else if (ss.ss_family == AF_INET) {
    struct sockaddr_in *a = (struct sockaddr_in *)&ss;
    uv_ip4_name(a, ip, sizeof ip);
    snprintf(t->peer, sizeof t->peer, "%s:%d", ip, ntohs(a->sin_port));
  }
}

/* ---- reading ---------------------------------------------------------------------- */

static void consume(fb_tcp_t *t, size_t n) {
  t->rstart += n;
  t->rlen -= n;
  t->rscan = 0;
  if (t->rlen == 0) {
    t->rstart = 0;
    if (t->rcap > 2 * TCP_READ_AHEAD) {     /* a long line or read_all passed: give it back */
      free(t->rbuf);
      t->rbuf = NULL;
      t->rcap = 0;
    }
  }
}

/* Pushes onto L what a read in this mode yields now, and returns how many values: the
 * data, nil at EOF, or nil, msg, code. Returns 0 when the reader has to wait. */
static int read_try(fb_tcp_t *t, lua_State *L, read_mode_t mode, size_t want) {
  const char *p = t->rbuf ? t->rbuf + t->rstart : "";   /* no buffer until bytes come */
  lua_checkstack(L, 3);
  switch (mode) {
  case R_CHUNK:
    if (t->rlen == 0) break;
    lua_pushlstring(L, p, t->rlen);
    consume(t, t->rlen);
    return 1;
  case R_LINE: {
    const char *nl = t->rlen > t->rscan ? memchr(p + t->rscan, '\n', t->rlen - t->rscan) : NULL;
    if (nl) {
      size_t n = (size_t)(nl - p), k = n;
      if (k > 0 && p[k - 1] == '\r') k--;
      lua_pushlstring(L, p, k);
      consume(t, n + 1);
      return 1;
    }
    t->rscan = t->rlen;
    if (t->eof && !t->rerr && t->rlen > 0) {  /* the last line has no "\n" */
      lua_pushlstring(L, p, t->rlen);
      consume(t, t->rlen);
      return 1;
    }
    break;
  }
  case R_BYTES:
    if (t->rlen >= want) {
      lua_pushlstring(L, p, want);
      consume(t, want);
      return 1;
    }
    if (t->eof && !t->rerr) {   /* the k bytes stay buffered: read() can still take them */
      lua_pushnil(L);
      lua_pushfstring(L, "connection closed after %d of %d bytes", (int)t->rlen, (int)want);
      lua_pushliteral(L, "closed");
      return 3;
    }
    break;
  case R_ALL:
    if (t->eof && !t->rerr) {
      lua_pushlstring(L, p, t->rlen);
      consume(t, t->rlen);
      return 1;
    }
    break;
  }
  if (t->rerr) return push_uv_error(L, t->rerr);
  if (t->eof) {
    lua_pushnil(L);
    return 1;
  }
  if (t->rlen >= t->rmax) {
    lua_pushnil(L);
    lua_pushfstring(L, "read buffer limit of %d bytes reached", (int)t->rmax);
    lua_pushliteral(L, "limit");
    return 3;
  }
  return 0;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  fb_tcp_t *t = h->data;
  size_t want = suggested, room = t->rmax - t->rlen;   /* rlen <= rmax always */
  if (want > room) want = room;
  if (t->rcap - t->rstart - t->rlen < want) {
    if (t->rstart > 0) {                               /* slide the bytes to the front */
      memmove(t->rbuf, t->rbuf + t->rstart, t->rlen);
      t->rstart = 0;
    }
    if (t->rcap - t->rlen < want) {
      size_t ncap = t->rcap * 2 > t->rlen + want ? t->rcap * 2 : t->rlen + want;
      char *n;
      if (ncap > t->rmax) ncap = t->rmax;
      n = realloc(t->rbuf, ncap);
      if (!n) {
        *buf = uv_buf_init(NULL, 0);                   /* libuv reports UV_ENOBUFS */
        return;
      }
      t->rbuf = n;
      t->rcap = ncap;
    }
  }
  room = t->rcap - t->rstart - t->rlen;
  if (room > t->rmax - t->rlen) room = t->rmax - t->rlen;
  *buf = uv_buf_init(t->rbuf + t->rstart + t->rlen, (unsigned)room);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* Reads while a fiber waits for more, or while less than TCP_READ_AHEAD is buffered with
 * nobody reading; otherwise stops, so a peer that sends faster than we read is held back
 * by TCP rather than by our memory. Returns 0 or the uv_read_start error. */
static int read_update(fb_tcp_t *t) {
  int want = !t->closing && !t->eof && !t->rerr && t->rlen < t->rmax &&
             (t->reader || t->rlen < TCP_READ_AHEAD);
  if (want && !t->reading) {
    int rc = uv_read_start((uv_stream_t *)&t->tcp, on_alloc, on_read);
    if (rc < 0) {
      t->rerr = rc;
      return rc;
    }
    t->reading = 1;
  } else if (!want && t->reading) {
    uv_read_stop((uv_stream_t *)&t->tcp);
    t->reading = 0;
  }
  return 0;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  fb_tcp_t *t = s->data;
  (void)buf;                      /* it is the tail of t->rbuf that on_alloc handed out */
  if (nread > 0) t->rlen += (size_t)nread;
  else if (nread == UV_EOF) t->eof = 1;
  else if (nread == UV_ENOBUFS) {
    if (t->rlen < t->rmax) t->rerr = UV_ENOMEM;   /* at the limit read_try says "limit" */
  } else if (nread < 0) t->rerr = (int)nread;
  if (t->reader) {
    int n = read_try(t, fb_fiber_thread(t->reader), t->rmode, t->rwant);
    if (n > 0) {
      fb_fiber_t *f = t->reader;
      t->reader = NULL;
      fb_fiber_ready(f, n);
    }
  }
  read_update(t);
}

static void read_cancel(fb_fiber_t *f, void *data) {
  fb_tcp_t *t = data;
  (void)f;
  t->reader = NULL;               /* what arrives stays buffered for the next read */
  read_update(t);
}

/* ---- writing ---------------------------------------------------------------------- */

static void writer_unlink(fb_tcp_t *t, writer_t *w) {
  if (w->prev) w->prev->next = w->next;
  else t->writers = w->next;
  if (w->next) w->next->prev = w->prev;
}

/* Resumes every waiting writer with true (err == 0) or the error. */
static void writers_wake(fb_tcp_t *t, int err, const char *msg, const char *code) {
  writer_t *w;
  while ((w = t->writers) != NULL) {
    fb_fiber_t *f = w->fiber;
    writer_unlink(t, w);
    free(w);
    if (!err) resume_true(f);
    else if (msg) resume_error(f, msg, code);
    else resume_uv_error(f, err);
  }
}

static void write_cancel(fb_fiber_t *f, void *data) {
  writer_t *w = data;
  (void)f;
  writer_unlink(w->t, w);         /* its bytes stay queued and are still sent */
  free(w);
}

static void on_write(uv_write_t *req, int status) {
  write_req_t *w = (write_req_t *)req;
  fb_tcp_t *t = req->handle->data;
  t->queued -= w->len;
  T.live_writes--;
  free(w);                        /* the copy dies here, whatever the status */
  if (status < 0 && status != UV_ECANCELED && !t->werr) t->werr = status;
  if (t->closing) return;         /* closing already resumed the waiters */
  if (t->werr) writers_wake(t, t->werr, NULL, NULL);
  else if (t->queued <= t->hwm) writers_wake(t, 0, NULL, NULL);
}

/* ---- connecting (runtime/dial.c) --------------------------------------------------- */

typedef struct { size_t rmax, hwm; } connect_args_t;

static uv_tcp_t *dial_open(void *args) {
  connect_args_t *a = args;
  fb_tcp_t *t = tcp_new(a->rmax, a->hwm);
  return t ? &t->tcp : NULL;
}

static void dial_discard(uv_tcp_t *tcp) { tcp_close_handle(tcp->data); }

static void dial_done(fb_fiber_t *f, uv_tcp_t *tcp, int status, void *args) {
  fb_tcp_t *t;
  lua_State *co;
  box_t *box;
  (void)args;
  if (!f) return;                 /* given up: nothing waits, no handle is left */
  if (!tcp) {
    resume_uv_error(f, status);
    return;
  }
  t = tcp->data;
  co = fb_fiber_thread(f);
  lua_checkstack(co, 2);
  box = lua_newuserdata(co, sizeof *box);     /* stack: box; from here the box owns t */
  box->t = t;
  luaL_getmetatable(co, TCP_MT);
  lua_setmetatable(co, -2);
  peer_name(t);
  uv_tcp_nodelay(&t->tcp, 1);     /* request/response protocols: no Nagle delay */
  read_update(t);                 /* read ahead: data and EOF arriving before read() */
  fb_fiber_ready(f, 1);
}

static const fb_dial_ops_t dial_ops = { dial_open, dial_discard, dial_done, &T.live_ops };

/* connect(host, port [, timeout [, read_limit [, high_water]]]) -> socket | nil, msg, code.
 * One suspension covers resolving and every attempt, so the timeout is for the whole. */
static int l_tcp_connect(lua_State *L) {
  size_t hlen;
  const char *host = luaL_checklstring(L, 1, &hlen);  /* borrowed: argument 1 stays put */
  lua_Integer port = luaL_checkinteger(L, 2);
  double timeout = opt_timeout(L, 3);
  lua_Number rmax = luaL_optnumber(L, 4, TCP_READ_MAX);
  lua_Number hwm = luaL_optnumber(L, 5, TCP_HIGH_WATER);
  connect_args_t args;
  fb_fiber_t *f;
  int rc;

  if (hlen == 0 || hlen > 255 || strlen(host) != hlen)
    return luaL_error(L, "tcp.connect: host must be a name or an address of 1 to 255 bytes");
  if (port < 1 || port > 65535)
    return luaL_error(L, "tcp.connect: port must be an integer from 1 to 65535");
  if (!(rmax >= 1 && rmax <= TCP_READ_MAX))
    return luaL_error(L, "tcp.connect: read_limit must be from 1 to %d bytes", (int)TCP_READ_MAX);
  if (!(hwm >= 0 && hwm <= TCP_HIGH_WATER_MAX))
    return luaL_error(L, "tcp.connect: write_high_water must be from 0 to %d bytes",
                      (int)TCP_HIGH_WATER_MAX);
  f = fb_fiber_check(L, "tcp.connect");
  args.rmax = (size_t)rmax;
  args.hwm = (size_t)hwm;
  if ((rc = fb_dial_start(f, host, (int)port, &dial_ops, &args, sizeof args)) != 0)
    return push_uv_error(L, rc);   /* failed before anything was in flight */
  return fb_fiber_suspend(L, f, timeout);
}

/* ---- socket methods --------------------------------------------------------------- */

static fb_tcp_t *check_open(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, TCP_MT);
  if (!box->t) luaL_error(L, "tcp: connection is closed");
  return box->t;
}

/* read(sock, mode [, n] [, timeout]) with mode "chunk" | "line" | "bytes" | "all" ->
 * data | nil (EOF) | nil, msg, code. Buffered data returns without suspending. */
static int l_tcp_read(lua_State *L) {
  static const char *const modes[] = { "chunk", "line", "bytes", "all", NULL };
  fb_tcp_t *t = check_open(L);
  read_mode_t mode = (read_mode_t)luaL_checkoption(L, 2, NULL, modes);
  size_t want = 0;
  double timeout = opt_timeout(L, 4);
  fb_fiber_t *f;
  int n;

  if (mode == R_BYTES) {
    lua_Number w = luaL_checknumber(L, 3);
    if (!(w >= 0 && w <= (lua_Number)t->rmax) || w != (lua_Number)(size_t)w)
      return luaL_error(L, "tcp: read_bytes: n must be an integer from 0 to the read limit "
                        "(%d bytes)", (int)t->rmax);
    want = (size_t)w;
    if (want == 0) {
      lua_pushliteral(L, "");
      return 1;
    }
  }
  if (t->reader) return luaL_error(L, "tcp: another fiber is already reading this socket");
  if ((n = read_try(t, L, mode, want)) > 0) {
    read_update(t);               /* room again: resume reading ahead */
    return n;
  }
  f = fb_fiber_check(L, "sock:read");
  t->reader = f;
  t->rmode = mode;
  t->rwant = want;
  if (read_update(t) < 0) {       /* a reader may read past TCP_READ_AHEAD */
    t->reader = NULL;
    return read_try(t, L, mode, want);   /* rerr is set: (nil, msg, code) */
  }
  fb_fiber_on_cancel(f, read_cancel, t);
  return fb_fiber_suspend(L, f, timeout);
}

/* write(sock, data [, timeout]) -> true | nil, msg, code. Queues all of data, then suspends
 * while more than the high-water mark is unsent. */
static int l_tcp_write(lua_State *L) {
  fb_tcp_t *t = check_open(L);
  size_t len, off = 0, rem;
  const char *data = luaL_checklstring(L, 2, &len);  /* borrowed while on the stack */
  double timeout = opt_timeout(L, 3);
  fb_fiber_t *f = NULL;
  writer_t *waiter = NULL;
  write_req_t *w;
  uv_buf_t b;
  int rc;

  if (t->shut) return luaL_error(L, "tcp: cannot write after shutdown");
  if (len > 0x7fffffff) return luaL_error(L, "tcp: cannot write 2 GiB or more at once");
  if (t->werr) return push_uv_error(L, t->werr);
  if (len == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  /* Raise (no fiber, pending cancel, no memory) before any byte leaves. */
  if (t->queued + len > t->hwm) {
    f = fb_fiber_check(L, "sock:write");
    if (!(waiter = malloc(sizeof *waiter))) return luaL_error(L, "tcp: out of memory");
  }
  if (t->queued == 0) {           /* nothing queued: the kernel may take it all now */
    b = uv_buf_init((char *)data, (unsigned)len);
    rc = uv_try_write((uv_stream_t *)&t->tcp, &b, 1);
    if (rc > 0) off = (size_t)rc;
    else if (rc < 0 && rc != UV_EAGAIN) {
      free(waiter);
      t->werr = rc;
      return push_uv_error(L, rc);
    }
  }
  if (off < len) {
    rem = len - off;
    if (!(w = malloc(sizeof *w + rem))) {
      free(waiter);
      return luaL_error(L, "tcp: out of memory");
    }
    /* The Lua string is only borrowed: the request owns this copy from here and on_write
     * frees it, whatever the status (even UV_ECANCELED when the socket closes). */
    memcpy(w->data, data + off, rem);
    w->len = rem;
    b = uv_buf_init(w->data, (unsigned)rem);
    if ((rc = uv_write(&w->req, (uv_stream_t *)&t->tcp, &b, 1, on_write)) < 0) {
      free(w);
      free(waiter);
      t->werr = rc;
      return push_uv_error(L, rc);
    }
    t->queued += rem;
    T.live_writes++;
  }
  if (t->queued <= t->hwm) {
    free(waiter);
    lua_pushboolean(L, 1);
    return 1;
  }
  waiter->fiber = f;
  waiter->t = t;
  waiter->prev = NULL;
  waiter->next = t->writers;
  if (t->writers) t->writers->prev = waiter;
  t->writers = waiter;
  fb_fiber_on_cancel(f, write_cancel, waiter);
  return fb_fiber_suspend(L, f, timeout);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  fb_tcp_t *t = req->handle->data;
  fb_fiber_t *f = t->shutter;
  t->shut = 2;
  if (status < 0 && status != UV_ECANCELED && !t->werr) t->werr = status;
  if (t->closing || !f) return;   /* closing resumed it already; or it gave up waiting */
  t->shutter = NULL;
  if (status < 0) resume_uv_error(f, status);
  else resume_true(f);
}

static void shutdown_cancel(fb_fiber_t *f, void *data) {
  fb_tcp_t *t = data;
  (void)f;
  t->shutter = NULL;              /* the shutdown itself still happens */
}

/* shutdown(sock [, timeout]) -> true | nil, msg, code: sends FIN once every queued byte is
 * out, and suspends until then. Reading stays possible. */
static int l_tcp_shutdown(lua_State *L) {
  fb_tcp_t *t = check_open(L);
  double timeout = opt_timeout(L, 2);
  fb_fiber_t *f;
  int rc;
  if (t->shut == 2) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if (t->shut == 1) return luaL_error(L, "tcp: shutdown already in progress");
  if (t->werr) return push_uv_error(L, t->werr);
  f = fb_fiber_check(L, "sock:shutdown");
  if ((rc = uv_shutdown(&t->shutdown_req, (uv_stream_t *)&t->tcp, on_shutdown)) < 0)
    return push_uv_error(L, rc);
  t->shut = 1;
  t->shutter = f;
  fb_fiber_on_cancel(f, shutdown_cancel, t);
  return fb_fiber_suspend(L, f, timeout);
}

/* close, __close and __gc: idempotent. Fibers waiting on the socket resume with
 * (nil, "connection is closed", "closed"); the struct is freed in on_tcp_closed. */
static int l_tcp_close(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, TCP_MT);
  fb_tcp_t *t = box->t;
  fb_fiber_t *f;
  if (!t) return 0;
  box->t = NULL;
  if ((f = t->reader) != NULL) resume_error(f, "connection is closed", "closed");
  if ((f = t->shutter) != NULL) resume_error(f, "connection is closed", "closed");
  t->reader = t->shutter = NULL;
  writers_wake(t, UV_ECANCELED, "connection is closed", "closed");
  tcp_close_handle(t);
  return 0;
}

static int l_tcp_peer(lua_State *L) {
  lua_pushstring(L, check_open(L)->peer);
  return 1;
}

/* stats(sock) -> queued (unsent bytes), buffered (read, not yet taken), read_limit,
 * high_water. */
static int l_tcp_stats(lua_State *L) {
  fb_tcp_t *t = check_open(L);
  lua_pushnumber(L, (lua_Number)t->queued);
  lua_pushnumber(L, (lua_Number)t->rlen);
  lua_pushnumber(L, (lua_Number)t->rmax);
  lua_pushnumber(L, (lua_Number)t->hwm);
  return 4;
}

static int l_tcp_is_closed(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, TCP_MT);
  lua_pushboolean(L, box->t == NULL);
  return 1;
}

/* live() -> open handles, requests in flight. */
static int l_tcp_live(lua_State *L) {
  lua_pushnumber(L, (lua_Number)T.live_handles);
  lua_pushnumber(L, (lua_Number)(T.live_ops + T.live_writes));
  return 2;
}

/* Run by lua_close (fb_sched_on_close): connects in flight belong to no
 * userdata, so detach them here, before their fibers are freed; the loop run that follows
 * lua_close delivers their callbacks, which then only free. */
static void on_lua_close(void) {
  fb_dial_detach_all(&dial_ops);
}

static const luaL_Reg tcp_methods[] = {
  { "read", l_tcp_read },
  { "write", l_tcp_write },
  { "shutdown", l_tcp_shutdown },
  { "close", l_tcp_close },
  { "peer", l_tcp_peer },
  { "stats", l_tcp_stats },
  { "is_closed", l_tcp_is_closed },
  { NULL, NULL }
};

static const luaL_Reg tcp_funcs[] = {
  { "connect", l_tcp_connect },
  { "live", l_tcp_live },
  { NULL, NULL }
};

int luaopen_fibril_core_tcp(lua_State *L) {
  lua_newtable(L);                           /* stack: module */
  luaL_setfuncs(L, tcp_funcs, 0);
  lua_newtable(L);                           /* stack: module methods */
  luaL_setfuncs(L, tcp_methods, 0);
  if (luaL_newmetatable(L, TCP_MT)) {        /* stack: module methods mt */
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_tcp_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_tcp_close);
    lua_setfield(L, -2, "__close");
    fb_sched_on_close(on_lua_close);
  }
  lua_pop(L, 1);
  lua_setfield(L, -2, "methods");            /* for lua/fibril/tcp.lua */
  lua_pushnumber(L, TCP_READ_MAX);
  lua_setfield(L, -2, "READ_LIMIT");
  lua_pushnumber(L, TCP_HIGH_WATER);
  lua_setfield(L, -2, "HIGH_WATER");
  return 1;
}
