/* http.c: the HTTP/1.1 server: listening, accepting, parsing requests with llhttp within the
 * configured limits, and handing each complete request to a new fiber as handler(req, res).
 * One request per connection is in flight at a time: parsing pauses at the end of a request
 * and resumes when its response is done, so pipelined responses leave in request order. */
#include "http.h"

#include <ctype.h>
#include <errno.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "error.h"
#include "http_conn.h"
#include "log.h"

#define SERVER_MT "fibril.http.server"
#define READ_CHUNK 65536

/* Strings every request uses, interned once in the table at H.strings_ref: the versions, the
 * empty body, and at S_METHODS + llhttp's method number, that method's name (made on first use). */
enum { S_HTTP10 = 1, S_HTTP11, S_EMPTY, S_METHODS };

/* Each request's fiber runs this with (handler, res, method, path, query, target, version, id,
 * headers, body): the request table is put together by a table constructor the JIT compiles,
 * where a C-built table costs two API calls and a hash insert per field. id is the request id,
 * or for a generated one its counter, kept in _id: req.id is made from it when read
 * (lua/fibril/server.lua, with core.http.id_prefix). */
static const char request_entry[] =
  "return function(handler, res, method, path, query, target, version, id, headers, body)\n"
  "  if query == nil then  -- 8 fields: the table fits 8 hash slots, where 9 take 16\n"
  "    return handler({ method = method, path = path, target = target, version = version,\n"
  "                     _id = id, headers = headers, body = body, _res = res }, res)\n"
  "  end\n"
  "  return handler({ method = method, path = path, query = query, target = target,\n"
  "                   version = version, _id = id, headers = headers, body = body, _res = res }, res)\n"
  "end\n";

static struct {
  lua_State *L;
  uv_loop_t *loop;
  int strings_ref;          /* registry: the interned strings (S_*) */
  int entry_ref;            /* registry: the request fiber's entry function (request_entry) */
  llhttp_settings_t settings;
  uint64_t next_request;
  char id_prefix[9];
  size_t live_conns;
  fb_http_server_t *servers;   /* every server not yet freed, for shutdown */
  int closing;                 /* fb_http_shutdown ran: the Lua state is about to close */
} H;

typedef struct { fb_http_server_t *srv; } server_box_t;

fb_log_limit_t fb_http_warn_limit;

static void parse(fb_http_conn_t *c, const char *data, size_t len);

/* Header span arrays: 1.6 KiB each, needed only while a head is being parsed. A small pool
 * keeps malloc off the per-request path; 10,000 idle connections hold none. */
#define SPAN_POOL 64
static header_span_t *span_pool[SPAN_POOL];
static int span_pool_n;

static header_span_t *spans_get(void) {
  if (span_pool_n > 0) return span_pool[--span_pool_n];
  return malloc(FB_HTTP_MAX_HEADERS * sizeof(header_span_t));
}

static void spans_put(fb_http_conn_t *c) {
  if (!c->headers) return;
  if (span_pool_n < SPAN_POOL) span_pool[span_pool_n++] = c->headers;
  else free(c->headers);
  c->headers = NULL;
  c->nheaders = 0;
}

/* ---- connection lifecycle ------------------------------------------------------------ */

static void on_conn_handle_closed(uv_handle_t *h) {
  fb_http_conn_t *c = h->data;
  if (--c->closes > 0) return;
  fb_buf_free(&c->head);
  fb_buf_free(&c->body);
  fb_buf_free(&c->pending);
  free(c);
  H.live_conns--;
}

static void server_maybe_free(fb_http_server_t *srv);

