/* http_write.c: HTTP responses: the head, whole and chunked bodies, error responses, write
 * backpressure (a writer suspends while more than write_high_water bytes are unsent) and the
 * access log. Writes try the socket first and copy only what the kernel did not take. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "buf.h"
#include "error.h"
#include "http_conn.h"
#include "log.h"

#define RES_MT "fibril.http.response"

#define RES_MAGIC 0x72657370u        /* "resp": tells a response box from other userdata */
typedef struct { unsigned magic; fb_http_conn_t *c; } res_box_t;

typedef struct {
  uv_write_t req;
  fb_http_conn_t *c;
  size_t len;
  char data[];          /* the unwritten bytes; freed in on_written, even on error */
} write_req_t;

static struct {
  uv_loop_t *loop;
  char date[64];        /* "Date: ...\r\n", rebuilt once per second */
  size_t date_len;
  time_t date_at;
  char log_ts[32];      /* "2026-11-25T10:04:05", rebuilt once per second */
  time_t log_ts_at;
  int res_mt_ref;       /* response metatable with __gc (a response still open) */
  int res_done_mt_ref;  /* the same without __gc: set once the response is done, so most
                           response objects are collected without a finalizer call */
  char log[65536];      /* access log lines not yet written to stdout */
  size_t log_len;
  uv_timer_t log_timer;  /* flushes the access log; started with the first line */
  int log_timer_on;
} W;

const char *fb_http_reason(int status) {
  switch (status) {
  case 100: return "Continue";
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 204: return "No Content";
  case 206: return "Partial Content";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 303: return "See Other";
  case 304: return "Not Modified";
  case 307: return "Temporary Redirect";
  case 308: return "Permanent Redirect";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 406: return "Not Acceptable";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 410: return "Gone";
  case 411: return "Length Required";
  case 412: return "Precondition Failed";
  case 413: return "Content Too Large";
  case 414: return "URI Too Long";
  case 415: return "Unsupported Media Type";
  case 416: return "Range Not Satisfiable";
  case 417: return "Expectation Failed";
  case 422: return "Unprocessable Content";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  default: return "Unknown";
  }
}

static const char *date_header(void) {
  time_t now = time(NULL);
  if (now != W.date_at) {
    struct tm tm;
    gmtime_r(&now, &tm);
    W.date_len = strftime(W.date, sizeof W.date, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
    W.date_at = now;
  }
  return W.date;
}

/* ---- writing ------------------------------------------------------------------------- */

static void on_written(uv_write_t *req, int status) {
  write_req_t *w = (write_req_t *)req;
  fb_http_conn_t *c = w->c;
  c->write_queued -= w->len;
  free(w);
  fb_http_edge_lost(c);              /* libuv stops watching for writability when it drains */
  if (status < 0) {
    fb_http_conn_close(c);
    return;
  }
  if (c->write_waiter && c->write_queued <= c->srv->limits.write_high_water / 2) {
    fb_fiber_t *f = c->write_waiter;
    c->write_waiter = NULL;
    lua_pushboolean(fb_fiber_thread(f), 1);
    fb_fiber_ready(f, 1);
  }
  if (c->state == CS_CLOSING && c->write_queued == 0) fb_http_conn_close(c);
  else fb_http_write_progress(c);    /* the client read some: it gets send_timeout again */
}

/* Writes bufs in order: straight to the socket when it takes them, the rest copied into one
 * queued write. Returns 0, or -1 when the connection is closing or out of memory. */
static int writev_bufs(fb_http_conn_t *c, uv_buf_t *bufs, int n) {
  size_t total = 0, done = 0, off = 0;
  write_req_t *w;
  int i, r;
  if (c->closes) return -1;
  for (i = 0; i < n; i++) total += bufs[i].len;
  if (total == 0) return 0;
  r = uv_try_write((uv_stream_t *)&c->tcp, bufs, (unsigned)n);
  if (r > 0) done = (size_t)r;
  else if (r != UV_EAGAIN && r != UV_ENOSYS) {
    fb_http_conn_close(c);
    return -1;
  }
  if (done == total) return 0;
  w = malloc(sizeof *w + (total - done));
  if (!w) {
    fb_http_conn_close(c);
    return -1;
  }
  for (i = 0; i < n; i++) {          /* copy what the kernel did not take */
    size_t len = bufs[i].len, skip = done > len ? len : done;
    done -= skip;
    memcpy(w->data + off, bufs[i].base + skip, len - skip);
    off += len - skip;
  }
  w->c = c;
  w->len = off;
  c->write_queued += off;
  fb_http_edge_lost(c);              /* libuv watches for writability: a registration of its own */
  uv_buf_t b = uv_buf_init(w->data, (unsigned)off);
  if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
    c->write_queued -= off;
    free(w);
    fb_http_conn_close(c);
    return -1;
  }
  fb_http_write_progress(c);         /* bytes wait for the client: the send timeout runs */
  return 0;
}

