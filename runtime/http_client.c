/* http_client.c: one HTTP/1.1 client connection for fibers: TCP through libuv (connected by
 * dial.c, as tcp.c's sockets are), optional TLS (tls.c), responses parsed by http_client_parse.c, a
 * bounded read-ahead of body bytes. The pool, redirects and the public API are Lua's
 * (lua/fibril/http.lua). Every byte from the peer is hostile: heads, header counts and
 * bodies have limits, and a connection that broke a rule is never reused.
 * A conn is freed only when Lua dropped its box and both of its handles are closed. */
#include "http_client.h"

#include <lauxlib.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "dial.h"
#include "fiber.h"
#include "http_client_conn.h"
#include "tls.h"

#define HC_MT "fibril.http_client"

typedef struct { conn_t *c; } box_t;   /* the userdata; c is NULL once closed */

typedef struct {
  uv_write_t req;
  size_t len;
  char data[];
} write_req_t;

static struct {
  conn_t *conns;
  size_t live_handles, live_ops, live_writes;   /* live_ops: dials in flight (dial.c) */
  char rbuf[HC_READ_SIZE];        /* every socket read lands here and is parsed at once */
} H;

size_t fb_http_client_live_handles(void) { return H.live_handles; }
size_t fb_http_client_live_requests(void) { return H.live_ops + H.live_writes; }

/* ---- results: C reports (nil, msg, code), lua/fibril/http.lua raises --------------- */

static int push_error(lua_State *L, const char *msg, const char *code) {
  lua_checkstack(L, 3);
  lua_pushnil(L);
  lua_pushstring(L, msg);
  lua_pushstring(L, code);
  return 3;
}

static void resume_error(fb_fiber_t *f, const char *msg, const char *code) {
  fb_fiber_ready(f, push_error(fb_fiber_thread(f), msg, code));
}

static double opt_timeout(lua_State *L, int idx) {
  double s;
  if (lua_isnoneornil(L, idx)) return -1;
  s = luaL_checknumber(L, idx);
  if (!(s >= 0)) luaL_error(L, "http: timeout must be a non-negative number of seconds");
  return s > 1e9 ? -1 : s;
}

/* ---- connection lifetime ------------------------------------------------------------ */

static void conn_free(conn_t *c) {
  if (c->live_prev) c->live_prev->live_next = c->live_next;
  else H.conns = c->live_next;
  if (c->live_next) c->live_next->live_prev = c->live_prev;
  fb_buf_free(&c->head);
  fb_buf_free(&c->body);
  free(c);
}

static void on_handle_closed(uv_handle_t *h) {
  conn_t *c = h->data;
  if (--c->open_handles > 0) return;
  H.live_handles--;               /* the socket is gone; the struct waits for its box */
  if (!c->boxed) conn_free(c);
}

static conn_t *conn_new(void) {
  conn_t *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  if (uv_tcp_init(fb_sched_loop(), &c->tcp) != 0) {
    free(c);
    return NULL;
  }
  uv_timer_init(fb_sched_loop(), &c->idle);
  c->tcp.data = c->idle.data = c;
  c->open_handles = 2;
  fb_hc_parser_init(c);
  c->live_next = H.conns;
  if (H.conns) H.conns->live_prev = c;
  H.conns = c;
  H.live_handles++;
  return c;
}

/* Closes the handles (once); a waiting fiber resumes with (nil, msg, "closed"). Pending
 * write and connect callbacks run (UV_ECANCELED) before the close callbacks. */
static void conn_close(conn_t *c) {
  fb_fiber_t *f = c->waiter;
  if (c->closing) return;
  c->closing = 1;
  c->waiter = NULL;
  if (f) resume_error(f, "connection is closed", "closed");
  fb_tls_free(c->tls);
  c->tls = NULL;
  uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
  uv_close((uv_handle_t *)&c->idle, on_handle_closed);
}

/* Marks the connection failed (the first failure wins); it is never reused after this. */
void fb_hc_fail(conn_t *c, const char *code, const char *fmt, ...) {
  va_list ap;
  if (c->err_code) return;
  c->err_code = code;
  va_start(ap, fmt);
  vsnprintf(c->err, sizeof c->err, fmt, ap);
  va_end(ap);
}

/* ---- writing --------------------------------------------------------------------------- */

static void on_write(uv_write_t *req, int status) {
  write_req_t *w = (write_req_t *)req;
  conn_t *c = req->handle->data;
  H.live_writes--;
  free(w);                        /* the copy dies here, whatever the status */
  if (status < 0 && status != UV_ECANCELED)
    fb_hc_fail(c, uv_err_name(status), "write failed: %s", uv_strerror(status));
}