void fb_http_conn_close(fb_http_conn_t *c) {
  fb_http_server_t *srv = c->srv;
  if (c->closes) return;                     /* closing already (whatever the state says) */
  c->state = CS_CLOSING;
  spans_put(c);
  fb_http_detach_response(c);      /* the handler's res object now reports closed */
  fb_http_token_detach(c);         /* ... and so does its token */
  fb_http_wake_close_waiter(c, "closed");
  if (c->write_waiter) {
    fb_fiber_t *f = c->write_waiter;
    c->write_waiter = NULL;
    lua_pushnil(fb_fiber_thread(f));
    lua_pushliteral(fb_fiber_thread(f), "closed");
    fb_fiber_ready(f, 2);
  }
  if (c->prev) c->prev->next = c->next;
  else srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  c->next = c->prev = NULL;
  srv->nconns--;
  c->closes = 2;
  uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
  server_maybe_free(srv);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  /* One buffer serves every connection: a read is parsed or copied before the next one. */
  static char chunk[READ_CHUNK];
  (void)h;
  (void)suggested;
  buf->base = chunk;
  buf->len = sizeof chunk;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  fb_http_conn_t *c = s->data;
  if (nread == 0) return;
  if (nread < 0) {
    c->peer_eof = 1;
    fb_http_stop_reading(c);
    fb_http_wake_close_waiter(c, "eof");   /* a stream ends when its client leaves */
    if (c->stream_detached) {          /* no fiber watches it: the client left, close now */
      fb_http_conn_close(c);
      return;
    }
    if (c->state != CS_DISPATCHED) fb_http_conn_close(c);
    return;
  }
  if ((size_t)nread == buf->len) fb_http_edge_full_read(c);   /* more may wait: libuv's 32 reads */
  else fb_http_edge_arm(c);
  if (c->state == CS_DISPATCHED) {
    /* Pipelined bytes wait for their turn. Past max_header_bytes of them reading stops (TCP
     * backpressure); pending's max leaves room for the one read that crossed the line. */
    if (fb_buf_append(&c->pending, buf->base, (size_t)nread) != 0) {
      fb_http_conn_close(c);         /* out of memory: nothing sane to answer */
      return;
    }
    if (c->pending.len > c->srv->limits.max_header_bytes) fb_http_stop_reading(c);
    return;
  }
  if (c->state == CS_CLOSING) return;
  parse(c, buf->base, (size_t)nread);
  fb_sched_run_ready();          /* this request's handler now, before the next connection */
}

static void start_reading(fb_http_conn_t *c) {
  if (c->reading || c->peer_eof || c->state == CS_CLOSING) return;
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0) c->reading = 1;
}

/* Every stop goes through here: libuv registers the socket anew when reading starts again,
 * so an edge-triggered registration (http_edge.c) is gone with it. */
void fb_http_stop_reading(fb_http_conn_t *c) {
  uv_read_stop((uv_stream_t *)&c->tcp);
  c->reading = 0;
  fb_http_edge_lost(c);
}

void fb_http_restart_reading(fb_http_conn_t *c) {
  fb_http_stop_reading(c);
  start_reading(c);
}