int fb_http_write(fb_http_conn_t *c, const char *p1, size_t n1, const char *p2, size_t n2) {
  uv_buf_t b[2];
  b[0] = uv_buf_init((char *)p1, (unsigned)n1);
  b[1] = uv_buf_init((char *)(p2 ? p2 : ""), (unsigned)n2);
  return writev_bufs(c, b, p2 ? 2 : 1);
}

void fb_http_send_error(fb_http_conn_t *c, int status) {
  char head[512];
  const char *reason = fb_http_reason(status);
  int n = snprintf(head, sizeof head,
                   "HTTP/1.1 %d %s\r\n%sContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                   "Connection: close\r\n\r\n%s\n",
                   status, reason, date_header(), strlen(reason) + 1, reason);
  fb_http_stop_reading(c);
  fb_http_arm_timer(c, 0);
  c->status = status;
  c->state = CS_CLOSING;
  if (fb_http_write(c, head, (size_t)n, NULL, 0) == 0 && c->write_queued == 0)
    fb_http_conn_close(c);
}

/* ---- the response head --------------------------------------------------------------- */

static int valid_header_text(const char *s, size_t n, int is_name) {
  size_t i;
  if (is_name && n == 0) return 0;
  for (i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '\r' || ch == '\n' || ch == 0) return 0;
    if (is_name && (ch <= ' ' || ch == ':' || ch >= 0x7f)) return 0;
  }
  return 1;
}

/* Response heads are built here, in C memory: no Lua string per response. Reset for each
 * head; the write path copies whatever the socket does not take at once. */
static fb_buf_t scratch = { NULL, 0, 0, 1 << 20 };

#define ADD_LIT(s) fb_buf_append(&scratch, s, sizeof(s) - 1)

