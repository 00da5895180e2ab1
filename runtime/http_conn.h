/* http_conn.h: the HTTP server's connection, shared by http.c (accepting, parsing, limits,
 * dispatch) and http_write.c (responses, backpressure, access log). Not for other files. */
#ifndef FB_HTTP_CONN_H
#define FB_HTTP_CONN_H

#include <llhttp.h>
#include <lua.h>
#include <stdint.h>
#include <uv.h>

#include "buf.h"
#include "log.h"
#include "fiber.h"

#define FB_HTTP_MAX_HEADERS 100

typedef struct fb_http_server_s fb_http_server_t;
typedef struct fb_http_conn_s fb_http_conn_t;

typedef struct {
  size_t max_header_bytes, max_body_bytes, max_url_bytes, write_high_water;
  uint64_t header_timeout_ms, body_timeout_ms, body_deadline_ms, keepalive_timeout_ms,
           send_timeout_ms;
  unsigned max_connections;
} fb_http_limits_t;

struct fb_http_server_s {
  uv_tcp_t tcp;             /* the listener; the struct is freed in its close callback */
  fb_http_limits_t limits;
  int handler_ref;          /* registry: the Lua function called as handler(req, res) */
  char *required_name;      /* listen{ required_header }: lower-case, or NULL */
  char *required_value;     /* ... and the value it must have (compared in constant time) */
  size_t required_value_len;
  uint64_t refused;         /* requests answered 403 for that header */
  int access_log;           /* write one line per request to stdout */
  int tokens;               /* listen{ tokens = true }: handler(req, token) (http_token.c) */
  unsigned nconns, next_conn_id;
  fb_http_conn_t *conns;    /* every open connection (next/prev), for drain and close */
  int listening, draining;
  void *box;                /* the Lua userdata that points here; NULLed on close */
  fb_http_server_t *next_srv, *prev_srv;   /* the list of servers (http.c) */
};

typedef enum {
  CS_IDLE,        /* between requests: keep-alive timer armed */
  CS_HEAD,        /* reading a request head: header timer armed */
  CS_BODY,        /* reading a body: body timer (idle, capped by the body deadline) armed */
  CS_DISPATCHED,  /* the handler fiber owns the request; parsing paused */
  CS_CLOSING
} conn_state_t;

typedef struct {
  uint32_t name_off, name_len, value_off, value_len;
} header_span_t;

struct fb_http_conn_s {
  uv_tcp_t tcp;             /* first: the handle's pointer is the connection's */
  uv_timer_t timer;         /* fires at timer_due for the deadline below (fb_http_arm_timer) */
  uint64_t deadline;        /* loop ms of the header, body, keep-alive or send timeout, or 0 */
  uint64_t timer_due;       /* when the timer fires, or 0 when it is not armed */
  uint64_t body_due;        /* loop ms by which the body must be complete (body_deadline), or 0 */
  llhttp_t parser;
  fb_http_server_t *srv;
  fb_http_conn_t *next, *prev;
  unsigned id;
  int closes;               /* handles still to close before the struct is freed */
  conn_state_t state;
  int reading;              /* uv_read_start is on */
  int edge;                 /* registered edge-triggered for reading (http_edge.c) */
  int peer_eof;             /* the client half-closed or left */

  /* The request being parsed: url and header names/values packed in head. */
  fb_buf_t head;
  size_t url_len;
  header_span_t *headers;   /* FB_HTTP_MAX_HEADERS spans, borrowed from a pool while a head
                               is parsed and returned at dispatch: idle connections hold none */
  int nheaders;
  int last_was_value;       /* llhttp may split a field or value over several callbacks */
  int head_scan;            /* bytes of the CRLF CRLF that ends the head seen (bare LF check) */
  char scan_prev;
  fb_buf_t body;
  int expect_continue;
  fb_buf_t pending;         /* bytes read but not parsed yet (after the current request) */

  /* The response to the current request (http_write.c). */
  int keep_alive, head_only, http10, chunked, head_sent, res_done;
  int status;
  uint64_t started_ns;
  size_t bytes_sent;        /* body bytes, for the access log */
  long long content_length; /* res:start's declared length, or -1 (chunked) */
  size_t write_queued;      /* bytes handed to uv_write and not yet written */
  fb_fiber_t *write_waiter; /* a fiber suspended in res:write until the queue drains */
  fb_fiber_t *close_waiter; /* a fiber in res:wait_closed (a stream) until the client leaves */
  fb_fiber_t *close_cancels; /* res:cancel_on_close's fiber: cancelled when the client leaves */
  int stream_detached;      /* res:detach: no fiber holds the response; EOF closes at once */
  void *res_box;            /* the Lua response userdata pointing here; NULLed on close */
  uint32_t slot;            /* index in the token table (http_token.c), or FB_HTTP_NO_SLOT */
  uint64_t token;           /* the current request's token, or 0 */
  char request_id[64];
  size_t request_id_len;
  char method[24];
  uint8_t method_id;        /* llhttp's method number: the interned name's slot */
  char path_log[128];       /* the path, cut at 127 bytes, for the access log */
};