/* Sends n bytes: what the kernel takes at once, the rest copied and queued. 0 or a uv error. */
static int send_raw(conn_t *c, const char *p, size_t n, int copy_only) {
  write_req_t *w;
  uv_buf_t b;
  int rc;
  if (!copy_only) {
    b = uv_buf_init((char *)p, (unsigned)n);
    rc = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (rc > 0) {
      p += rc;
      n -= (size_t)rc;
    } else if (rc < 0 && rc != UV_EAGAIN) {
      return rc;
    }
  }
  if (n == 0) return 0;
  if (!(w = malloc(sizeof *w + n))) return UV_ENOMEM;
  memcpy(w->data, p, n);
  w->len = n;
  b = uv_buf_init(w->data, (unsigned)n);
  if ((rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write)) < 0) {
    free(w);
    return rc;
  }
  H.live_writes++;
  return 0;
}

/* Queues the ciphertext OpenSSL produced (handshake records or encrypted data). */
static int flush_tls(conn_t *c) {
  size_t n = c->tls ? fb_tls_pending(c->tls) : 0;
  write_req_t *w;
  uv_buf_t b;
  int rc;
  if (n == 0) return 0;
  if (!(w = malloc(sizeof *w + n))) return UV_ENOMEM;
  w->len = fb_tls_take(c->tls, w->data, n);
  b = uv_buf_init(w->data, (unsigned)w->len);
  if ((rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write)) < 0) {
    free(w);
    return rc;
  }
  H.live_writes++;
  return 0;
}

/* ---- reading ---------------------------------------------------------------------------- */

/* One buffer serves every connection: on_read parses (and copies body bytes out of) what
 * arrived before it returns, and libuv calls on_alloc/on_read for one socket at a time. */
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  (void)suggested;
  *buf = uv_buf_init(H.rbuf, HC_READ_SIZE);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* Reads unless closed, failed, at EOF, or with a full read-ahead: a fast server is then
 * held back by TCP, not by our memory. */
static void read_update(conn_t *c) {
  int want = !c->closing && !c->eof && !c->err_code && !c->stray && c->body.len < HC_READ_AHEAD;
  if (want && !c->reading) {
    int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (rc < 0) fb_hc_fail(c, uv_err_name(rc), "read failed: %s", uv_strerror(rc));
    else c->reading = 1;
  } else if (!want && c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
  }
}

/* What a body read gives now: a chunk, (false, keepalive) at the end, an error; 0: wait. */
static int body_try(conn_t *c, lua_State *L) {
  lua_checkstack(L, 3);
  if (c->body.len > 0) {
    lua_pushlstring(L, c->body.data, c->body.len);
    fb_buf_reset(&c->body);
    if (c->body.cap > 2 * HC_READ_SIZE) fb_buf_free(&c->body);
    read_update(c);
    return 1;
  }
  if (c->done) {
    lua_pushboolean(L, 0);
    lua_pushboolean(L, c->keepalive && !c->stray && !c->eof && !c->err_code);
    return 2;
  }
  if (c->err_code) return push_error(L, c->err, c->err_code);
  return 0;
}

/* Resumes the waiting fiber when what it waits for is there. */
static void deliver(conn_t *c) {
  fb_fiber_t *f = c->waiter;
  lua_State *co;
  int n = 0;
  if (!f) return;
  co = fb_fiber_thread(f);
  if (c->wait == W_HEAD) {
    if (c->head_ready) {
      fb_hc_push_head(co, c);
      n = 2;
      if (c->done) {              /* the whole response came: one resume for all of it */
        lua_pushlstring(co, c->body.data ? c->body.data : "", c->body.len);
        lua_pushboolean(co, c->keepalive && !c->stray && !c->eof && !c->err_code);
        fb_buf_reset(&c->body);
        c->head_ready = 0;        /* nothing left to read() */
        n = 4;
      }
    } else if (c->err_code) {
      n = push_error(co, c->err, c->err_code);
    }
  } else if (c->wait == W_BODY) {
    n = body_try(c, co);
  }
  if (n > 0) {
    c->waiter = NULL;
    c->wait = W_NONE;
    fb_fiber_ready(f, n);
  }
}

static void box_push(lua_State *L, conn_t *c) {
  box_t *box;
  lua_checkstack(L, 2);
  box = lua_newuserdata(L, sizeof *box);   /* from here the box owns c */
  box->c = c;
  c->boxed = 1;
  luaL_getmetatable(L, HC_MT);
  lua_setmetatable(L, -2);
}