static void on_connection(uv_stream_t *ls, int status) {
  fb_http_server_t *srv = ls->data;
  fb_http_conn_t *c;
  const char *reason;
  if (status < 0) {
    HTTP_WARN("reason=accept_failed err=%s", uv_strerror(status));
    return;
  }
  c = calloc(1, sizeof *c);
  if (!c) return;                  /* the connection stays in the backlog */
  c->slot = FB_HTTP_NO_SLOT;
  uv_tcp_init(H.loop, &c->tcp);
  if (uv_accept(ls, (uv_stream_t *)&c->tcp) != 0) {
    c->closes = 1;
    c->timer.data = c;
    c->tcp.data = c;
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    H.live_conns++;
    return;
  }
  H.live_conns++;
  uv_tcp_nodelay(&c->tcp, 1);
  uv_timer_init(H.loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->srv = srv;
  c->id = ++srv->next_conn_id;
  c->next = srv->conns;
  if (srv->conns) srv->conns->prev = c;
  srv->conns = c;
  srv->nconns++;
  fb_buf_init(&c->head, srv->limits.max_header_bytes);
  fb_buf_init(&c->body, srv->limits.max_body_bytes);
  fb_buf_init(&c->pending, srv->limits.max_header_bytes + 2 * READ_CHUNK);
  llhttp_init(&c->parser, HTTP_REQUEST, &H.settings);
  c->parser.data = c;
  c->state = CS_IDLE;
  reason = srv->draining ? "draining"
           : srv->nconns > srv->limits.max_connections ? "max_connections"
           : fb_http_token_attach(c) != 0 ? "out_of_connection_slots" : NULL;
  if (reason) {
    HTTP_WARN("conn=%u reason=%s status=503", c->id, reason);
    fb_http_send_error(c, 503);
    return;
  }
  fb_http_arm_timer(c, srv->limits.header_timeout_ms);
  start_reading(c);
}

/* ---- parsing ------------------------------------------------------------------------- */

/* A limit was hit inside an llhttp callback: remember the status, stop the parser. */
static int fail(fb_http_conn_t *c, int status, const char *reason) {
  c->status = status;
  HTTP_WARN("conn=%u reason=%s status=%d", c->id, reason, status);
  return HPE_USER;
}

static int on_message_begin(llhttp_t *p) {
  fb_http_conn_t *c = p->data;
  fb_buf_reset(&c->head);
  fb_buf_reset(&c->body);
  c->url_len = 0;
  c->nheaders = 0;
  c->last_was_value = 0;
  c->expect_continue = 0;
  c->status = 0;
  c->state = CS_HEAD;
  if (c->srv->access_log) c->started_ns = uv_hrtime();   /* only the access log reads it */
  fb_http_arm_timer(c, c->srv->limits.header_timeout_ms);
  return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
  fb_http_conn_t *c = p->data;
  if (len > c->srv->limits.max_url_bytes - c->url_len) return fail(c, 414, "url_too_long");
  if (fb_buf_append(&c->head, at, len) != 0) return fail(c, 431, "header_too_large");
  c->url_len += len;
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  fb_http_conn_t *c = p->data;
  if (c->nheaders == 0 || c->last_was_value) {
    header_span_t *h;
    if (!c->headers && !(c->headers = spans_get())) return fail(c, 503, "out_of_memory");
    if (c->nheaders == FB_HTTP_MAX_HEADERS) return fail(c, 431, "too_many_headers");
    h = &c->headers[c->nheaders++];
    h->name_off = (uint32_t)c->head.len;
    h->name_len = h->value_len = 0;
    h->value_off = 0;
    c->last_was_value = 0;
  }
  if (fb_buf_append(&c->head, at, len) != 0) return fail(c, 431, "header_too_large");
  c->headers[c->nheaders - 1].name_len += (uint32_t)len;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  fb_http_conn_t *c = p->data;
  header_span_t *h;
  if (c->nheaders == 0) return fail(c, 400, "value_without_field");
  h = &c->headers[c->nheaders - 1];
  /* Never a line end inside a value (obs-fold is refused before parsing, see below). */
  if (memchr(at, '\n', len) || memchr(at, '\r', len)) {
    HTTP_WARN("conn=%u reason=bad_request status=400 err=obs_fold", c->id);
    c->status = 400;
    return HPE_USER;
  }
  if (!c->last_was_value) {
    h->value_off = (uint32_t)c->head.len;
    c->last_was_value = 1;
  }
  if (fb_buf_append(&c->head, at, len) != 0) return fail(c, 431, "header_too_large");
  h->value_len += (uint32_t)len;
  return 0;
}

/* llhttp (8.x) takes a bare LF as a line end and unfolds an obs-fold (CRLF then SP or HT) even
 * in strict mode; a front proxy that reads either differently is a smuggling vector, so a head
 * with one is refused. Scans only up to the blank line that ends the head (CRLF CRLF),
 * carrying its state over from the previous read. Returns the reason, or NULL. */
static const char *bad_line_end_in_head(fb_http_conn_t *c, const char *data, size_t len) {
  size_t i;
  for (i = 0; i < len && c->head_scan != 4; i++) {
    char ch;
    if (c->head_scan == 0) {
      /* Outside a line end only the byte before the next LF matters: jump to it. */
      const char *lf = memchr(data + i, '\n', len - i);
      size_t j = lf ? (size_t)(lf - data) : len;
      if (j >= i + 2) {
        c->scan_prev = data[j - 2];
        i = j - 1;
      }
    }
    ch = data[i];
    if (ch == '\n' && c->scan_prev != '\r') return "bare_lf";
    if ((ch == ' ' || ch == '\t') && c->head_scan == 2) return "obs_fold";
    /* head_scan counts the bytes of CR LF CR LF seen so far */
    if (ch == (c->head_scan % 2 == 0 ? '\r' : '\n')) c->head_scan++;
    else c->head_scan = ch == '\r' ? 1 : 0;
    c->scan_prev = ch;
  }
  return NULL;
}

static int header_is(fb_http_conn_t *c, header_span_t *h, const char *name) {
  size_t n = strlen(name);
  return h->name_len == n && strncasecmp(c->head.data + h->name_off, name, n) == 0;
}

/* listen{ required_header, required_value }: whether the request carries it (the last one
 * of that name), compared in time that depends on the length only. */
static int has_required_header(fb_http_conn_t *c) {
  fb_http_server_t *srv = c->srv;
  header_span_t *found = NULL;
  const unsigned char *v;
  unsigned diff = 0;
  size_t k;
  int i;
  for (i = 0; i < c->nheaders; i++)
    if (header_is(c, &c->headers[i], srv->required_name)) found = &c->headers[i];
  if (!found || found->value_len != srv->required_value_len) return 0;
  v = (const unsigned char *)c->head.data + found->value_off;
  for (k = 0; k < srv->required_value_len; k++) diff |= v[k] ^ (unsigned char)srv->required_value[k];
  return diff == 0;
}

static int on_headers_complete(llhttp_t *p) {
  fb_http_conn_t *c = p->data;
  fb_http_limits_t *lim = &c->srv->limits;
  int i, has_body = (p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > lim->max_body_bytes)
    return fail(c, 413, "body_too_large");
  {
    const char *m = llhttp_method_name((llhttp_method_t)p->method);
    size_t mlen = strlen(m);
    if (mlen >= sizeof c->method) mlen = sizeof c->method - 1;
    memcpy(c->method, m, mlen);
    c->method[mlen] = '\0';
    c->method_id = (uint8_t)p->method;
  }
  c->http10 = p->http_major == 1 && p->http_minor == 0;
  c->head_only = p->method == HTTP_HEAD;
  if (c->srv->required_name && !has_required_header(c)) {
    c->srv->refused++;               /* refused before any body byte is read */
    return fail(c, 403, "forbidden");
  }
  for (i = 0; i < c->nheaders; i++) {
    header_span_t *h = &c->headers[i];
    if (header_is(c, h, "expect")) {
      if (h->value_len == 12 && strncasecmp(c->head.data + h->value_off, "100-continue", 12) == 0)
        c->expect_continue = 1;
      else
        return fail(c, 417, "bad_expect");
    }
  }
  if (has_body) {
    if (c->expect_continue && !c->http10) {
      static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
      if (fb_http_write(c, cont, sizeof cont - 1, NULL, 0) != 0)
        return HPE_USER;                     /* the connection is closing: parse no further */
    }
    c->state = CS_BODY;
    c->body_due = lim->body_deadline_ms ? uv_now(H.loop) + lim->body_deadline_ms : 0;
    fb_http_arm_body_timer(c);
  }
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  fb_http_conn_t *c = p->data;
  if (c->closes) return HPE_USER;
  if (fb_buf_append(&c->body, at, len) != 0) return fail(c, 413, "body_too_large");
  fb_http_arm_body_timer(c);        /* idle time, so re-armed per chunk */
  return 0;
}

/* Request ids: X-Request-Id when it is short and plain, else a process prefix + counter.
 * Returns the counter for a generated id (Lua makes the same string only if it reads req.id:
 * one string fewer per request), 0 for an honoured one. */
static uint64_t set_request_id(fb_http_conn_t *c) {
  int i;
  for (i = 0; i < c->nheaders; i++) {
    header_span_t *h = &c->headers[i];
    if (header_is(c, h, "x-request-id") && h->value_len > 0 && h->value_len < sizeof c->request_id) {
      const char *v = c->head.data + h->value_off;
      uint32_t k;
      for (k = 0; k < h->value_len; k++)
        if (!(isalnum((unsigned char)v[k]) || v[k] == '-' || v[k] == '_' || v[k] == '.')) break;
      if (k == h->value_len) {
        memcpy(c->request_id, v, k);
        c->request_id[k] = '\0';
        c->request_id_len = k;
        return 0;
      }
    }
  }
  {
    static const char hex[] = "0123456789abcdef";
    uint64_t id = ++H.next_request, n = id;
    int k;
    memcpy(c->request_id, H.id_prefix, 8);
    for (k = 15; k >= 8; k--, n >>= 4) c->request_id[k] = hex[n & 15];   /* its low 32 bits */
    c->request_id[16] = '\0';
    c->request_id_len = 16;
    return id;
  }
}

/* A request fiber of a tokens server ended: if its request is still current and no response
 * object was made for it (that one's __gc decides), nothing can answer it any more. The
 * framework's handler always answers; this is for a failure in the framework itself. */
static void request_fiber_done(uint64_t token) {
  fb_http_conn_t *c = fb_http_token_conn(token);
  if (!c || c->res_box) return;
  fb_log(FB_ERROR, "http", "conn=%u req=%s reason=handler_ended_without_response", c->id,
         c->request_id);
  if (c->head_sent) fb_http_conn_close(c);
  else fb_http_send_error(c, 500);
}

/* Spawns handler(req, res) in a new fiber: req is a table request_entry makes, res a response
 * userdata, or for a tokens server the request's token (http_token.c). */
static void dispatch(fb_http_conn_t *c) {
  lua_State *L = H.L;
  const char *url = c->head.data, *q;
  size_t path_len;
  int i, strings;
  fb_fiber_t *f;
  uint64_t token = 0, id_number;

  id_number = set_request_id(c);
  q = memchr(url, '?', c->url_len);
  path_len = q ? (size_t)(q - url) : c->url_len;
  if (c->srv->access_log) {
    size_t n = path_len < sizeof c->path_log - 1 ? path_len : sizeof c->path_log - 1;
    memcpy(c->path_log, url, n);
    c->path_log[n] = '\0';
  }
  /* Upgrades (WebSocket, h2c) are not served: answered as plain HTTP, then closed, since what
   * follows on the connection would not be HTTP. */
  c->keep_alive = llhttp_should_keep_alive(&c->parser) && !llhttp_get_upgrade(&c->parser);
  c->chunked = c->head_sent = c->res_done = c->stream_detached = 0;
  c->bytes_sent = 0;
  c->content_length = -1;
  c->status = 0;

  lua_rawgeti(L, LUA_REGISTRYINDEX, H.strings_ref);  /* stack: strings */
  strings = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, H.entry_ref);
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->srv->handler_ref);
  if (c->srv->tokens) lua_pushnumber(L, (lua_Number)(token = fb_http_token_begin(c)));
  else fb_http_push_response(L, c);          /* stack: strings entry handler res */
  lua_rawgeti(L, strings, S_METHODS + c->method_id);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushstring(L, c->method);
    lua_pushvalue(L, -1);
    lua_rawseti(L, strings, S_METHODS + c->method_id);
  }
  lua_pushlstring(L, url, path_len);         /* path */
  if (q) {
    lua_pushlstring(L, q + 1, c->url_len - path_len - 1);
    lua_pushlstring(L, url, c->url_len);     /* target */
  } else {
    lua_pushnil(L);
    lua_pushvalue(L, -2);                    /* target: the path again, no second lookup */
  }
  lua_rawgeti(L, strings, c->http10 ? S_HTTP10 : S_HTTP11);
  if (id_number) lua_pushnumber(L, (lua_Number)id_number);   /* < 2^53: exact */
  else lua_pushlstring(L, c->request_id, c->request_id_len);
  lua_createtable(L, 0, c->nheaders);        /* stack: ... headers */
  for (i = 0; i < c->nheaders; i++) {
    header_span_t *h = &c->headers[i];
    char *name = c->head.data + h->name_off;
    uint32_t k;
    for (k = 0; k < h->name_len; k++) name[k] = (char)tolower((unsigned char)name[k]);
    lua_pushlstring(L, name, h->name_len);
    lua_pushvalue(L, -1);
    lua_rawget(L, -3);                       /* stack: ... headers name previous */
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushlstring(L, c->head.data + h->value_off, h->value_len);
    } else {                                 /* repeated header: join, as RFC 9110 allows */
      lua_pushstring(L, h->name_len == 6 && memcmp(name, "cookie", 6) == 0 ? "; " : ", ");
      lua_pushlstring(L, c->head.data + h->value_off, h->value_len);
      lua_concat(L, 3);
    }
    lua_rawset(L, -3);
  }
  if (c->body.len) lua_pushlstring(L, c->body.data, c->body.len);
  else lua_rawgeti(L, strings, S_EMPTY);
  f = fb_fiber_start(L, 10);
  if (token) fb_fiber_on_done(f, request_fiber_done, token);
  lua_settop(L, strings - 1);                /* the strings */
  spans_put(c);
  if (c->body.cap > 65536) fb_buf_free(&c->body);   /* do not keep a big body per connection */
}