/* http.c */
void fb_http_conn_close(fb_http_conn_t *c);   /* idempotent; frees after the close callbacks */
/* The response is complete: log it, then read the next request or close. */
void fb_http_request_done(fb_http_conn_t *c);

/* Stops reading (the edge-triggered registration goes with it); restarting registers the
 * socket anew with libuv. */
void fb_http_stop_reading(fb_http_conn_t *c);
void fb_http_restart_reading(fb_http_conn_t *c);

/* http_request.c: parsing a request and handing it to its fiber. */
void fb_http_request_init(lua_State *L);          /* llhttp settings, interned strings */
void fb_http_parser_init(fb_http_conn_t *c);      /* a new connection's parser */
/* Parses bytes that arrived; a complete request is dispatched, a bad one answered. */
void fb_http_parse(fb_http_conn_t *c, const char *data, size_t len);
void fb_http_spans_put(fb_http_conn_t *c);        /* gives back the head's header spans */
void fb_http_spans_free(void);                    /* at shutdown: the pool's spare ones */
int fb_http_l_id_string(lua_State *L);           /* core.http.id_string(counter) */

/* http_edge.c: edge-triggered reads (why and the rules: the file's opening comment). */
void fb_http_edge_arm(fb_http_conn_t *c);         /* after a read that emptied the socket */
void fb_http_edge_full_read(fb_http_conn_t *c);   /* a read filled the buffer: level again */
void fb_http_edge_lost(fb_http_conn_t *c);        /* libuv is about to register it anew */

/* http_token.c: requests named by a number (slot + generation) instead of a userdata. */
#define FB_HTTP_NO_SLOT UINT32_MAX
int fb_http_token_attach(fb_http_conn_t *c);         /* at accept; -1 when no slot is left */
void fb_http_token_detach(fb_http_conn_t *c);        /* at close: every token of c ends */
uint64_t fb_http_token_begin(fb_http_conn_t *c);     /* a new request: its token */
fb_http_conn_t *fb_http_token_conn(uint64_t token);  /* NULL unless the request is current */
fb_http_conn_t *fb_http_check_token(lua_State *L, int idx);   /* the same for a Lua value */
void fb_http_token_shutdown(void);

/* http_timeout.c */
/* The connection's timeout (header, body, keep-alive or send, by state): ms from now, 0 none. */
void fb_http_arm_timer(fb_http_conn_t *c, uint64_t ms);
/* Reading a body: body_timeout of idle time, but never past body_due (body_deadline). */
void fb_http_arm_body_timer(fb_http_conn_t *c);
/* The response's bytes are stuck or moving: re-arms the send timeout while some are queued
 * (the client must keep reading), or the keep-alive timeout once an idle connection's are out. */
void fb_http_write_progress(fb_http_conn_t *c);

/* Wakes the fiber in res:wait_closed, if any: the client left (eof) or the connection closes. */
void fb_http_wake_close_waiter(fb_http_conn_t *c, const char *why);

/* http_write.c */
int fb_http_write(fb_http_conn_t *c, const char *p1, size_t n1, const char *p2, size_t n2);
/* Sends a complete error response (400, 408, 413, 414, 431, 503...) and closes after it. */
void fb_http_send_error(fb_http_conn_t *c, int status);
void fb_http_access_log(fb_http_conn_t *c);
void fb_http_log_flush(void);
void fb_http_write_init(uv_loop_t *loop);
void fb_http_write_shutdown(void);
const char *fb_http_reason(int status);
int luaopen_fibril_core_http_response(lua_State *L);

/* A warn line about what a client did (a bad request, a limit, a timeout): at most
 * HTTP_WARNS_PER_SECOND a second, so a flood of bad requests cannot flood the log. */
#define HTTP_WARNS_PER_SECOND 50
extern fb_log_limit_t fb_http_warn_limit;
#define HTTP_WARN(...) \
  fb_log_limited(&fb_http_warn_limit, HTTP_WARNS_PER_SECOND, FB_WARN, "http", __VA_ARGS__)
/* core.http.head_lines(headers): a headers table rendered once, for res:send (http_write.c). */
int fb_http_l_head_lines(lua_State *L);
/* Pushes a new res userdata for c; for c NULL, one that reports closed (a stale token). */
void fb_http_push_response(lua_State *L, fb_http_conn_t *c);
void fb_http_detach_response(fb_http_conn_t *c);   /* its res object reports closed from now */
/* core.http.send(token, status, headers, body), response(token) and remote(token): the
 * response calls of the token path (lua/fibril/server.lua). */
int fb_http_l_send(lua_State *L);
int fb_http_l_response(lua_State *L);
int fb_http_l_remote(lua_State *L);

#endif