/* Appends the decimal digits of v. */
static void add_uint(uint64_t v) {
  char digits[24], *p = digits + sizeof digits;
  do {
    *--p = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  fb_buf_append(&scratch, p, (size_t)(digits + sizeof digits - p));
}

/* Appends the header at -2 (name) / vidx (value); returns 1 for "Connection: close", which
 * is not written but ends the connection after the response. */
static int add_header(lua_State *L, int vidx) {
  size_t nlen, vlen;
  const char *name = lua_tolstring(L, -2, &nlen), *value;
  if (lua_type(L, -2) != LUA_TSTRING || !valid_header_text(name, nlen, 1))
    luaL_error(L, "http: invalid response header name");
  /* Framing is the server's: these are computed, never taken from the app. */
  if ((nlen == 14 && strncasecmp(name, "content-length", 14) == 0) ||
      (nlen == 17 && strncasecmp(name, "transfer-encoding", 17) == 0))
    return 0;
  if (lua_type(L, vidx) != LUA_TSTRING && lua_type(L, vidx) != LUA_TNUMBER)
    luaL_error(L, "http: response header '%s' must be a string", name);
  value = lua_tolstring(L, vidx, &vlen);
  if (!valid_header_text(value, vlen, 0))
    luaL_error(L, "http: response header '%s' contains CR, LF or NUL", name);
  if (nlen == 10 && strncasecmp(name, "connection", 10) == 0)
    return vlen == 5 && strncasecmp(value, "close", 5) == 0;
  fb_buf_append(&scratch, name, nlen);
  ADD_LIT(": ");
  fb_buf_append(&scratch, value, vlen);
  ADD_LIT("\r\n");
  return 0;
}

/* Appends the lines of the headers table at hidx; returns 1 when one says Connection: close. */
static int add_header_table(lua_State *L, int hidx) {
  int closes = 0;
  lua_pushnil(L);
  while (lua_next(L, hidx)) {        /* stack: ... key value */
    if (lua_istable(L, -1)) {        /* a list: one header line per value (Set-Cookie) */
      int i, len = (int)lua_objlen(L, -1);
      for (i = 1; i <= len; i++) {
        lua_rawgeti(L, -1, i);
        lua_pushvalue(L, -3);        /* stack: key list value key */
        lua_insert(L, -2);           /* stack: key list key value */
        closes |= add_header(L, lua_gettop(L));
        lua_pop(L, 2);
      }
    } else {
      closes |= add_header(L, lua_gettop(L));
    }
    lua_pop(L, 1);
  }
  return closes;
}

/* ---- prepared header lines --------------------------------------------------------------- */

/* core.http.head_lines(headers) renders a headers table once, checked as res:send checks it;
 * res:send and res:start take the result in place of a table and copy its bytes. For header
 * sets many responses share: the framework's Content-Type-only heads (controller.lua). */
#define HEAD_LINES_MAGIC 0x6c696e65u
typedef struct {
  unsigned magic;
  int closes;              /* the table said Connection: close */
  size_t len;
  char data[];
} head_lines_t;

int fb_http_l_head_lines(lua_State *L) {
  head_lines_t *h;
  int closes;
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  fb_buf_reset(&scratch);
  closes = add_header_table(L, 1);
  h = lua_newuserdata(L, sizeof *h + scratch.len);
  h->magic = HEAD_LINES_MAGIC;
  h->closes = closes;
  h->len = scratch.len;
  if (scratch.len) memcpy(h->data, scratch.data, scratch.len);
  return 1;
}

static head_lines_t *to_head_lines(lua_State *L, int idx) {
  head_lines_t *h = lua_touserdata(L, idx);
  if (h && lua_objlen(L, idx) >= sizeof *h && h->magic == HEAD_LINES_MAGIC &&
      lua_objlen(L, idx) == sizeof *h + h->len)
    return h;
  return NULL;
}

/* Builds the response head in scratch for status and the headers at hidx (a table, head_lines
 * or nil); body_len < 0
 * means a streamed body (chunked on HTTP/1.1, close-delimited on HTTP/1.0). */
static void build_head(lua_State *L, fb_http_conn_t *c, int status, int hidx, long long body_len) {
  int no_body = status < 200 || status == 204 || status == 304;

  fb_buf_reset(&scratch);
  if (status == 200) {
    ADD_LIT("HTTP/1.1 200 OK\r\n");        /* most responses: no digits, no reason lookup */
  } else {
    const char *reason = fb_http_reason(status);
    ADD_LIT("HTTP/1.1 ");
    add_uint((uint64_t)status);
    ADD_LIT(" ");
    fb_buf_append(&scratch, reason, strlen(reason));
    ADD_LIT("\r\n");
  }
  {
    const char *date = date_header();       /* sets W.date_len: call it first */
    fb_buf_append(&scratch, date, W.date_len);
  }
  if (lua_istable(L, hidx)) {
    if (add_header_table(L, hidx)) c->keep_alive = 0;
  } else if (lua_type(L, hidx) == LUA_TUSERDATA) {
    head_lines_t *h = to_head_lines(L, hidx);
    if (!h) luaL_error(L, "http: response headers must be a table");
    fb_buf_append(&scratch, h->data, h->len);
    if (h->closes) c->keep_alive = 0;
  }
  if (body_len >= 0) {
    if (!no_body) {
      ADD_LIT("Content-Length: ");
      add_uint((uint64_t)body_len);
      ADD_LIT("\r\n");
    }
  } else if (c->http10) {
    c->keep_alive = 0;                 /* the end of the body is the end of the connection */
  } else if (!no_body) {
    c->chunked = 1;
    ADD_LIT("Transfer-Encoding: chunked\r\n");
  }
  if (!c->keep_alive) ADD_LIT("Connection: close\r\n");
  else if (c->http10) ADD_LIT("Connection: keep-alive\r\n");
  ADD_LIT("X-Request-Id: ");
  fb_buf_append(&scratch, c->request_id, c->request_id_len);
  if (ADD_LIT("\r\n\r\n") != 0) luaL_error(L, "http: response head over 1 MiB");
}

/* ---- the Lua response object --------------------------------------------------------- */

void fb_http_push_response(lua_State *L, fb_http_conn_t *c) {
  res_box_t *box = lua_newuserdata(L, sizeof *box);
  box->magic = RES_MAGIC;
  box->c = c;
  if (c) c->res_box = box;
  /* One for no connection reports closed and needs no finalizer. */
  lua_rawgeti(L, LUA_REGISTRYINDEX, c ? W.res_mt_ref : W.res_done_mt_ref);
  lua_setmetatable(L, -2);
}

void fb_http_detach_response(fb_http_conn_t *c) {
  if (!c->res_box) return;
  ((res_box_t *)c->res_box)->c = NULL;
  c->res_box = NULL;
}

static res_box_t *check_box(lua_State *L) {
  res_box_t *box = lua_touserdata(L, 1);
  if (!box || lua_objlen(L, 1) != sizeof *box || box->magic != RES_MAGIC)
    luaL_error(L, "http: expected a response object, got %s", luaL_typename(L, 1));
  return box;
}

static fb_http_conn_t *check_res(lua_State *L) { return check_box(L)->c; }

/* The response at index 1 is done: its connection no longer points at it, so it needs no
 * finalizer. */
static void response_done(lua_State *L) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, W.res_done_mt_ref);
  lua_setmetatable(L, 1);
}

