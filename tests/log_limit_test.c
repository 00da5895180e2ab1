/* log_limit_test.c: fb_log_limit_take, the rate limit of the warn lines a client can cause. */
#include <stdio.h>

#include "log.h"

static int failures;

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      failures++;                                                       \
    }                                                                   \
  } while (0)

int main(void) {
  fb_log_limit_t lim = { 0, 0, 0 };
  unsigned dropped = 99, i, taken = 0;

  for (i = 0; i < 5; i++) taken += (unsigned)fb_log_limit_take(&lim, 100, 3, &dropped);
  CHECK(taken == 3);                    /* three in second 100, two dropped */
  CHECK(lim.dropped == 2);
  CHECK(fb_log_limit_take(&lim, 101, 3, &dropped) == 1);
  CHECK(dropped == 2);                  /* the first line of the next second reports them */
  CHECK(fb_log_limit_take(&lim, 101, 3, &dropped) == 1 && dropped == 0);
  CHECK(fb_log_limit_take(&lim, 101, 3, &dropped) == 1 && dropped == 0);
  CHECK(fb_log_limit_take(&lim, 101, 3, &dropped) == 0);
  for (i = 0; i < 1000; i++) fb_log_limit_take(&lim, 101, 3, &dropped);
  CHECK(fb_log_limit_take(&lim, 250, 3, &dropped) == 1 && dropped == 1001);   /* a later second */
  if (failures) return 1;
  printf("log_limit_test: ok\n");
  return 0;
}