static int on_message_complete(llhttp_t *p) {
  fb_http_conn_t *c = p->data;
  if (c->closes) return HPE_USER;            /* never dispatch on a closing connection */
  c->state = CS_DISPATCHED;
  fb_http_arm_timer(c, 0);
  dispatch(c);
  return HPE_PAUSED;                         /* the next request waits for this response */
}

static void parse(fb_http_conn_t *c, const char *data, size_t len) {
  llhttp_errno_t err;
  if (c->state == CS_IDLE) {
    c->head_scan = 0;
    c->scan_prev = '\n';            /* a request may start right away */
  }
  if (c->state == CS_IDLE || c->state == CS_HEAD) {
    const char *bad = bad_line_end_in_head(c, data, len);
    if (bad) {
      HTTP_WARN("conn=%u reason=bad_request status=400 err=%s", c->id, bad);
      fb_http_send_error(c, 400);
      return;
    }
  }
  err = llhttp_execute(&c->parser, data, len);
  if (c->closes) return;                     /* a callback's write failed: nothing more to do */
  if (err == HPE_OK) return;
  if (err == HPE_PAUSED_UPGRADE) {    /* see dispatch(): closed after the response */
    if (c->state != CS_DISPATCHED) fb_http_conn_close(c);
    return;
  }
  if (err == HPE_PAUSED) {
    const char *pos = llhttp_get_error_pos(&c->parser);
    size_t used = pos ? (size_t)(pos - data) : len;
    if (used < len && fb_buf_append(&c->pending, data + used, len - used) != 0) {
      HTTP_WARN("conn=%u reason=pipeline_limit status=431", c->id);
      c->keep_alive = 0;             /* answer what we have, then close */
    }
    return;
  }
  if (c->status) {                   /* a limit hit in one of our callbacks */
    fb_http_send_error(c, c->status);
    return;
  }
  HTTP_WARN("conn=%u reason=bad_request status=400 err=%s", c->id,
         llhttp_errno_name(err));
  fb_http_send_error(c, 400);
}

