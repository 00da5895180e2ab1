/* dial.h: connecting a TCP socket for a fiber, shared by tcp.c and http_client.c: a numeric
 * address at once or a name through uv_getaddrinfo, then each address in resolver order until
 * one connects; cancelling the fiber (or its wait timing out) gives the dial up. The owner
 * makes and closes the handles; the dialer only decides which address each attempt uses. */
#ifndef FB_DIAL_H
#define FB_DIAL_H

#include <stddef.h>
#include <uv.h>

#include "fiber.h"

#define FB_DIAL_MAX_ADDRS 8        /* addresses tried per dial, in resolver order */

typedef struct {
  /* A new handle, initialised on the loop, for one attempt (args: fb_dial_start's copy);
   * NULL when out of memory. */
  uv_tcp_t *(*open)(void *args);
  /* Closes the handle of an attempt that failed or was given up. */
  void (*discard)(uv_tcp_t *tcp);
  /* Called once when a dial that started ends. f: the waiting fiber, or NULL when the dial
   * was given up (cancel, timeout, fb_dial_detach_all). tcp: the connected handle, now the
   * owner's, or NULL. status: 0, or the libuv error of the resolver or of the last address. */
  void (*done)(fb_fiber_t *f, uv_tcp_t *tcp, int status, void *args);
  size_t *live;                    /* the owner's count of dials in flight */
} fb_dial_ops_t;

/* Starts dialing host:port for f, the calling fiber (which then suspends): args_len bytes of
 * args are copied and handed to the callbacks. Returns 0 when the dial is in flight (done is
 * called later), or a libuv error when nothing could start (done is not called). */
int fb_dial_start(fb_fiber_t *f, const char *host, int port, const fb_dial_ops_t *ops,
                  const void *args, size_t args_len);

/* Gives up every dial of ops in flight (at lua_close): their callbacks then only clean up. */
void fb_dial_detach_all(const fb_dial_ops_t *ops);

#endif
