/* http_request.c: one request on a connection: llhttp's callbacks within the server's limits
 * (head and body sizes, URL length, smuggling vectors), the request id, and the handing over
 * of a complete request to a new fiber as handler(req, res) (dispatch). The connection and
 * the server around it are http.c's; the response, http_write.c's. */
#include <ctype.h>
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http_conn.h"
#include "log.h"

/* Strings every request uses, interned once in the table at R.strings_ref: the versions, the
 * empty body, and at S_METHODS + llhttp's method number, that method's name (made on first use). */
enum { S_HTTP10 = 1, S_HTTP11, S_EMPTY, S_METHODS };

/* Each request's fiber runs this with (handler, res, method, path, query, target, version, id,
 * headers, body): the request table is put together by a table constructor the JIT compiles,
 * where a C-built table costs two API calls and a hash insert per field. id is the request id,
 * or for a generated one its counter, kept in _id: req.id is made from it when read
 * (lua/fibril/server.lua, with core.http.id_string). */
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
  int strings_ref;          /* registry: the interned strings (S_*) */
  int entry_ref;            /* registry: the request fiber's entry function (request_entry) */
  llhttp_settings_t settings;
  uint64_t next_request;
  char id_prefix[9];
} R;

/* Header span arrays: 1.6 KiB each, needed only while a head is being parsed. A small pool
 * keeps malloc off the per-request path; 10,000 idle connections hold none. */
#define SPAN_POOL 64
static header_span_t *span_pool[SPAN_POOL];
static int span_pool_n;

static header_span_t *spans_get(void) {
  if (span_pool_n > 0) return span_pool[--span_pool_n];
  return malloc(FB_HTTP_MAX_HEADERS * sizeof(header_span_t));
}

void fb_http_spans_put(fb_http_conn_t *c) {
  if (!c->headers) return;
  if (span_pool_n < SPAN_POOL) span_pool[span_pool_n++] = c->headers;
  else free(c->headers);
  c->headers = NULL;
  c->nheaders = 0;
}

void fb_http_spans_free(void) {
  while (span_pool_n > 0) free(span_pool[--span_pool_n]);
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
    c->body_due = lim->body_deadline_ms ? uv_now(c->tcp.loop) + lim->body_deadline_ms : 0;
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

/* A generated request id: the process prefix and the low 32 bits of its counter in hex, 16
 * characters; out has room for 17. */
static size_t format_id(char *out, uint64_t n) {
  static const char hex[] = "0123456789abcdef";
  int k;
  memcpy(out, R.id_prefix, 8);
  for (k = 15; k >= 8; k--, n >>= 4) out[k] = hex[n & 15];
  out[16] = '\0';
  return 16;
}

/* Request ids: X-Request-Id when it is short and plain, else a process prefix + counter.
 * Returns the counter for a generated id (Lua makes the same string, core.http.id_string,
 * only if it reads req.id or logs a line: one string fewer per request), 0 for an honoured
 * one. */
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
  c->request_id_len = format_id(c->request_id, ++R.next_request);
  return R.next_request;
}

/* core.http.id_string(n) -> the request id generated with counter n (req._id). */
int fb_http_l_id_string(lua_State *L) {
  char id[17];
  lua_Number n = luaL_checknumber(L, 1);
  if (!(n >= 1 && n <= 9007199254740992.0)) return luaL_argerror(L, 1, "a request id counter");
  lua_pushlstring(L, id, format_id(id, (uint64_t)n));
  return 1;
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
  lua_State *L = R.L;
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

  lua_rawgeti(L, LUA_REGISTRYINDEX, R.strings_ref);  /* stack: strings */
  strings = lua_gettop(L);
  lua_rawgeti(L, LUA_REGISTRYINDEX, R.entry_ref);
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
  fb_http_spans_put(c);
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

void fb_http_parse(fb_http_conn_t *c, const char *data, size_t len) {
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

void fb_http_parser_init(fb_http_conn_t *c) {
  llhttp_init(&c->parser, HTTP_REQUEST, &R.settings);
  c->parser.data = c;
}

void fb_http_request_init(lua_State *L) {
  R.L = L;
  llhttp_settings_init(&R.settings);
  R.settings.on_message_begin = on_message_begin;
  R.settings.on_url = on_url;
  R.settings.on_header_field = on_header_field;
  R.settings.on_header_value = on_header_value;
  R.settings.on_headers_complete = on_headers_complete;
  R.settings.on_body = on_body;
  R.settings.on_message_complete = on_message_complete;
  lua_createtable(L, S_METHODS + 48, 0);
  lua_pushliteral(L, "1.0");
  lua_rawseti(L, -2, S_HTTP10);
  lua_pushliteral(L, "1.1");
  lua_rawseti(L, -2, S_HTTP11);
  lua_pushliteral(L, "");
  lua_rawseti(L, -2, S_EMPTY);
  R.strings_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (luaL_loadbuffer(L, request_entry, sizeof request_entry - 1, "=fibril.http.request") != 0)
    lua_error(L);                            /* a bug in the chunk above */
  lua_call(L, 0, 1);
  R.entry_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  snprintf(R.id_prefix, sizeof R.id_prefix, "%08x",
           (unsigned)(uv_hrtime() ^ (uint64_t)uv_os_getpid() << 16));
}
