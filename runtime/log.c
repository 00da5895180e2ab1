/* log.c: key=value log lines on stderr, one event per line. A value never spans lines:
 * CR, LF and control bytes are escaped by fb_log_quote. */
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static const char *level_names[] = { "debug", "info", "warn", "error" };

void fb_log(fb_log_level_t level, const char *sub, const char *fmt, ...) {
  struct timeval tv;
  struct tm tm;
  char ts[32];
  va_list ap;

  gettimeofday(&tv, NULL);
  gmtime_r(&tv.tv_sec, &tm);
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  /* One fprintf-family call per part, under one stdio lock, so lines never interleave. */
  flockfile(stderr);
  fprintf(stderr, "ts=%s.%03dZ level=%s sub=%s ", ts, (int)(tv.tv_usec / 1000),
          level_names[level], sub);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  funlockfile(stderr);
  fflush(stderr);
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