void fb_http_request_done(fb_http_conn_t *c) {
  fb_buf_t pending;
  if (c->srv->access_log) fb_http_access_log(c);
  c->status = 0;                     /* parse() reads a non-zero status as "a limit was hit" */
  fb_http_detach_response(c);
  c->token = 0;
  if (!c->keep_alive || c->srv->draining || (c->peer_eof && c->pending.len == 0)) {
    c->state = CS_CLOSING;           /* closed once the response has left (http_write.c) */
    if (c->write_queued == 0) fb_http_conn_close(c);
    else fb_http_write_progress(c);  /* ... or when the client stops reading it */
    return;
  }
  c->state = CS_IDLE;
  fb_http_write_progress(c);         /* keep-alive timer, or send timer while bytes wait */
  llhttp_resume(&c->parser);
  if (c->pending.len) {
    /* Parse what arrived meanwhile; parse() may pause again and keep a new remainder. */
    pending = c->pending;
    fb_buf_init(&c->pending, pending.max);
    parse(c, pending.data, pending.len);
    fb_buf_free(&pending);
  }
  if (c->peer_eof && (c->state == CS_IDLE || c->state == CS_HEAD || c->state == CS_BODY)) {
    fb_http_conn_close(c);           /* the client left; nothing complete is left to answer */
    return;
  }
  start_reading(c);
}

