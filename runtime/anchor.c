/* anchor.c: keeps Lua values alive for C: slots of one table (reached through the registry,
 * never a fixed stack index: a finalizer may run on the main state inside a C frame of its
 * own), recycled through a C free list. One table write per anchor or release, where
 * luaL_ref keeps its free list inside the table and costs three to five operations. */
#include "anchor.h"

#include <lauxlib.h>
#include <stdlib.h>

static struct {
  int ref;                /* registry ref of the anchor table */
  int *free_slots;        /* released slots, reused first */
  size_t nfree, free_cap;
  int max_slot;
  size_t live;            /* slots in use */
} A;

void fb_anchor_init(lua_State *L) {
  lua_newtable(L);
  A.ref = luaL_ref(L, LUA_REGISTRYINDEX);
  A.nfree = A.free_cap = A.live = 0;
  A.max_slot = 0;
  A.free_slots = NULL;
}

void fb_anchor_close(void) {
  free(A.free_slots);
  A.free_slots = NULL;
  A.nfree = A.free_cap = 0;
}

size_t fb_anchor_live(void) { return A.live; }

/* Pushes the anchor table onto L and returns its (absolute) index; the anchor functions take
 * it so that several operations share one registry lookup. */
int fb_anchors_push(lua_State *L) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, A.ref);
  return lua_gettop(L);
}

/* Pops the value on L's top into a free slot of the anchor table at index t. */
int fb_anchor(lua_State *L, int t) {
  int slot = A.nfree ? A.free_slots[--A.nfree] : ++A.max_slot;
  lua_rawseti(L, t, slot);
  A.live++;
  return slot;
}

void fb_unanchor(lua_State *L, int t, int slot) {
  if (slot == NO_SLOT) return;
  lua_pushnil(L);
  lua_rawseti(L, t, slot);
  A.live--;
  if (A.nfree == A.free_cap) {
    size_t ncap = A.free_cap ? A.free_cap * 2 : 1024;
    int *n = realloc(A.free_slots, ncap * sizeof *n);
    if (!n) return;          /* the slot number is lost, not the memory it held */
    A.free_slots = n;
    A.free_cap = ncap;
  }
  A.free_slots[A.nfree++] = slot;
}

/* Pushes what slot anchors (one lookup of its own). */
void fb_push_anchored(lua_State *L, int slot) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, A.ref);
  lua_rawgeti(L, -1, slot);
  lua_remove(L, -2);
}