static int closed(lua_State *L) {
  lua_pushnil(L);
  lua_pushliteral(L, "closed");
  return 2;
}

static int check_status(lua_State *L, int idx) {
  int status = (int)luaL_checkinteger(L, idx);
  if (status < 100 || status > 999) luaL_error(L, "http: invalid status %d", status);
  return status;
}

/* The whole response at once, from (status, headers, body) at 2, 3, 4: 1 when it left (or
 * is queued), 0 when the connection is closed. */
static int send_whole(lua_State *L, fb_http_conn_t *c) {
  int status = check_status(L, 2);
  size_t blen = 0;
  const char *body = luaL_optlstring(L, 4, "", &blen);
  if (!c) return 0;
  if (c->head_sent) return luaL_error(L, "http: response already started");
  build_head(L, c, status, 3, (long long)blen);
  c->status = status;
  c->head_sent = c->res_done = 1;
  if (c->head_only || status < 200 || status == 204 || status == 304) blen = 0;
  c->bytes_sent = blen;
  if (fb_http_write(c, scratch.data, scratch.len, body, blen) != 0) return 0;
  fb_http_request_done(c);
  return 1;
}

/* res:send(status, headers, body) -> true | nil, "closed": the whole response at once. */
static int l_res_send(lua_State *L) {
  if (!send_whole(L, check_res(L))) return closed(L);
  response_done(L);
  lua_pushboolean(L, 1);
  return 1;
}

/* core.http.send(token, status, headers, body): res:send for the request the token names. */
int fb_http_l_send(lua_State *L) {
  if (!send_whole(L, fb_http_check_token(L, 1))) return closed(L);
  lua_pushboolean(L, 1);
  return 1;
}

/* core.http.response(token): the request's response object, made on demand (a stream, a
 * static file, a function route); one reporting closed when the request is no longer current.
 * Making a second one for the same request detaches the first. */
int fb_http_l_response(lua_State *L) {
  fb_http_conn_t *c = fb_http_check_token(L, 1);
  if (c) fb_http_detach_response(c);
  fb_http_push_response(L, c);
  return 1;
}

/* res:start(status, headers [, length]): sends the head of a streamed response: with a
 * Content-Length when the length is known, else chunked (close-delimited for HTTP/1.0). */
static int l_res_start(lua_State *L) {
  fb_http_conn_t *c = check_res(L);
  int status = check_status(L, 2);
  lua_Number length = luaL_optnumber(L, 4, -1);
  if (!c) return closed(L);
  if (c->head_sent) return luaL_error(L, "http: response already started");
  if (length >= 0 && length != (lua_Number)(long long)length)
    return luaL_error(L, "http: res:start length must be a whole number");
  c->content_length = length >= 0 ? (long long)length : -1;
  build_head(L, c, status, 3, c->content_length);
  c->status = status;
  c->head_sent = 1;
  if (fb_http_write(c, scratch.data, scratch.len, NULL, 0) != 0) return closed(L);
  lua_pushboolean(L, 1);
  return 1;
}

