/* http_client_conn.h: what the two parts of the HTTP client share (private to them).
 *   http_client.c        connection lifetime: connect, TLS, reads and writes, Lua methods
 *   http_client_parse.c  the response parser: llhttp callbacks within limits, heads to Lua */
#ifndef FB_HTTP_CLIENT_CONN_H
#define FB_HTTP_CLIENT_CONN_H

#include <llhttp.h>
#include <lua.h>
#include <stdint.h>
#include <uv.h>

#include "buf.h"
#include "fiber.h"
#include "tls.h"

#define HC_MAX_HEADERS 100           /* header lines per response */
#define HC_READ_AHEAD (256u << 10)   /* body bytes buffered with nobody reading: reading stops */
#define HC_READ_SIZE 65536u          /* one socket read (and so at most this much plaintext) */

typedef enum { W_NONE, W_CONNECT, W_HEAD, W_BODY } wait_t;

typedef struct conn_s conn_t;

typedef struct { uint32_t name_off, name_len, value_off, value_len; } span_t;

struct conn_s {
  uv_tcp_t tcp;
  uv_timer_t idle;                /* parked in the pool: closes the connection on expiry */
  int open_handles;               /* freed when 0 and !boxed */
  unsigned char boxed, closing, reading, parked, handshaking;
  unsigned char active;           /* a request was sent and its response is not complete */
  unsigned char head_ready, done, keepalive, eof, stray, head_only, in_field;
  fb_tls_t *tls;                  /* owned; NULL for plain HTTP */
  llhttp_t parser;
  fb_fiber_t *waiter;             /* the one fiber waiting on this connection */
  wait_t wait;
  const char *err_code;           /* set once: the connection failed and is dead */
  char err[512];
  fb_buf_t head;                  /* header names and values, spans index it */
  span_t spans[HC_MAX_HEADERS];
  int nspans;
  fb_buf_t body;                  /* received body bytes not yet taken by read() */
  uint64_t body_total, max_body, received;
  conn_t *live_next, *live_prev;
};

/* Marks the connection failed (the first failure wins); it is never reused after this. */
void fb_hc_fail(conn_t *c, const char *code, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

/* Sets up c->parser for responses. */
void fb_hc_parser_init(conn_t *c);
/* Feeds plaintext to the parser, or, outside a request, notes bytes nobody asked for. */
void fb_hc_parse(conn_t *c, const char *data, size_t n);
/* The peer ended the stream: completes a body delimited by EOF. Returns whether the
 * response is complete. */
int fb_hc_finish(conn_t *c);
/* Pushes the status and the headers table of the parsed head onto L. */
void fb_hc_push_head(lua_State *L, conn_t *c);

#endif