/* ---- the server object --------------------------------------------------------------- */

static void on_server_closed(uv_handle_t *h) {
  fb_http_server_t *srv = h->data;
  srv->listening = -1;               /* closed; freed when its last connection goes */
  server_maybe_free(srv);
}

static void server_maybe_free(fb_http_server_t *srv) {
  if (srv->listening != -1 || srv->nconns > 0) return;
  if (srv->box) ((server_box_t *)srv->box)->srv = NULL;
  /* After shutdown the Lua state is closed or closing: its registry goes with it. */
  if (srv->handler_ref != LUA_NOREF && !H.closing) luaL_unref(H.L, LUA_REGISTRYINDEX, srv->handler_ref);
  if (srv->prev_srv) srv->prev_srv->next_srv = srv->next_srv;
  else H.servers = srv->next_srv;
  if (srv->next_srv) srv->next_srv->prev_srv = srv->prev_srv;
  free(srv->required_name);
  free(srv->required_value);
  free(srv);
}

/* Stops accepting; idle connections close now, busy ones after their response. */
static void server_close(fb_http_server_t *srv) {
  fb_http_conn_t *c, *next;
  if (srv->draining) return;
  srv->draining = 1;
  for (c = srv->conns; c; c = next) {
    next = c->next;
    if (c->state == CS_IDLE) fb_http_conn_close(c);
  }
  if (srv->listening == 1) {
    srv->listening = 0;
    uv_close((uv_handle_t *)&srv->tcp, on_server_closed);
  }
}

static fb_http_server_t *check_server(lua_State *L) {
  server_box_t *b = luaL_checkudata(L, 1, SERVER_MT);
  if (!b->srv) luaL_error(L, "http: server is closed");
  return b->srv;
}

/* connections() stays valid while a closed server drains; 0 once it is gone. */
/* server:refused(): requests answered 403 for a missing or wrong required_header. */
static int l_server_refused(lua_State *L) {
  server_box_t *b = luaL_checkudata(L, 1, SERVER_MT);
  lua_pushnumber(L, b->srv ? (lua_Number)b->srv->refused : 0);
  return 1;
}

static int l_server_connections(lua_State *L) {
  server_box_t *b = luaL_checkudata(L, 1, SERVER_MT);
  lua_pushinteger(L, b->srv ? (lua_Integer)b->srv->nconns : 0);
  return 1;
}

static int l_server_gc(lua_State *L) {
  server_box_t *b = luaL_checkudata(L, 1, SERVER_MT);
  if (b->srv) {
    b->srv->box = NULL;
    server_close(b->srv);
    b->srv = NULL;
  }
  return 0;
}

static size_t opt_size(lua_State *L, int t, const char *key, size_t dflt) {
  size_t v;
  lua_getfield(L, t, key);
  v = lua_isnumber(L, -1) ? (size_t)lua_tonumber(L, -1) : dflt;
  lua_pop(L, 1);
  return v;
}

/* listen{ host, port, handler, reuseport, backlog, access_log, <limits in bytes/seconds> }
 * -> server | nil, message */
/* Copies listen{ required_header, required_value } into srv; -1 when they are not both
 * non-empty strings (or both absent). */