/* The handshake advanced (or failed): finish the connect wait when it is over. */
static void handshake_step(conn_t *c) {
  fb_tls_err_t err;
  fb_fiber_t *f = c->waiter;
  int rc = fb_tls_handshake(c->tls, &err);
  int wrc = flush_tls(c);
  if (rc == FB_TLS_WANT && wrc == 0 && !c->eof && !c->err_code) return;
  c->handshaking = 0;
  c->waiter = NULL;
  c->wait = W_NONE;
  if (rc == FB_TLS_OK && wrc == 0 && !c->err_code) {
    box_push(fb_fiber_thread(f), c);
    fb_fiber_ready(f, 1);
    return;
  }
  if (rc == FB_TLS_ERROR) resume_error(f, err.msg, err.code);
  else if (wrc != 0) resume_error(f, uv_strerror(wrc), uv_err_name(wrc));
  else if (c->err_code) resume_error(f, c->err, c->err_code);
  else resume_error(f, "connection closed during the TLS handshake", "tls");
  conn_close(c);                  /* not boxed: freed once closed */
}

static void on_eof(conn_t *c);

/* Decrypts everything buffered and parses it. */
static void tls_pump(conn_t *c) {
  char plain[16384];
  fb_tls_err_t err;
  for (;;) {
    size_t n;
    int rc = fb_tls_read(c->tls, plain, sizeof plain, &n, &err);
    if (rc == FB_TLS_OK) fb_hc_parse(c, plain, n);
    else if (rc == FB_TLS_WANT) break;
    else {
      if (rc == FB_TLS_ERROR) fb_hc_fail(c, err.code, "%s", err.msg);
      else on_eof(c);            /* close_notify: as good as EOF */
      break;
    }
  }
  if (flush_tls(c) != 0) fb_hc_fail(c, "tls", "cannot queue TLS records");
}

/* The peer ended the stream: a body delimited by EOF completes, anything else is cut short. */
static void on_eof(conn_t *c) {
  c->eof = 1;
  if (!c->active || c->err_code) return;
  if (!fb_hc_finish(c)) {
    if (c->received == 0)
      fb_hc_fail(c, "closed", "connection closed before any response byte");
    else
      fb_hc_fail(c, "truncated", "connection closed before the response was complete");
  }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  conn_t *c = s->data;
  if (nread > 0) {
    if (c->tls) {
      if (fb_tls_feed(c->tls, buf->base, (size_t)nread) != 0) fb_hc_fail(c, "tls", "out of memory");
      else if (!c->handshaking) tls_pump(c);
    } else {
      fb_hc_parse(c, buf->base, (size_t)nread);
    }
  } else if (nread == UV_EOF) {
    if (!c->eof) on_eof(c);
  } else if (nread < 0) {
    if (c->active || c->handshaking)
      fb_hc_fail(c, uv_err_name((int)nread), "%s", uv_strerror((int)nread));
    else
      c->eof = 1;                 /* an idle connection reset: just never reuse it */
  }
  if (c->handshaking) handshake_step(c);
  else deliver(c);
  if (c->closing) return;
  if (c->parked && (c->eof || c->stray || c->err_code)) conn_close(c);   /* free the fd now */
  else read_update(c);
}

static void wait_cancel(fb_fiber_t *f, void *data) {
  conn_t *c = data;
  (void)f;
  c->waiter = NULL;
  c->wait = W_NONE;
  if (!c->boxed) conn_close(c);   /* a handshake given up: nobody else owns it */
}

/* ---- connecting --------------------------------------------------------------------------- */

typedef struct { fb_tls_t *tls; } connect_args_t;   /* handed to the connection that succeeds */

static uv_tcp_t *dial_open(void *args) {
  conn_t *c = conn_new();
  (void)args;
  return c ? &c->tcp : NULL;
}

static void dial_discard(uv_tcp_t *tcp) { conn_close(tcp->data); }

static void dial_done(fb_fiber_t *f, uv_tcp_t *tcp, int status, void *args) {
  connect_args_t *a = args;
  conn_t *c;
  if (!f || !tcp) {               /* failed, or given up (then nothing waits) */
    fb_tls_free(a->tls);
    if (f) resume_error(f, uv_strerror(status), uv_err_name(status));
    return;
  }
  c = tcp->data;
  uv_tcp_nodelay(&c->tcp, 1);
  c->tls = a->tls;
  read_update(c);
  if (!c->tls) {
    box_push(fb_fiber_thread(f), c);
    fb_fiber_ready(f, 1);
    return;
  }
  c->handshaking = 1;             /* same wait, now on the connection */
  c->waiter = f;
  c->wait = W_CONNECT;
  fb_fiber_on_cancel(f, wait_cancel, c);
  handshake_step(c);
}

