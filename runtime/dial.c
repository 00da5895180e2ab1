/* dial.c: connecting a TCP socket for a fiber (dial.h). One dial is one wait of its fiber:
 * resolving and every attempt. It ends exactly once, through ops->done: connected, failed, or
 * given up. A dial given up (fiber == NULL) still waits for the callback libuv owes it (the
 * resolver's, or the attempt's with UV_ECANCELED once its handle is closed), then frees. */
#include "dial.h"

#include <netdb.h>
#include <stdalign.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct fb_dial_s fb_dial_t;

struct fb_dial_s {
  fb_fiber_t *fiber;               /* NULL once given up: the callbacks then only clean up */
  const fb_dial_ops_t *ops;
  uv_getaddrinfo_t gai;
  uv_connect_t req;                /* the attempt in flight (one at a time) */
  int resolving;
  uv_tcp_t *tcp;                   /* the attempt's handle, or NULL */
  struct sockaddr_storage addrs[FB_DIAL_MAX_ADDRS];
  int naddrs, next, last_err;
  fb_dial_t *live_next, *live_prev;
  alignas(max_align_t) unsigned char args[];   /* the owner's copy (fb_dial_start) */
};

static fb_dial_t *dials;           /* every dial in flight, for fb_dial_detach_all */

static void dial_free(fb_dial_t *d) {
  if (d->live_prev) d->live_prev->live_next = d->live_next;
  else dials = d->live_next;
  if (d->live_next) d->live_next->live_prev = d->live_prev;
  (*d->ops->live)--;
  free(d);
}

/* The dial's end: the owner's done, then the struct goes. */
static void dial_end(fb_dial_t *d, uv_tcp_t *tcp, int status) {
  d->ops->done(d->fiber, tcp, status, d->args);
  dial_free(d);
}

static void detach(fb_dial_t *d) {
  d->fiber = NULL;
  if (d->resolving) uv_cancel((uv_req_t *)&d->gai);
  else if (d->tcp) d->ops->discard(d->tcp);
}

static void dial_cancel(fb_fiber_t *f, void *data) {
  (void)f;
  detach(data);
}

static void on_connect(uv_connect_t *req, int status);

/* Starts an attempt on the next address. Returns 0 when one is in flight, else the error
 * of the last address (each failed at once). */
static int connect_next(fb_dial_t *d) {
  while (d->next < d->naddrs) {
    const struct sockaddr *a = (const struct sockaddr *)&d->addrs[d->next++];
    uv_tcp_t *tcp = d->ops->open(d->args);
    int rc;
    if (!tcp) return UV_ENOMEM;
    rc = uv_tcp_connect(&d->req, tcp, a, on_connect);
    if (rc == 0) {
      d->tcp = tcp;
      return 0;
    }
    d->last_err = rc;
    d->ops->discard(tcp);
  }
  return d->last_err ? d->last_err : UV_EAI_NONAME;
}

static void on_connect(uv_connect_t *req, int status) {
  fb_dial_t *d = req->data;
  uv_tcp_t *tcp = d->tcp;
  int rc;
  d->tcp = NULL;
  if (!d->fiber) {                 /* given up: detach() closed the handle */
    dial_end(d, NULL, UV_ECANCELED);
    return;
  }
  if (status == 0) {
    dial_end(d, tcp, 0);
    return;
  }
  d->last_err = status;
  d->ops->discard(tcp);
  if ((rc = connect_next(d)) != 0) dial_end(d, NULL, rc);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  fb_dial_t *d = req->data;
  struct addrinfo *ai;
  int rc;
  d->resolving = 0;
  if (!d->fiber || status < 0) {
    if (res) uv_freeaddrinfo(res);
    dial_end(d, NULL, d->fiber ? status : UV_ECANCELED);
    return;
  }
  for (ai = res; ai && d->naddrs < FB_DIAL_MAX_ADDRS; ai = ai->ai_next) {
    if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6) continue;
    if (ai->ai_addrlen > sizeof d->addrs[0]) continue;
    memcpy(&d->addrs[d->naddrs++], ai->ai_addr, ai->ai_addrlen);
  }
  uv_freeaddrinfo(res);
  if ((rc = connect_next(d)) != 0) dial_end(d, NULL, rc);
}

/* Fills d->addrs[0] when host is a numeric IPv4 or IPv6 address: no resolver round. */
static int parse_numeric(fb_dial_t *d, const char *host, int port) {
  struct sockaddr_in *a4 = (struct sockaddr_in *)&d->addrs[0];
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&d->addrs[0];
  if (uv_ip4_addr(host, port, a4) == 0 || uv_ip6_addr(host, port, a6) == 0) {
    d->naddrs = 1;
    return 1;
  }
  memset(&d->addrs[0], 0, sizeof d->addrs[0]);
  return 0;
}

int fb_dial_start(fb_fiber_t *f, const char *host, int port, const fb_dial_ops_t *ops,
                  const void *args, size_t args_len) {
  fb_dial_t *d = calloc(1, sizeof *d + args_len);
  int rc;
  if (!d) return UV_ENOMEM;
  d->ops = ops;
  d->gai.data = d->req.data = d;
  if (args_len) memcpy(d->args, args, args_len);
  d->live_next = dials;
  if (dials) dials->live_prev = d;
  dials = d;
  (*ops->live)++;
  if (parse_numeric(d, host, port)) {
    rc = connect_next(d);
  } else {
    struct addrinfo hints;
    char service[8];
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(service, sizeof service, "%d", port);
    d->resolving = 1;              /* libuv copies host and service into the request */
    rc = uv_getaddrinfo(fb_sched_loop(), &d->gai, on_resolved, host, service, &hints);
    if (rc < 0) d->resolving = 0;
  }
  if (rc < 0) {                    /* failed before anything was in flight */
    dial_free(d);
    return rc;
  }
  d->fiber = f;
  fb_fiber_on_cancel(f, dial_cancel, d);
  return 0;
}

void fb_dial_detach_all(const fb_dial_ops_t *ops) {
  fb_dial_t *d;
  for (d = dials; d; d = d->live_next)
    if (d->ops == ops && d->fiber) detach(d);
}
