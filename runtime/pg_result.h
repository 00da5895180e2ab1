/* pg_result.h: PGresults to Lua values, for runtime/pg.c only. Rows are built one at a time
 * (single-row mode) onto the waiting fiber's thread, so a result never has to be held whole
 * by libpq, and its size is counted against a bound as it arrives. */
#ifndef FB_PG_RESULT_H
#define FB_PG_RESULT_H

#include <libpq-fe.h>
#include <lua.h>
#include <stddef.h>

/* With stack [rows names post] on co (from fb_pg_rows_begin), appends row `row` of res as a
 * table keyed by column name; SQL NULL is the NULL lightuserdata (pg.null). Returns the
 * bytes the row's values took on the wire, for the caller's bound. */
size_t fb_pg_row_push(lua_State *co, const PGresult *res, int row);
/* Pushes rows (empty), names (column names by number) and post (a table column name ->
 * type oid for the columns Lua must finish: json, jsonb and arrays; or nil). */
void fb_pg_rows_begin(lua_State *co, const PGresult *res);
/* Pushes nil, message, "pg_error", fields (sqlstate, severity, detail, hint, position...). */
int fb_pg_error_push(lua_State *co, const PGresult *res, const char *fallback);
/* The first line of a libpq message (they end in "\n", some carry a second line). */
void fb_pg_first_line(char *dst, size_t cap, const char *msg);

#endif