static const fb_dial_ops_t dial_ops = { dial_open, dial_discard, dial_done, &H.live_ops };

/* connect(host, port, timeout, tls, verify, ca_file) -> conn | nil, msg, code. One wait
 * covers resolving, each address in turn and the TLS handshake. */
static int l_connect(lua_State *L) {
  size_t hlen;
  const char *host = luaL_checklstring(L, 1, &hlen);  /* borrowed: argument 1 stays put */
  lua_Integer port = luaL_checkinteger(L, 2);
  double timeout = opt_timeout(L, 3);
  int use_tls = lua_toboolean(L, 4), verify = lua_toboolean(L, 5);
  const char *ca_file = luaL_optstring(L, 6, NULL);
  connect_args_t args = { NULL };
  fb_fiber_t *f;
  int rc;

  if (hlen == 0 || hlen > 255 || strlen(host) != hlen)
    return luaL_error(L, "http: host must be a name or an address of 1 to 255 bytes");
  if (port < 1 || port > 65535) return luaL_error(L, "http: port must be from 1 to 65535");
  f = fb_fiber_check(L, "http.request");
  if (use_tls) {                  /* a bad CA file fails here, before any packet */
    fb_tls_err_t err;
    if (!(args.tls = fb_tls_new(host, ca_file, verify, &err))) return push_error(L, err.msg, err.code);
  }
  if ((rc = fb_dial_start(f, host, (int)port, &dial_ops, &args, sizeof args)) != 0) {
    fb_tls_free(args.tls);        /* failed before anything was in flight */
    return push_error(L, uv_strerror(rc), uv_err_name(rc));
  }
  return fb_fiber_suspend(L, f, timeout);
}

/* ---- connection methods ------------------------------------------------------------------ */

static conn_t *check_open(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, HC_MT);
  if (!box->c) luaL_error(L, "http: connection is closed");
  return box->c;
}

/* request(conn, bytes, head_only, max_header_bytes, max_body, timeout) -> status, headers
 * [, body, reusable] | nil, msg, code. Sends the request and waits for the response
 * head; when the whole response is in by then, its body comes along (as read() gives it). */
static int l_request(lua_State *L) {
  conn_t *c = check_open(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);   /* borrowed while on the stack */
  int head_only = lua_toboolean(L, 3);
  lua_Number max_head = luaL_checknumber(L, 4), max_body = luaL_checknumber(L, 5);
  double timeout = opt_timeout(L, 6);
  fb_fiber_t *f;
  int rc;

  if (c->active || c->waiter) return luaL_error(L, "http: connection is busy with a request");
  if (!(max_head >= 64 && max_head <= (1 << 30)) || !(max_body >= 0 && max_body <= 9e15))
    return luaL_error(L, "http: max_header_bytes or max_body out of range");
  if (len > 0x7fffffff) return luaL_error(L, "http: cannot send 2 GiB or more at once");
  f = fb_fiber_check(L, "http.request");
  if (c->err_code) return push_error(L, c->err, c->err_code);
  if (c->eof || c->stray || c->closing)
    return push_error(L, "connection closed by the server", "closed");
  llhttp_reset(&c->parser);
  fb_buf_reset(&c->head);
  c->head.max = (size_t)max_head;
  fb_buf_reset(&c->body);         /* kept from the last response: no malloc per request */
  c->body.max = HC_READ_AHEAD + 2 * HC_READ_SIZE;
  c->max_body = (uint64_t)max_body;
  c->body_total = c->received = 0;
  c->head_only = (unsigned char)head_only;
  c->head_ready = c->done = c->keepalive = 0;
  c->active = 1;
  if (c->tls) {
    fb_tls_err_t err;
    if (fb_tls_write(c->tls, data, len, &err) != FB_TLS_OK) fb_hc_fail(c, err.code, "%s", err.msg);
    else if ((rc = flush_tls(c)) != 0) fb_hc_fail(c, uv_err_name(rc), "write failed: %s", uv_strerror(rc));
  } else if ((rc = send_raw(c, data, len, 0)) != 0) {
    fb_hc_fail(c, uv_err_name(rc), "write failed: %s", uv_strerror(rc));
  }
  if (c->err_code) return push_error(L, c->err, c->err_code);
  read_update(c);
  c->waiter = f;
  c->wait = W_HEAD;
  fb_fiber_on_cancel(f, wait_cancel, c);
  return fb_fiber_suspend(L, f, timeout);
}

