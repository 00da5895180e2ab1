/* tls.c: OpenSSL client sessions over a pair of memory BIOs: the socket code feeds what it
 * read and sends what fb_tls_take gives, so TLS never touches a file descriptor or blocks.
 * Contexts (each holding a parsed CA store) are cached per CA file: loading the system
 * store costs milliseconds, a session must not pay it. */
#include "tls.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define TLS_CTX_CACHE 8   /* distinct CA files kept loaded; past it a context lives per session */

struct fb_tls_s {
  SSL *ssl;
  BIO *rbio, *wbio;         /* owned by ssl */
  char host[256];
};

static struct {
  char *ca_file[TLS_CTX_CACHE];   /* NULL entry with ctx set: the system store */
  SSL_CTX *ctx[TLS_CTX_CACHE];
  int n;
} C;

static void set_err(fb_tls_err_t *err, const char *code, const char *fmt, const char *arg) {
  err->code = code;
  snprintf(err->msg, sizeof err->msg, fmt, arg);
}

/* The first queued OpenSSL error as a sentence, or what (when the queue is empty). */
static void set_openssl_err(fb_tls_err_t *err, const char *code, const char *what) {
  unsigned long e = ERR_peek_last_error();
  char buf[200];
  if (e) {
    ERR_error_string_n(e, buf, sizeof buf);
    err->code = code;
    snprintf(err->msg, sizeof err->msg, "%s: %s", what, buf);
  } else {
    set_err(err, code, "%s", what);
  }
  ERR_clear_error();
}

static SSL_CTX *ctx_new(const char *ca_file, fb_tls_err_t *err) {
  SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
  if (!ctx) {
    set_openssl_err(err, "tls", "cannot create a TLS context");
    return NULL;
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  if (ca_file ? SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1
              : SSL_CTX_set_default_verify_paths(ctx) != 1) {
    char what[300];
    snprintf(what, sizeof what, "cannot load CA file '%.200s'", ca_file ? ca_file : "(system)");
    set_openssl_err(err, "ca_file", what);
    SSL_CTX_free(ctx);
    return NULL;
  }
  return ctx;
}

/* A context for ca_file with one reference for the caller (SSL_CTX_free it after SSL_new). */
static SSL_CTX *ctx_get(const char *ca_file, fb_tls_err_t *err) {
  SSL_CTX *ctx;
  int i;
  for (i = 0; i < C.n; i++) {
    if ((!ca_file && !C.ca_file[i]) || (ca_file && C.ca_file[i] && !strcmp(ca_file, C.ca_file[i]))) {
      SSL_CTX_up_ref(C.ctx[i]);
      return C.ctx[i];
    }
  }
  if (!(ctx = ctx_new(ca_file, err))) return NULL;
  if (C.n < TLS_CTX_CACHE) {
    char *copy = ca_file ? strdup(ca_file) : NULL;
    if (!ca_file || copy) {
      C.ca_file[C.n] = copy;
      C.ctx[C.n++] = ctx;
      SSL_CTX_up_ref(ctx);
    }
  }
  return ctx;
}

void fb_tls_cleanup(void) {
  int i;
  for (i = 0; i < C.n; i++) {
    SSL_CTX_free(C.ctx[i]);
    free(C.ca_file[i]);
  }
  C.n = 0;
}

static int is_ip(const char *host) {
  unsigned char buf[16];
  return uv_inet_pton(AF_INET, host, buf) == 0 || uv_inet_pton(AF_INET6, host, buf) == 0;
}

fb_tls_t *fb_tls_new(const char *host, const char *ca_file, int verify, fb_tls_err_t *err) {
  SSL_CTX *ctx;
  fb_tls_t *t;
  int ok;
  if (strlen(host) >= sizeof t->host) {
    set_err(err, "tls", "host name too long: %.64s...", host);
    return NULL;
  }
  if (!(ctx = ctx_get(ca_file, err))) return NULL;
  if (!(t = calloc(1, sizeof *t))) {
    SSL_CTX_free(ctx);
    set_err(err, "tls", "%s", "out of memory");
    return NULL;
  }
  strcpy(t->host, host);
  t->ssl = SSL_new(ctx);
  SSL_CTX_free(ctx);              /* the session holds its own reference */
  t->rbio = BIO_new(BIO_s_mem());
  t->wbio = BIO_new(BIO_s_mem());
  if (!t->ssl || !t->rbio || !t->wbio) {
    BIO_free(t->rbio);
    BIO_free(t->wbio);
    if (t->ssl) SSL_free(t->ssl);
    free(t);
    set_openssl_err(err, "tls", "cannot create a TLS session");
    return NULL;
  }
  /* An empty read BIO means "no data yet", not end of file: SSL_read then says WANT_READ. */
  BIO_set_mem_eof_return(t->rbio, -1);
  SSL_set_bio(t->ssl, t->rbio, t->wbio);
  SSL_set_connect_state(t->ssl);
  ok = 1;
  if (!is_ip(host)) ok = SSL_set_tlsext_host_name(t->ssl, host) == 1;   /* SNI: names only */
  if (verify) {
    SSL_set_verify(t->ssl, SSL_VERIFY_PEER, NULL);
    /* The chain must be valid and issued for this name (or IP address, checked as one). */
    if (is_ip(host)) ok = ok && X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), host) == 1;
    else ok = ok && SSL_set1_host(t->ssl, host) == 1;
  } else {
    SSL_set_verify(t->ssl, SSL_VERIFY_NONE, NULL);
  }
  if (!ok) {
    fb_tls_free(t);
    set_openssl_err(err, "tls", "cannot set the TLS host name");
    return NULL;
  }
  return t;
}