static void write_cancel(fb_fiber_t *f, void *data) {
  fb_http_conn_t *c = data;
  (void)f;
  c->write_waiter = NULL;
}

/* res:write(chunk) -> true | nil, "closed"; suspends while too much is unsent. */
static int l_res_write(lua_State *L) {
  fb_http_conn_t *c = check_res(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  if (!c) return closed(L);
  if (!c->head_sent) return luaL_error(L, "http: res:write before res:start");
  if (c->res_done) return luaL_error(L, "http: res:write after the response ended");
  if (c->content_length >= 0 && (long long)(c->bytes_sent + len) > c->content_length)
    return luaL_error(L, "http: res:write past the Content-Length given to res:start");
  if (len > 0 && !c->head_only) {
    int r;
    c->bytes_sent += len;
    if (c->chunked) {
      char size[24];
      uv_buf_t b[3];
      int n = snprintf(size, sizeof size, "%zx\r\n", len);
      b[0] = uv_buf_init(size, (unsigned)n);
      b[1] = uv_buf_init((char *)data, (unsigned)len);
      b[2] = uv_buf_init("\r\n", 2);
      r = writev_bufs(c, b, 3);
    } else {
      r = fb_http_write(c, data, len, NULL, 0);
    }
    if (r != 0) return closed(L);
  }
  if (c->write_queued > c->srv->limits.write_high_water) {
    fb_fiber_t *f;
    if (c->write_waiter) return luaL_error(L, "http: another fiber is already waiting in res:write");
    f = fb_fiber_check(L, "res:write");
    c->write_waiter = f;
    fb_fiber_on_cancel(f, write_cancel, c);
    return fb_fiber_suspend(L, f, -1);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* res:push(chunk, limit) -> true | false, "closed" | "slow": writes one chunk of a streamed
 * response without ever suspending (a broadcast writes to many streams from one fiber). When
 * more than limit bytes wait for the client, it is not reading: the connection is dropped. */
static int l_res_push(lua_State *L) {
  fb_http_conn_t *c = check_res(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  lua_Number limit = luaL_checknumber(L, 3);
  if (!c) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if (!c->head_sent || !c->chunked) return luaL_error(L, "http: res:push needs a chunked res:start");
  if (c->res_done) return luaL_error(L, "http: res:push after the response ended");
  if (len > 0 && !c->head_only) {
    char size[24];
    uv_buf_t b[3];
    int n = snprintf(size, sizeof size, "%zx\r\n", len);
    b[0] = uv_buf_init(size, (unsigned)n);
    b[1] = uv_buf_init((char *)data, (unsigned)len);
    b[2] = uv_buf_init("\r\n", 2);
    c->bytes_sent += len;
    if (writev_bufs(c, b, 3) != 0) {
      lua_pushboolean(L, 0);
      lua_pushliteral(L, "closed");
      return 2;
    }
  }
  if ((lua_Number)c->write_queued > limit) {
    HTTP_WARN("conn=%u reason=slow_stream queued=%zu", c->id, c->write_queued);
    fb_http_conn_close(c);
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "slow");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

void fb_http_wake_close_waiter(fb_http_conn_t *c, const char *why) {
  fb_fiber_t *f = c->close_waiter;
  lua_State *co;
  if (c->close_cancels && why[0] != 'f') {   /* not on "finished": the stream ended itself */
    fb_fiber_t *t = c->close_cancels;
    c->close_cancels = NULL;
    fb_fiber_cancel(t);
  }
  if (!f) return;
  c->close_waiter = NULL;
  co = fb_fiber_thread(f);
  lua_pushboolean(co, 1);
  lua_pushstring(co, why);
  fb_fiber_ready(f, 2);
}

static void close_wait_cancel(fb_fiber_t *f, void *data) {
  fb_http_conn_t *c = data;
  (void)f;
  c->close_waiter = NULL;
}

/* res:wait_closed([timeout]) -> true, "closed" | "eof": suspends until the client leaves or
 * the connection is closed (by res:abort, the server's shutdown, a failed write...). */
static int l_res_wait_closed(lua_State *L) {
  fb_http_conn_t *c = check_res(L);
  double timeout = luaL_optnumber(L, 2, -1);
  fb_fiber_t *f;
  if (!c || c->peer_eof) {
    lua_pushboolean(L, 1);
    lua_pushstring(L, c ? "eof" : "closed");
    return 2;
  }
  if (c->close_waiter) return luaL_error(L, "http: another fiber is already in res:wait_closed");
  f = fb_fiber_check(L, "res:wait_closed");
  c->close_waiter = f;
  fb_fiber_on_cancel(f, close_wait_cancel, c);
  return fb_fiber_suspend(L, f, timeout);
}

/* res:cancel_on_close(on): while on, the calling fiber is cancelled (fibril.cancel) when the
 * client leaves or the connection closes, so a stream handler waiting on anything ends.
 * The caller must turn it off before the fiber ends (fibril.sse does, whatever happens). */
static int l_res_cancel_on_close(lua_State *L) {
  fb_http_conn_t *c = check_res(L);
  int on = lua_toboolean(L, 2);
  if (!c) return 0;
  c->close_cancels = on ? fb_fiber_check(L, "res:cancel_on_close") : NULL;
  return 0;
}

/* res:detach(): the response (a stream) lives on after its handler returns, held by whoever
 * keeps the res object (fibril.sse's hub); the client closing its side closes the connection
 * at once, since no fiber waits to notice. */
static int l_res_detach(lua_State *L) {
  fb_http_conn_t *c = check_res(L);
  if (!c) return 0;
  if (!c->head_sent || c->res_done) return luaL_error(L, "http: res:detach needs a started stream");
  c->stream_detached = 1;
  if (c->peer_eof) fb_http_conn_close(c);
  return 0;
}

/* res:finish(): ends a streamed response. */
static int l_res_finish(lua_State *L) {
  fb_http_conn_t *c = check_res(L);
  if (!c) return closed(L);
  if (!c->head_sent) return luaL_error(L, "http: res:finish before res:start");
  if (c->res_done) return luaL_error(L, "http: response already ended");
  c->res_done = 1;
  fb_http_wake_close_waiter(c, "finished");
  /* Fewer bytes than the Content-Length promised: only closing tells the client. */
  if (c->content_length >= 0 && !c->head_only && (long long)c->bytes_sent != c->content_length)
    c->keep_alive = 0;
  if (c->chunked && !c->head_only && fb_http_write(c, "0\r\n\r\n", 5, NULL, 0) != 0)
    return closed(L);
  fb_http_request_done(c);
  response_done(L);
  lua_pushboolean(L, 1);
  return 1;
}

/* __gc: a response object nobody can reach any more cannot finish its response, and the
 * connection must not keep a pointer into freed Lua memory: drop the connection. */
static int l_res_gc(lua_State *L) {
  res_box_t *box = check_box(L);
  fb_http_conn_t *c = box->c;
  if (!c) return 0;
  box->c = NULL;
  c->res_box = NULL;
  fb_http_conn_close(c);
  return 0;
}

/* res:abort(): drops the connection now (a body that cannot be completed). */
static int l_res_abort(lua_State *L) {
  fb_http_conn_t *c = check_res(L);
  if (c) fb_http_conn_close(c);
  return 0;
}

static int l_res_closed(lua_State *L) {
  lua_pushboolean(L, check_res(L) == NULL);
  return 1;
}

/* res:gone(): the connection closed, or the client closed its side (it will not read). */
static int l_res_gone(lua_State *L) {
  fb_http_conn_t *c = check_res(L);
  lua_pushboolean(L, c == NULL || c->peer_eof);
  return 1;
}

static int l_res_started(lua_State *L) {
  fb_http_conn_t *c = check_res(L);
  lua_pushboolean(L, c == NULL || c->head_sent);
  return 1;
}

static int push_remote(lua_State *L, fb_http_conn_t *c) {
  struct sockaddr_storage a;
  char ip[64];
  int n = sizeof a, port;
  if (!c || uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&a, &n) != 0) return 0;
  if (a.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&a, ip, sizeof ip);
    port = ntohs(((struct sockaddr_in6 *)&a)->sin6_port);
  } else {
    uv_ip4_name((struct sockaddr_in *)&a, ip, sizeof ip);
    port = ntohs(((struct sockaddr_in *)&a)->sin_port);
  }
  lua_pushstring(L, ip);
  lua_pushinteger(L, port);
  return 2;
}

static int l_res_remote(lua_State *L) { return push_remote(L, check_res(L)); }

/* core.http.remote(token) -> ip, port: res:remote for the request the token names. */
int fb_http_l_remote(lua_State *L) { return push_remote(L, fb_http_check_token(L, 1)); }

int luaopen_fibril_core_http_response(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "send", l_res_send }, { "start", l_res_start }, { "write", l_res_write },
    { "finish", l_res_finish }, { "closed", l_res_closed }, { "started", l_res_started },
    { "remote", l_res_remote }, { "abort", l_res_abort }, { "push", l_res_push },
    { "wait_closed", l_res_wait_closed }, { "cancel_on_close", l_res_cancel_on_close }, { "gone", l_res_gone }, { "detach", l_res_detach },
    { NULL, NULL }
  };
  if (luaL_newmetatable(L, RES_MT)) {      /* stack: mt */
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "__index");         /* stack: mt methods */
    lua_pushcfunction(L, l_res_gc);
    lua_setfield(L, -3, "__gc");
    lua_createtable(L, 0, 1);               /* stack: mt methods done_mt */
    lua_insert(L, -2);
    lua_setfield(L, -2, "__index");         /* stack: mt done_mt */
    W.res_done_mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, -1);
    W.res_mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  return 1;                            /* the metatable */
}

