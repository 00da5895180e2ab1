/* journal.h: durable appends for the deferred-task journal (Lua module fibril.core.journal,
 * used by lua/fibril/deferred/journal.lua). The journal struct stays opaque in journal.c. */
#ifndef FB_JOURNAL_H
#define FB_JOURNAL_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>

typedef struct fb_journal_s fb_journal_t;

/* CRC-32 (IEEE) of len bytes, continuing crc (0 to start): each record's checksum. */
uint32_t fb_journal_crc32(uint32_t crc, const void *data, size_t len);
/* Open journals plus operations in flight: back to its old value when nothing leaks. */
size_t fb_journal_live(void);

int luaopen_fibril_core_journal(lua_State *L);

#endif
