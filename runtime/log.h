/* log.h: one event per line, key=value, to stderr (see docs/architecture.md, "Logging"). */
#ifndef FB_LOG_H
#define FB_LOG_H

#include <stddef.h>

typedef enum { FB_DEBUG = 0, FB_INFO, FB_WARN, FB_ERROR } fb_log_level_t;

/* Writes "ts=... level=... sub=SUB " followed by the formatted pairs and a newline.
 * Values that may hold spaces or newlines must go through fb_log_quote first. */
void fb_log(fb_log_level_t level, const char *sub, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

/* Quotes and escapes len bytes of s (", \, CR, LF, control bytes) into dst, always
 * NUL-terminated; cuts with "..." when dst is too small. Returns dst. */
char *fb_log_quote(char *dst, size_t cap, const char *s, size_t len);

#endif
