/* tls.h: TLS client sessions over memory BIOs (OpenSSL). OpenSSL only transforms bytes; the
 * socket stays libuv's. Certificate and host name verification are on unless the caller
 * passes verify = 0, which only a per-request `verify = false` does (DESIGN.md). */
#ifndef FB_TLS_H
#define FB_TLS_H

#include <stddef.h>

typedef struct fb_tls_s fb_tls_t;

#define FB_TLS_OK 0       /* done */
#define FB_TLS_WANT 1     /* needs more bytes from the peer */
#define FB_TLS_CLOSED 2   /* the peer sent close_notify */
#define FB_TLS_ERROR (-1) /* err and code are set */

/* A failure: a sentence for people and a short code for programs ("cert_expired"). */
typedef struct {
  char msg[512];
  const char *code;
} fb_tls_err_t;

/* A client session for host (SNI unless host is an IP address; verified against it), trusting
 * ca_file or, when it is NULL, the system store. NULL on failure (err set). */
fb_tls_t *fb_tls_new(const char *host, const char *ca_file, int verify, fb_tls_err_t *err);
void fb_tls_free(fb_tls_t *t);

/* Advances the handshake: FB_TLS_OK, FB_TLS_WANT or FB_TLS_ERROR. */
int fb_tls_handshake(fb_tls_t *t, fb_tls_err_t *err);
/* Ciphertext received from the socket; copied. 0, or -1 when out of memory. */
int fb_tls_feed(fb_tls_t *t, const char *p, size_t n);
/* Decrypts up to cap bytes into buf (*n of them): FB_TLS_OK (*n > 0), FB_TLS_WANT (nothing
 * buffered), FB_TLS_CLOSED or FB_TLS_ERROR. */
int fb_tls_read(fb_tls_t *t, char *buf, size_t cap, size_t *n, fb_tls_err_t *err);
/* Encrypts all n bytes (memory BIOs never block): FB_TLS_OK or FB_TLS_ERROR. */
int fb_tls_write(fb_tls_t *t, const char *p, size_t n, fb_tls_err_t *err);
/* Ciphertext waiting to go to the socket, and taking it out (returns the bytes copied). */
size_t fb_tls_pending(fb_tls_t *t);
size_t fb_tls_take(fb_tls_t *t, char *buf, size_t cap);

/* Frees the cached contexts (their loaded CA stores); at exit, after every session. */
void fb_tls_cleanup(void);

#endif