void fb_tls_free(fb_tls_t *t) {
  if (!t) return;
  SSL_free(t->ssl);               /* frees both BIOs */
  free(t);
}

/* Why a handshake failed: the verification result names certificate problems precisely. */
static void handshake_err(fb_tls_t *t, fb_tls_err_t *err) {
  long v = SSL_get_verify_result(t->ssl);
  const char *code;
  if (v == X509_V_OK) {
    set_openssl_err(err, "tls", "handshake failed");
    return;
  }
  switch (v) {
  case X509_V_ERR_CERT_HAS_EXPIRED: code = "cert_expired"; break;
  case X509_V_ERR_CERT_NOT_YET_VALID: code = "cert_not_yet_valid"; break;
  case X509_V_ERR_HOSTNAME_MISMATCH:
  case X509_V_ERR_IP_ADDRESS_MISMATCH: code = "cert_hostname"; break;
  case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
  case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN: code = "cert_self_signed"; break;
  case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
  case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
  case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE: code = "cert_untrusted"; break;
  default: code = "cert_invalid"; break;
  }
  ERR_clear_error();
  err->code = code;
  snprintf(err->msg, sizeof err->msg, "certificate verify failed for '%.255s': %.200s", t->host,
           X509_verify_cert_error_string(v));
}

int fb_tls_handshake(fb_tls_t *t, fb_tls_err_t *err) {
  int rc = SSL_do_handshake(t->ssl);
  if (rc == 1) return FB_TLS_OK;
  switch (SSL_get_error(t->ssl, rc)) {
  case SSL_ERROR_WANT_READ:
  case SSL_ERROR_WANT_WRITE: return FB_TLS_WANT;
  default:
    handshake_err(t, err);
    return FB_TLS_ERROR;
  }
}

int fb_tls_feed(fb_tls_t *t, const char *p, size_t n) {
  while (n > 0) {
    int chunk = n > 0x40000000 ? 0x40000000 : (int)n;
    int w = BIO_write(t->rbio, p, chunk);
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

int fb_tls_read(fb_tls_t *t, char *buf, size_t cap, size_t *n, fb_tls_err_t *err) {
  int rc = SSL_read(t->ssl, buf, cap > 0x40000000 ? 0x40000000 : (int)cap);
  *n = 0;
  if (rc > 0) {
    *n = (size_t)rc;
    return FB_TLS_OK;
  }
  switch (SSL_get_error(t->ssl, rc)) {
  case SSL_ERROR_WANT_READ:
  case SSL_ERROR_WANT_WRITE: return FB_TLS_WANT;
  case SSL_ERROR_ZERO_RETURN: return FB_TLS_CLOSED;
  default:
    set_openssl_err(err, "tls", "TLS read failed");
    return FB_TLS_ERROR;
  }
}

int fb_tls_write(fb_tls_t *t, const char *p, size_t n, fb_tls_err_t *err) {
  while (n > 0) {
    int chunk = n > 0x40000000 ? 0x40000000 : (int)n;
    int w = SSL_write(t->ssl, p, chunk);
    if (w <= 0) {
      set_openssl_err(err, "tls", "TLS write failed");
      return FB_TLS_ERROR;
    }
    p += w;
    n -= (size_t)w;
  }
  return FB_TLS_OK;
}

size_t fb_tls_pending(fb_tls_t *t) { return BIO_ctrl_pending(t->wbio); }

size_t fb_tls_take(fb_tls_t *t, char *buf, size_t cap) {
  int r = BIO_read(t->wbio, buf, cap > 0x40000000 ? 0x40000000 : (int)cap);
  return r > 0 ? (size_t)r : 0;
}
