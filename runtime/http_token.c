/* http_token.c: request tokens. The framework's server (lua/fibril/server.lua) is handed each
 * request with a number that names it instead of a response userdata: token = gen * 2^20 +
 * slot, where slot indexes the table of open connections and gen counts the requests served
 * through that slot. A userdata per request costs LuaJIT's collector a walk over it in every
 * atomic phase (lj_gc_separateudata visits every userdata made since the last cycle, finalizer
 * or not), the largest part of its pauses under load: docs/benchmarks.md, "the latency tail".
 *
 * A token is valid while its request is the connection's current one: answering it
 * (fb_http_request_done) or closing the connection ends it, and from then on every call with
 * it answers "closed", as a detached response object does. A slot's generation repeats only
 * after 2^33 requests through that slot: a stale token names a later request only if it was
 * kept that long (docs/architecture.md, "Request tokens"). */
#include <lauxlib.h>
#include <stdlib.h>

#include "http_conn.h"

#define SLOT_BITS 20
#define SLOT_MAX (1u << SLOT_BITS)
#define GEN_MASK ((UINT64_C(1) << 33) - 1)

typedef struct {
  fb_http_conn_t *c;        /* the connection in this slot, or NULL when free */
  uint64_t gen;             /* the last generation handed out here (kept across connections) */
  uint32_t next_free;
} slot_t;

static struct {
  slot_t *slots;
  uint32_t n, cap;          /* slots in use at least once, and allocated */
  uint32_t free_head;       /* a free slot + 1, or 0 */
} T;

int fb_http_token_attach(fb_http_conn_t *c) {
  uint32_t i;
  if (T.free_head) {
    i = T.free_head - 1;
    T.free_head = T.slots[i].next_free;
  } else {
    if (T.n == T.cap) {
      uint32_t ncap = T.cap ? T.cap * 2 : 1024;
      slot_t *ns;
      if (T.n >= SLOT_MAX) return -1;
      if (ncap > SLOT_MAX) ncap = SLOT_MAX;
      if (!(ns = realloc(T.slots, ncap * sizeof *ns))) return -1;
      T.slots = ns;
      T.cap = ncap;
    }
    i = T.n++;
    T.slots[i].gen = 0;
  }
  T.slots[i].c = c;
  T.slots[i].next_free = 0;
  c->slot = i;
  c->token = 0;
  return 0;
}

void fb_http_token_detach(fb_http_conn_t *c) {
  slot_t *s;
  if (c->slot == FB_HTTP_NO_SLOT) return;
  s = &T.slots[c->slot];
  s->c = NULL;
  s->next_free = T.free_head;
  T.free_head = c->slot + 1;
  c->slot = FB_HTTP_NO_SLOT;
  c->token = 0;
}

uint64_t fb_http_token_begin(fb_http_conn_t *c) {
  slot_t *s = &T.slots[c->slot];
  s->gen = (s->gen + 1) & GEN_MASK;
  if (s->gen == 0) s->gen = 1;               /* token 0 means "no request" */
  c->token = (s->gen << SLOT_BITS) | c->slot;
  return c->token;
}

fb_http_conn_t *fb_http_token_conn(uint64_t token) {
  uint32_t i = (uint32_t)(token & (SLOT_MAX - 1));
  fb_http_conn_t *c;
  if (token == 0 || i >= T.n || !(c = T.slots[i].c) || c->token != token) return NULL;
  return c;
}

fb_http_conn_t *fb_http_check_token(lua_State *L, int idx) {
  lua_Number n = lua_tonumber(L, idx);
  if (lua_type(L, idx) != LUA_TNUMBER)
    luaL_error(L, "http: expected a request token, got %s", luaL_typename(L, idx));
  if (!(n >= 0 && n < 9007199254740992.0) || n != (lua_Number)(uint64_t)n)
    luaL_error(L, "http: expected a request token, got %f", n);
  return fb_http_token_conn((uint64_t)n);
}

void fb_http_token_shutdown(void) {
  free(T.slots);
  T.slots = NULL;
  T.n = T.cap = T.free_head = 0;
}