/* read(conn, timeout) -> chunk | false, reusable (the body is complete) | nil, msg, code. */
static int l_read(lua_State *L) {
  conn_t *c = check_open(L);
  double timeout = opt_timeout(L, 2);
  fb_fiber_t *f;
  int n;
  if (c->waiter) return luaL_error(L, "http: another fiber is reading this response");
  if (!c->head_ready) return luaL_error(L, "http: no response to read");
  if ((n = body_try(c, L)) > 0) return n;
  if (c->closing) return push_error(L, "connection is closed", "closed");
  f = fb_fiber_check(L, "http.read");
  read_update(c);
  c->waiter = f;
  c->wait = W_BODY;
  fb_fiber_on_cancel(f, wait_cancel, c);
  return fb_fiber_suspend(L, f, timeout);
}

static void on_idle_expired(uv_timer_t *t) { conn_close(t->data); }

/* park(conn, idle_seconds): the connection rests in the pool. It no longer keeps the loop
 * alive, keeps reading (to notice a close), and closes itself after idle_seconds. */
static int l_park(lua_State *L) {
  conn_t *c = check_open(L);
  double idle = luaL_checknumber(L, 2);
  if (c->closing) return 0;
  c->parked = 1;
  uv_unref((uv_handle_t *)&c->tcp);
  uv_timer_start(&c->idle, on_idle_expired, (uint64_t)(idle * 1000.0) + 1, 0);
  uv_unref((uv_handle_t *)&c->idle);
  if (c->head.cap > 4096) fb_buf_free(&c->head);   /* idle connections keep small buffers only */
  if (c->body.cap > 4096) fb_buf_free(&c->body);
  return 0;
}

/* unpark(conn) -> true when the parked connection can carry another request. */
static int l_unpark(lua_State *L) {
  conn_t *c = check_open(L);
  int ok = !c->closing && !c->eof && !c->stray && !c->err_code;
  if (ok && c->parked) {
    c->parked = 0;
    uv_ref((uv_handle_t *)&c->tcp);
    uv_timer_stop(&c->idle);
  }
  lua_pushboolean(L, ok);
  return 1;
}

/* close, __gc: idempotent; a waiting fiber resumes with (nil, msg, "closed"). */
static int l_close(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, HC_MT);
  conn_t *c = box->c;
  if (!c) return 0;
  box->c = NULL;
  c->boxed = 0;
  conn_close(c);
  if (c->open_handles == 0) conn_free(c);   /* it closed itself earlier (idle expiry, EOF) */
  return 0;
}

static int l_is_closed(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, HC_MT);
  lua_pushboolean(L, !box->c || box->c->closing);
  return 1;
}

/* live() -> connections with open handles, requests in flight (connects and writes). */
static int l_live(lua_State *L) {
  lua_pushnumber(L, (lua_Number)H.live_handles);
  lua_pushnumber(L, (lua_Number)(H.live_ops + H.live_writes));
  return 2;
}

/* Run by lua_close (fb_sched_on_close): connects and handshakes belong to no
 * userdata, so detach them before their fibers are freed; the loop run after lua_close
 * delivers their callbacks, which then only free. */
static void on_lua_close(void) {
  conn_t *c;
  fb_dial_detach_all(&dial_ops);
  for (c = H.conns; c; c = c->live_next) {
    c->waiter = NULL;
    if (!c->boxed) conn_close(c);
  }
  fb_tls_cleanup();               /* sessions keep their contexts alive by reference */
}

static const luaL_Reg methods[] = {
  { "request", l_request },
  { "read", l_read },
  { "park", l_park },
  { "unpark", l_unpark },
  { "close", l_close },
  { "is_closed", l_is_closed },
  { NULL, NULL }
};

static const luaL_Reg funcs[] = {
  { "connect", l_connect },
  { "live", l_live },
  { NULL, NULL }
};

int luaopen_fibril_core_http_client(lua_State *L) {
  lua_newtable(L);                           /* stack: module */
  luaL_setfuncs(L, funcs, 0);
  lua_newtable(L);                           /* stack: module methods */
  luaL_setfuncs(L, methods, 0);
  if (luaL_newmetatable(L, HC_MT)) {         /* stack: module methods mt */
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_close);
    lua_setfield(L, -2, "__gc");
    fb_sched_on_close(on_lua_close);
  }
  lua_pop(L, 1);
  lua_setfield(L, -2, "methods");
  lua_pushnumber(L, HC_READ_AHEAD);
  lua_setfield(L, -2, "READ_AHEAD");
  lua_pushnumber(L, HC_MAX_HEADERS);
  lua_setfield(L, -2, "MAX_HEADERS");
  return 1;
}
