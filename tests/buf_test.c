/* buf_test.c: fb_buf's limits. The inline fast path of fb_buf_append must refuse what passes
 * max even while the allocation (256 bytes at first) has room. */
#include <stdio.h>
#include <string.h>

#include "buf.h"

static int failures;

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      failures++;                                                       \
    }                                                                   \
  } while (0)

static void test_small_max(void) {
  fb_buf_t b;
  fb_buf_init(&b, 10);
  CHECK(fb_buf_append(&b, "12345678", 8) == 0);
  CHECK(fb_buf_append(&b, "123", 3) == FB_ELIMIT);   /* 11 > 10, though cap is 256 */
  CHECK(b.len == 8);                                   /* a refused append changes nothing */
  CHECK(fb_buf_append(&b, "12", 2) == 0);
  CHECK(b.len == 10 && memcmp(b.data, "1234567812", 10) == 0);
  CHECK(fb_buf_append(&b, "x", 1) == FB_ELIMIT);
  CHECK(fb_buf_append(&b, "", 0) == 0);
  fb_buf_free(&b);
}

static void test_growth_and_consume(void) {
  fb_buf_t b;
  char chunk[1000];
  int i;
  memset(chunk, 'a', sizeof chunk);
  fb_buf_init(&b, 1 << 20);
  for (i = 0; i < 100; i++) CHECK(fb_buf_append(&b, chunk, sizeof chunk) == 0);
  CHECK(b.len == 100000 && b.cap >= b.len && b.cap <= b.max);
  fb_buf_consume(&b, 99990);
  CHECK(b.len == 10 && b.data[0] == 'a');
  fb_buf_reset(&b);
  CHECK(b.len == 0);
  CHECK(fb_buf_append(&b, chunk, 0) == 0 && b.len == 0);
  fb_buf_free(&b);
  CHECK(b.data == NULL && b.cap == 0);
}

static void test_exact_max(void) {
  fb_buf_t b;
  char big[4096];
  memset(big, 'b', sizeof big);
  fb_buf_init(&b, 4096);
  CHECK(fb_buf_append(&b, big, 4096) == 0);
  CHECK(fb_buf_append(&b, big, 1) == FB_ELIMIT);
  fb_buf_consume(&b, 4096);
  CHECK(fb_buf_append(&b, big, 4096) == 0);
  fb_buf_free(&b);
}

int main(void) {
  test_small_max();
  test_growth_and_consume();
  test_exact_max();
  if (failures) return 1;
  printf("buf_test: ok\n");
  return 0;
}
