/* http.c: the HTTP/1.1 server: listening, accepting, a connection's reads and lifecycle, and
 * the server object's Lua API. Parsing a request within the limits and handing it to a new
 * fiber as handler(req, res) is http_request.c's. One request per connection is in flight at
 * a time: parsing pauses at the end of a request and resumes when its response is done
 * (fb_http_request_done, below), so pipelined responses leave in request order. */
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

static struct {
  lua_State *L;
  uv_loop_t *loop;
  size_t live_conns;
  fb_http_server_t *servers;   /* every server not yet freed, for shutdown */
  int closing;                 /* fb_http_shutdown ran: the Lua state is about to close */
} H;

typedef struct { fb_http_server_t *srv; } server_box_t;

fb_log_limit_t fb_http_warn_limit;

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
  fb_http_spans_put(c);
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
  fb_http_parse(c, buf->base, (size_t)nread);
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
  fb_http_parser_init(c);
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
    fb_http_parse(c, pending.data, pending.len);
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
    { "id_string", fb_http_l_id_string },
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
  fb_http_spans_free();                      /* after the closes returned theirs */
  fb_http_write_shutdown();
  fb_http_token_shutdown();
}

void fb_http_init(lua_State *L, uv_loop_t *loop) {
  H.L = L;
  H.loop = loop;
  fb_http_request_init(L);
  fb_http_write_init(loop);
}
