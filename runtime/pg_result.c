/* pg_result.c: PGresults to Lua values (docs/postgres.md has the types table). Numbers,
 * booleans and bytea are converted here; json and arrays are only marked in `post`, since
 * decoding them calls Lua code, which lua/fibril/pg does after the fiber resumes. */
#include "pg_result.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#define EXACT_INT_MAX (1LL << 53)   /* larger int8 values come back as decimal strings */

enum {
  OID_BOOL = 16, OID_BYTEA = 17, OID_INT8 = 20, OID_INT2 = 21, OID_INT4 = 23, OID_OID = 26,
  OID_JSON = 114, OID_FLOAT4 = 700, OID_FLOAT8 = 701, OID_JSONB = 3802
};

/* Columns whose text Lua finishes: json, jsonb and arrays of the types lua/fibril/pg/types.lua
 * parses (elements converted as the scalar types above; others stay strings). */
static int needs_post(Oid t) {
  switch (t) {
  case OID_JSON: case OID_JSONB:
  case 1000: case 1001: case 1005: case 1007: case 1009: case 1015: case 1016: case 1021:
  case 1022: case 1231: case 199: case 3807: case 1014: case 1003: case 1028: case 1115:
  case 1185: case 1182: case 2951:
    return 1;
  default:
    return 0;
  }
}

void fb_pg_first_line(char *dst, size_t cap, const char *msg) {
  size_t n = 0;
  if (!msg) msg = "";
  while (msg[n] && msg[n] != '\n' && n + 1 < cap) n++;
  memcpy(dst, msg, n);
  dst[n] = '\0';
}

void fb_pg_rows_begin(lua_State *co, const PGresult *res) {
  int n = PQnfields(res), j, post = 0;
  lua_checkstack(co, 6);
  lua_newtable(co);                          /* stack: rows */
  lua_createtable(co, n, 0);                 /* stack: rows names */
  for (j = 0; j < n; j++) {
    lua_pushstring(co, PQfname(res, j));
    lua_rawseti(co, -2, j + 1);
    if (needs_post(PQftype(res, j))) post = 1;
  }
  if (!post) {
    lua_pushnil(co);                         /* stack: rows names nil */
    return;
  }
  lua_newtable(co);                          /* stack: rows names post */
  for (j = 0; j < n; j++) {
    Oid t = PQftype(res, j);
    if (!needs_post(t)) continue;
    lua_pushstring(co, PQfname(res, j));
    lua_pushnumber(co, (lua_Number)t);
    lua_rawset(co, -3);
  }
}

static int hexval(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* bytea in the server's default hex output ("\x0001ff"); the old escape format goes
 * through libpq. Pushes the bytes, or the text as is when it is malformed. */
static void push_bytea(lua_State *co, const char *v, size_t len) {
  if (len >= 2 && v[0] == '\\' && v[1] == 'x' && len % 2 == 0) {
    size_t n = (len - 2) / 2, i;
    luaL_Buffer b;
    luaL_buffinit(co, &b);
    for (i = 0; i < n; i++) {
      int hi = hexval((unsigned char)v[2 + 2 * i]), lo = hexval((unsigned char)v[3 + 2 * i]);
      if (hi < 0 || lo < 0) break;
      luaL_addchar(&b, (char)(hi * 16 + lo));
    }
    luaL_pushresult(&b);
    if (i == n) return;
    lua_pop(co, 1);
  } else {
    size_t n;
    unsigned char *raw = PQunescapeBytea((const unsigned char *)v, &n);
    if (raw) {
      lua_pushlstring(co, (const char *)raw, n);
      PQfreemem(raw);
      return;
    }
  }
  lua_pushlstring(co, v, len);
}

static void push_value(lua_State *co, Oid type, const char *v, size_t len) {
  char *end;
  switch (type) {
  case OID_INT2: case OID_INT4: case OID_OID: case OID_FLOAT4: case OID_FLOAT8: {
    double d = strtod(v, &end);              /* also "NaN", "Infinity", "-Infinity" */
    if (end == v + len) lua_pushnumber(co, d);
    else lua_pushlstring(co, v, len);
    break;
  }
  case OID_INT8: {
    long long i = strtoll(v, &end, 10);
    if (end == v + len && i >= -EXACT_INT_MAX && i <= EXACT_INT_MAX)
      lua_pushnumber(co, (lua_Number)i);
    else
      lua_pushlstring(co, v, len);           /* a double would round it: keep every digit */
    break;
  }
  case OID_BOOL:
    lua_pushboolean(co, len > 0 && v[0] == 't');
    break;
  case OID_BYTEA:
    push_bytea(co, v, len);
    break;
  default:                                   /* text, numeric, timestamps, json (post) ... */
    lua_pushlstring(co, v, len);
  }
}

size_t fb_pg_row_push(lua_State *co, const PGresult *res, int row) {
  int n = PQnfields(res), j;
  size_t bytes = 0;
  lua_checkstack(co, 4);
  lua_createtable(co, 0, n);                 /* stack: rows names post row */
  for (j = 0; j < n; j++) {
    lua_rawgeti(co, -3, j + 1);              /* stack: ... row name */
    if (PQgetisnull(res, row, j)) {
      lua_pushlightuserdata(co, NULL);
    } else {
      size_t len = (size_t)PQgetlength(res, row, j);
      push_value(co, PQftype(res, j), PQgetvalue(res, row, j), len);
      bytes += len;
    }
    bytes += 16;                             /* a field costs something even when empty */
    lua_rawset(co, -3);
  }
  lua_rawseti(co, -4, (int)lua_objlen(co, -4) + 1);
  return bytes;
}

static void set_field(lua_State *co, const PGresult *res, int code, const char *key) {
  const char *v = PQresultErrorField(res, code);
  if (!v) return;
  lua_pushstring(co, v);
  lua_setfield(co, -2, key);
}

int fb_pg_error_push(lua_State *co, const PGresult *res, const char *fallback) {
  const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
  const char *pos = res ? PQresultErrorField(res, PG_DIAG_STATEMENT_POSITION) : NULL;
  char line[512];
  lua_checkstack(co, 6);
  lua_pushnil(co);
  if (primary) {
    lua_pushstring(co, primary);
  } else {
    fb_pg_first_line(line, sizeof line, res ? PQresultErrorMessage(res) : fallback);
    lua_pushstring(co, line[0] ? line : (fallback ? fallback : "query failed"));
  }
  lua_pushliteral(co, "pg_error");
  lua_newtable(co);                          /* stack: nil msg code fields */
  if (res) {
    set_field(co, res, PG_DIAG_SQLSTATE, "sqlstate");
    set_field(co, res, PG_DIAG_SEVERITY_NONLOCALIZED, "severity");
    set_field(co, res, PG_DIAG_MESSAGE_DETAIL, "detail");
    set_field(co, res, PG_DIAG_MESSAGE_HINT, "hint");
    set_field(co, res, PG_DIAG_CONTEXT, "where");
    set_field(co, res, PG_DIAG_SCHEMA_NAME, "schema");
    set_field(co, res, PG_DIAG_TABLE_NAME, "table");
    set_field(co, res, PG_DIAG_COLUMN_NAME, "column");
    set_field(co, res, PG_DIAG_DATATYPE_NAME, "datatype");
    set_field(co, res, PG_DIAG_CONSTRAINT_NAME, "constraint");
    if (pos) {
      lua_pushnumber(co, atoi(pos));
      lua_setfield(co, -2, "position");
    }
  }
  return 4;
}