static int set_required_header(lua_State *L, fb_http_server_t *srv) {
  size_t nlen = 0, vlen = 0, k;
  const char *name, *value;
  lua_getfield(L, 1, "required_header");
  lua_getfield(L, 1, "required_value");
  if (lua_isnil(L, -2) && lua_isnil(L, -1)) {
    lua_pop(L, 2);
    return 0;
  }
  name = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &nlen) : NULL;
  value = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &vlen) : NULL;
  if (!name || !value || nlen == 0 || vlen == 0) {
    lua_pop(L, 2);
    return -1;
  }
  srv->required_name = malloc(nlen + 1);
  srv->required_value = malloc(vlen);
  if (!srv->required_name || !srv->required_value) {
    free(srv->required_value);
    srv->required_value = NULL;
    lua_pop(L, 2);
    return -1;
  }
  for (k = 0; k < nlen; k++) srv->required_name[k] = (char)tolower((unsigned char)name[k]);
  srv->required_name[nlen] = '\0';
  memcpy(srv->required_value, value, vlen);
  srv->required_value_len = vlen;
  lua_pop(L, 2);
  return 0;
}

static int l_listen(lua_State *L) {
  struct sockaddr_storage addr;
  fb_http_server_t *srv;
  server_box_t *box;
  const char *host;
  int port, r, fd;
  char where[128];

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "host");
  host = luaL_optstring(L, -1, "127.0.0.1");
  lua_pop(L, 1);                             /* host stays valid: the table holds it */
  port = (int)opt_size(L, 1, "port", 3000);
  snprintf(where, sizeof where, strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "http: bad host '%s' (give an IPv4 or IPv6 address)", host);
    return 2;
  }
  lua_getfield(L, 1, "handler");
  luaL_argcheck(L, lua_isfunction(L, -1), 1, "handler must be a function");
  srv = calloc(1, sizeof *srv);
  if (!srv) return luaL_error(L, "http: out of memory");
  srv->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  srv->limits.max_header_bytes = opt_size(L, 1, "max_header_bytes", 16384);
  srv->limits.max_body_bytes = opt_size(L, 1, "max_body_bytes", 1048576);
  srv->limits.max_url_bytes = opt_size(L, 1, "max_url_bytes", 8192);
  srv->limits.write_high_water = opt_size(L, 1, "write_high_water", 262144);
  srv->limits.max_connections = (unsigned)opt_size(L, 1, "max_connections", 10000);
  lua_getfield(L, 1, "header_timeout");
  srv->limits.header_timeout_ms = (uint64_t)(luaL_optnumber(L, -1, 10) * 1000);
  lua_getfield(L, 1, "body_timeout");
  srv->limits.body_timeout_ms = (uint64_t)(luaL_optnumber(L, -1, 30) * 1000);
  lua_getfield(L, 1, "body_deadline");
  srv->limits.body_deadline_ms = (uint64_t)(luaL_optnumber(L, -1, 60) * 1000);
  lua_getfield(L, 1, "keepalive_timeout");
  srv->limits.keepalive_timeout_ms = (uint64_t)(luaL_optnumber(L, -1, 5) * 1000);
  lua_getfield(L, 1, "send_timeout");
  srv->limits.send_timeout_ms = (uint64_t)(luaL_optnumber(L, -1, 30) * 1000);
  lua_pop(L, 5);
  lua_getfield(L, 1, "access_log");
  srv->access_log = lua_isnil(L, -1) ? 1 : lua_toboolean(L, -1);
  lua_getfield(L, 1, "tokens");
  srv->tokens = lua_toboolean(L, -1);
  lua_pop(L, 2);
  if (set_required_header(L, srv) != 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, srv->handler_ref);
    free(srv->required_name);
    free(srv);
    return luaL_error(L, "http: required_header and required_value: two non-empty strings "
                         "(a header name and its value), or neither");
  }

  uv_tcp_init_ex(H.loop, &srv->tcp, addr.ss_family);
  srv->tcp.data = srv;
  lua_getfield(L, 1, "reuseport");
  if (lua_toboolean(L, -1) && uv_fileno((uv_handle_t *)&srv->tcp, &fd) == 0) {
    int one = 1;                     /* workers share the port: the kernel spreads accepts */
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  }
  lua_pop(L, 1);
  r = uv_tcp_bind(&srv->tcp, (struct sockaddr *)&addr, 0);
  if (r == 0) r = uv_listen((uv_stream_t *)&srv->tcp, (int)opt_size(L, 1, "backlog", 511),
                            on_connection);
  if (r != 0) {
    srv->listening = 0;
    srv->next_srv = H.servers;       /* linked like any other until its close callback */
    if (H.servers) H.servers->prev_srv = srv;
    H.servers = srv;
    uv_close((uv_handle_t *)&srv->tcp, on_server_closed);
    lua_pushnil(L);
    lua_pushfstring(L, "http: cannot listen on %s: %s", where,
                    r == UV_EADDRINUSE ? "address already in use" : uv_strerror(r));
    return 2;
  }
  srv->listening = 1;
  srv->next_srv = H.servers;
  if (H.servers) H.servers->prev_srv = srv;
  H.servers = srv;
  box = lua_newuserdata(L, sizeof *box);
  box->srv = srv;
  srv->box = box;
  luaL_getmetatable(L, SERVER_MT);
  lua_setmetatable(L, -2);
  return 1;
}

