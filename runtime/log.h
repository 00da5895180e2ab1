/* log.h: one event per line, key=value, to stderr (see docs/architecture.md, "Logging"). */
#ifndef FB_LOG_H
#define FB_LOG_H

#include <stddef.h>

typedef enum { FB_DEBUG = 0, FB_INFO, FB_WARN, FB_ERROR } fb_log_level_t;

/* Writes "ts=... level=... sub=SUB " followed by the formatted pairs and a newline.
 * Values that may hold spaces or newlines must go through fb_log_quote first. */
void fb_log(fb_log_level_t level, const char *sub, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

/* A rate limit for lines a peer can cause (one per bad request): at most max a second
 * through one limiter; the rest are dropped and counted, and the first line let through in
 * a later second is preceded by one saying how many were dropped. */
typedef struct {
  long second;
  unsigned used, dropped;
} fb_log_limit_t;

void fb_log_limited(fb_log_limit_t *lim, unsigned max, fb_log_level_t level, const char *sub,
                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* The decision alone: 1 when a line may be written at time now (seconds); *dropped then
 * holds the lines dropped since the last one written (and is reset). */
int fb_log_limit_take(fb_log_limit_t *lim, long now, unsigned max, unsigned *dropped);

/* Quotes and escapes len bytes of s (", \, CR, LF, control bytes) into dst, always
 * NUL-terminated; cuts with "..." when dst is too small. Returns dst. */
char *fb_log_quote(char *dst, size_t cap, const char *s, size_t len);

#endif
