/* buf.c: bounded growable buffers. The limit is checked as n > max - len (never len + n, which
 * could wrap), before any memory is touched. */
#include "buf.h"

#include <stdlib.h>
#include <string.h>

void fb_buf_init(fb_buf_t *b, size_t max) {
  b->data = NULL;
  b->len = b->cap = 0;
  b->max = max;
}

int fb_buf_append_grow(fb_buf_t *b, const char *p, size_t n) {
  if (n > b->max - b->len) return FB_ELIMIT;
  if (n > b->cap - b->len) {
    size_t ncap = b->cap ? b->cap : 256;
    char *nd;
    while (ncap - b->len < n) ncap = ncap > b->max / 2 ? b->max : ncap * 2;
    nd = realloc(b->data, ncap);
    if (!nd) return FB_ENOMEM;
    b->data = nd;
    b->cap = ncap;
  }
  if (n) memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}

void fb_buf_consume(fb_buf_t *b, size_t n) {
  if (n >= b->len) {
    b->len = 0;
    return;
  }
  memmove(b->data, b->data + n, b->len - n);
  b->len -= n;
}

void fb_buf_reset(fb_buf_t *b) { b->len = 0; }

void fb_buf_free(fb_buf_t *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}
