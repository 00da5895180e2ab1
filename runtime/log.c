/* log.c: key=value log lines on stderr, one event per line. A value never spans lines:
 * CR, LF and control bytes are escaped by fb_log_quote. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static const char *level_names[] = { "debug", "info", "warn", "error" };

static void log_line(fb_log_level_t level, const char *sub, const char *fmt, va_list ap) {
  struct timeval tv;
  struct tm tm;
  char ts[32];

  gettimeofday(&tv, NULL);
  gmtime_r(&tv.tv_sec, &tm);
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  /* One fprintf-family call per part, under one stdio lock, so lines never interleave. */
  flockfile(stderr);
  fprintf(stderr, "ts=%s.%03dZ level=%s sub=%s ", ts, (int)(tv.tv_usec / 1000),
          level_names[level], sub);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  funlockfile(stderr);
  fflush(stderr);
}

void fb_log(fb_log_level_t level, const char *sub, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  log_line(level, sub, fmt, ap);
  va_end(ap);
}

int fb_log_limit_take(fb_log_limit_t *lim, long now, unsigned max, unsigned *dropped) {
  if (now != lim->second) {
    lim->second = now;
    lim->used = 0;
  }
  if (lim->used >= max) {
    lim->dropped++;
    return 0;
  }
  lim->used++;
  *dropped = lim->dropped;
  lim->dropped = 0;
  return 1;
}

void fb_log_limited(fb_log_limit_t *lim, unsigned max, fb_log_level_t level, const char *sub,
                    const char *fmt, ...) {
  unsigned dropped;
  va_list ap;
  if (!fb_log_limit_take(lim, (long)time(NULL), max, &dropped)) return;
  if (dropped) fb_log(level, sub, "reason=log_limited dropped=%u max_per_second=%u", dropped, max);
  va_start(ap, fmt);
  log_line(level, sub, fmt, ap);
  va_end(ap);
}

char *fb_log_quote(char *dst, size_t cap, const char *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  size_t o = 0, i;

  if (cap < 8) {   /* room for at least `"..."` and the NUL */
    if (cap) dst[0] = '\0';
    return dst;
  }
  dst[o++] = '"';
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    char esc[4];
    size_t n = 0;
    if (c == '"' || c == '\\') { esc[n++] = '\\'; esc[n++] = (char)c; }
    else if (c == '\n') { esc[n++] = '\\'; esc[n++] = 'n'; }
    else if (c == '\r') { esc[n++] = '\\'; esc[n++] = 'r'; }
    else if (c == '\t') { esc[n++] = '\\'; esc[n++] = 't'; }
    else if (c < 0x20 || c == 0x7f) {
      esc[n++] = '\\'; esc[n++] = 'x'; esc[n++] = hex[c >> 4]; esc[n++] = hex[c & 15];
    } else esc[n++] = (char)c;
    if (o + n + 5 > cap) {   /* keep room for `..."` + NUL */
      memcpy(dst + o, "...", 3);
      o += 3;
      break;
    }
    memcpy(dst + o, esc, n);
    o += n;
  }
  dst[o++] = '"';
  dst[o] = '\0';
  return dst;
}
