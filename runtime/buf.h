/* buf.h: a growable byte buffer with a hard maximum: an append past max fails with FB_ELIMIT
 * and changes nothing, so a network peer can never make a buffer grow without bound. */
#ifndef FB_BUF_H
#define FB_BUF_H

#include <stddef.h>
#include <string.h>

#define FB_ELIMIT (-1)   /* the append would pass the buffer's max */
#define FB_ENOMEM (-2)

typedef struct {
  char *data;
  size_t len, cap, max;
} fb_buf_t;

void fb_buf_init(fb_buf_t *b, size_t max);
/* The growing path of fb_buf_append. */
int fb_buf_append_grow(fb_buf_t *b, const char *p, size_t n);

/* Appends n bytes; returns 0, FB_ELIMIT (len + n > max) or FB_ENOMEM. Inline: a response
 * head is a dozen small appends that nearly always fit. (cap may pass max: the first
 * allocation is 256 bytes, so both are checked.) */
static inline int fb_buf_append(fb_buf_t *b, const char *p, size_t n) {
  if (b->data && n <= b->cap - b->len && n <= b->max - b->len) {
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
  }
  return fb_buf_append_grow(b, p, n);
}
/* Drops the first n bytes (n <= len), keeping the rest. */
void fb_buf_consume(fb_buf_t *b, size_t n);
void fb_buf_reset(fb_buf_t *b);   /* len = 0, memory kept */
void fb_buf_free(fb_buf_t *b);    /* memory released; usable again after fb_buf_init */

#endif
