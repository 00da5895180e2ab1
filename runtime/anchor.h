/* anchor.h: anchoring Lua values for C code (slots of one table, a C free list of slots). */
#ifndef FB_ANCHOR_H
#define FB_ANCHOR_H

#include <lua.h>
#include <stddef.h>

#define NO_SLOT 0   /* a slot number that anchors nothing */

void fb_anchor_init(lua_State *L);
void fb_anchor_close(void);
/* Pushes the anchor table onto L and returns its absolute index, so that several anchor
 * operations share one registry lookup. */
int fb_anchors_push(lua_State *L);
/* Pops the value on L's top into a free slot of the anchor table at index t; returns it. */
int fb_anchor(lua_State *L, int t);
/* Releases slot (NO_SLOT is ignored). */
void fb_unanchor(lua_State *L, int t, int slot);
/* Pushes what slot anchors. */
void fb_push_anchored(lua_State *L, int slot);
/* Slots in use, for fibril.debug.live(). */
size_t fb_anchor_live(void);

#endif
