/* http_edge.c: edge-triggered reads for the HTTP server's connections.
 *
 * libuv registers every socket with epoll level-triggered. With many busy keep-alive
 * connections that serves them unfairly: epoll puts a level-triggered socket it has just
 * reported back on its ready list at once, so the connections of one turn are reported
 * first again on the next, ahead of connections that became ready earlier, and the latency
 * spread widens (wrk, 64 connections on /hello: p99 1.31x edge-triggered's, worse in 8 of 8
 * rounds; bench/http_tail.sh, docs/benchmarks.md). nginx registers its sockets
 * edge-triggered: a socket joins the ready list when data arrives, in arrival order. This
 * file does the same for an HTTP connection while libuv's registration of it is the plain
 * one, reading only.
 *
 * It rewrites the registration behind libuv's back (epoll_ctl on the loop's backend fd, with
 * the same data.fd libuv's epoll backend uses), so it keeps to what libuv relies on:
 * - Edge-triggered, a socket must be read until it is empty. libuv's read loop stops after
 *   a read that did not fill the buffer (the socket was empty) or after 32 full ones: after
 *   a full read the registration goes back to level-triggered (fb_http_edge_full_read).
 * - libuv re-registers the socket itself (level-triggered) when it starts or stops watching
 *   for writability (a queued write, its completion) or reading: those places call
 *   fb_http_edge_lost, and the next read sets edge-triggering again. libuv applies its change
 *   at the start of its next poll, before any later read callback: ours always comes last.
 * - Only EPOLLIN is ever edge-triggered; writability stays libuv's, level-triggered.
 * Any failure leaves the connection level-triggered, which is correct, only less fair. */
#include <stdlib.h>
#include <string.h>

#include "http_conn.h"

#ifdef __linux__
#include <sys/epoll.h>

static int disabled = -1;   /* FIBRIL_HTTP_LEVEL set (to anything): libuv's registration (A/B) */

static int set_events(fb_http_conn_t *c, uint32_t events) {
  struct epoll_event e;
  uv_os_fd_t fd;
  if (uv_fileno((uv_handle_t *)&c->tcp, &fd) != 0) return -1;
  memset(&e, 0, sizeof e);
  e.events = events;
  e.data.fd = fd;
  return epoll_ctl(uv_backend_fd(c->tcp.loop), EPOLL_CTL_MOD, fd, &e);
}

void fb_http_edge_arm(fb_http_conn_t *c) {
  if (c->edge || !c->reading || c->write_queued || c->closes) return;
  if (disabled < 0) disabled = getenv("FIBRIL_HTTP_LEVEL") != NULL;
  if (disabled) return;
  if (set_events(c, EPOLLIN | EPOLLET) == 0) c->edge = 1;
}

void fb_http_edge_full_read(fb_http_conn_t *c) {
  if (!c->edge) return;
  c->edge = 0;
  if (set_events(c, EPOLLIN) != 0) {
    /* Cannot happen while the socket is registered; if it did, libuv registers it anew,
     * level-triggered, when reading stops and starts again. */
    fb_http_restart_reading(c);
  }
}

#else

void fb_http_edge_arm(fb_http_conn_t *c) { (void)c; }
void fb_http_edge_full_read(fb_http_conn_t *c) { (void)c; }

#endif

void fb_http_edge_lost(fb_http_conn_t *c) { c->edge = 0; }