/* ---- access log ---------------------------------------------------------------------- */

void fb_http_log_flush(void) {
  size_t off = 0;
  while (off < W.log_len) {
    ssize_t n = fwrite(W.log + off, 1, W.log_len - off, stdout);
    if (n <= 0) break;
    off += (size_t)n;
  }
  fflush(stdout);
  W.log_len = 0;
}

static void on_log_timer(uv_timer_t *t) {
  (void)t;
  if (W.log_len) fb_http_log_flush();
}

void fb_http_access_log(fb_http_conn_t *c) {
  struct timeval tv;
  char path[300], line[640];
  double ms = (double)(uv_hrtime() - c->started_ns) / 1e6;
  int n;
  gettimeofday(&tv, NULL);
  if (tv.tv_sec != W.log_ts_at) {
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    strftime(W.log_ts, sizeof W.log_ts, "%Y-%m-%dT%H:%M:%S", &tm);
    W.log_ts_at = tv.tv_sec;
  }
  fb_log_quote(path, sizeof path, c->path_log, strlen(c->path_log));
  n = snprintf(line, sizeof line,
               "ts=%s.%03dZ level=info sub=http method=%s path=%s status=%d bytes=%zu ms=%.3f "
               "req=%s\n", W.log_ts, (int)(tv.tv_usec / 1000), c->method, path, c->status,
               c->bytes_sent, ms, c->request_id);
  if (n <= 0) return;
  if ((size_t)n > sizeof line - 1) n = sizeof line - 1;
  if (!W.log_timer_on) {
    uv_timer_init(W.loop, &W.log_timer);
    uv_timer_start(&W.log_timer, on_log_timer, 100, 100);  /* lines reach stdout within 0.1 s */
    uv_unref((uv_handle_t *)&W.log_timer);
    W.log_timer_on = 1;
  }
  if (W.log_len + (size_t)n > sizeof W.log) fb_http_log_flush();
  memcpy(W.log + W.log_len, line, (size_t)n);
  W.log_len += (size_t)n;
}

void fb_http_write_init(uv_loop_t *loop) {
  W.loop = loop;
}

void fb_http_write_shutdown(void) {
  fb_buf_free(&scratch);
  if (W.log_len) fb_http_log_flush();
  if (W.log_timer_on) {
    uv_close((uv_handle_t *)&W.log_timer, NULL);
    W.log_timer_on = 0;
  }
}