static int l_server_port(lua_State *L) {
  fb_http_server_t *srv = check_server(L);
  struct sockaddr_storage a;
  int n = sizeof a;
  if (uv_tcp_getsockname(&srv->tcp, (struct sockaddr *)&a, &n) != 0) return 0;
  lua_pushinteger(L, ntohs(a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port
                                                   : ((struct sockaddr_in *)&a)->sin_port));
  return 1;
}

static int l_server_close(lua_State *L) {
  server_box_t *b = luaL_checkudata(L, 1, SERVER_MT);
  if (b->srv) server_close(b->srv);
  return 0;
}

static int l_live(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)H.live_conns);
  return 1;
}

static const luaL_Reg server_methods[] = {
  { "port", l_server_port },
  { "connections", l_server_connections },
  { "refused", l_server_refused },
  { "close", l_server_close },
  { NULL, NULL }
};

int luaopen_fibril_core_http(lua_State *L) {
  static const luaL_Reg funcs[] = {
    { "listen", l_listen }, { "live", l_live }, { "head_lines", fb_http_l_head_lines },
    { "send", fb_http_l_send }, { "response", fb_http_l_response }, { "remote", fb_http_l_remote },
    { NULL, NULL }
  };
  if (luaL_newmetatable(L, SERVER_MT)) {
    lua_newtable(L);
    luaL_setfuncs(L, server_methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_server_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  luaopen_fibril_core_http_response(L);
  lua_setfield(L, -2, "response_mt");
  lua_pushstring(L, H.id_prefix);            /* generated request ids: prefix + 8 hex digits */
  lua_setfield(L, -2, "id_prefix");
  return 1;
}

/* Before lua_close: every server stops listening and every connection closes now, while the
 * response objects they point to still exist. A server whose listener is already closed may be
 * freed by its last connection's close: nothing reads it after that. */
void fb_http_shutdown(void) {
  fb_http_server_t *srv, *next;
  H.closing = 1;
  for (srv = H.servers; srv; srv = next) {
    fb_http_conn_t *c, *cn;
    next = srv->next_srv;
    if (srv->box) {
      ((server_box_t *)srv->box)->srv = NULL;
      srv->box = NULL;
    }
    server_close(srv);               /* listening until its close callback: not freed here */
    for (c = srv->conns; c; c = cn) {
      cn = c->next;
      fb_http_conn_close(c);
    }
  }
  while (span_pool_n > 0) free(span_pool[--span_pool_n]);   /* after the closes returned theirs */
  fb_http_write_shutdown();
  fb_http_token_shutdown();
}

void fb_http_init(lua_State *L, uv_loop_t *loop) {
  H.L = L;
  H.loop = loop;
  llhttp_settings_init(&H.settings);
  H.settings.on_message_begin = on_message_begin;
  H.settings.on_url = on_url;
  H.settings.on_header_field = on_header_field;
  H.settings.on_header_value = on_header_value;
  H.settings.on_headers_complete = on_headers_complete;
  H.settings.on_body = on_body;
  H.settings.on_message_complete = on_message_complete;
  lua_createtable(L, S_METHODS + 48, 0);
  lua_pushliteral(L, "1.0");
  lua_rawseti(L, -2, S_HTTP10);
  lua_pushliteral(L, "1.1");
  lua_rawseti(L, -2, S_HTTP11);
  lua_pushliteral(L, "");
  lua_rawseti(L, -2, S_EMPTY);
  H.strings_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (luaL_loadbuffer(L, request_entry, sizeof request_entry - 1, "=fibril.http.request") != 0)
    lua_error(L);                            /* a bug in the chunk above */
  lua_call(L, 0, 1);
  H.entry_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  snprintf(H.id_prefix, sizeof H.id_prefix, "%08x",
           (unsigned)(uv_hrtime() ^ (uint64_t)uv_os_getpid() << 16));
  fb_http_write_init(loop);
}
