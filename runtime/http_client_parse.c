/* http_client_parse.c: HTTP responses through llhttp (response mode, strict build): heads
 * gathered into a bounded buffer with at most HC_MAX_HEADERS lines, bodies counted against
 * max_body, 1xx interim responses skipped, and parsing paused after each response so bytes
 * the server sends beyond it mark the connection as not reusable. */
#include <ctype.h>
#include <lua.h>
#include <string.h>

#include "http_client_conn.h"

static llhttp_settings_t settings;
static int settings_ready;

static int on_message_begin(llhttp_t *p) {
  conn_t *c = p->data;
  fb_buf_reset(&c->head);
  c->nspans = 0;
  c->in_field = 0;
  return 0;
}

static int head_append(conn_t *c, const char *at, size_t len) {
  if (fb_buf_append(&c->head, at, len) == 0) return 0;
  fb_hc_fail(c, "header_too_large", "response head larger than %u bytes", (unsigned)c->head.max);
  return -1;
}

static int on_status(llhttp_t *p, const char *at, size_t len) {
  return head_append(p->data, at, len);   /* not kept, but counted against the limit */
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  conn_t *c = p->data;
  if (!c->in_field) {
    if (c->nspans == HC_MAX_HEADERS) {
      fb_hc_fail(c, "header_too_large", "more than %d header lines", HC_MAX_HEADERS);
      return -1;
    }
    c->spans[c->nspans].name_off = (uint32_t)c->head.len;
    c->spans[c->nspans].name_len = 0;
    c->in_field = 1;
  }
  c->spans[c->nspans].name_len += (uint32_t)len;
  return head_append(c, at, len);
}

static int on_header_field_complete(llhttp_t *p) {
  conn_t *c = p->data;
  c->spans[c->nspans].value_off = (uint32_t)c->head.len;
  c->spans[c->nspans].value_len = 0;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  conn_t *c = p->data;
  c->spans[c->nspans].value_len += (uint32_t)len;
  return head_append(c, at, len);
}

static int on_header_value_complete(llhttp_t *p) {
  conn_t *c = p->data;
  c->nspans++;
  c->in_field = 0;
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  conn_t *c = p->data;
  if (p->status_code == 101) {
    fb_hc_fail(c, "protocol", "the server switched protocols (101), which fibril.http does not support");
    return -1;
  }
  if (p->status_code < 200) return 0;          /* 100 Continue and friends: skipped */
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > c->max_body) {
    fb_hc_fail(c, "body_too_large", "response body of %llu bytes is over max_body (%llu)",
              (unsigned long long)p->content_length, (unsigned long long)c->max_body);
    return -1;
  }
  c->head_ready = 1;
  return c->head_only ? 1 : 0;                 /* a response to HEAD has no body */
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  conn_t *c = p->data;
  c->body_total += len;
  if (c->body_total > c->max_body) {
    fb_hc_fail(c, "body_too_large", "response body is over max_body (%llu bytes)",
              (unsigned long long)c->max_body);
    return -1;
  }
  if (fb_buf_append(&c->body, at, len) != 0) {  /* the read-ahead bound: cannot happen */
    fb_hc_fail(c, "protocol", "body buffer overflow");
    return -1;
  }
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  conn_t *c = p->data;
  if (p->status_code < 200) return 0;          /* the final response follows */
  c->done = 1;
  c->active = 0;
  c->keepalive = (unsigned char)llhttp_should_keep_alive(p);
  return HPE_PAUSED;                           /* stop: anything after it is stray */
}

void fb_hc_parse(conn_t *c, const char *data, size_t n) {
  llhttp_errno_t rc;
  if (n == 0 || c->err_code) return;
  if (!c->active) {
    c->stray = 1;                 /* a server talking out of turn: never reuse this one */
    return;
  }
  c->received += n;
  rc = llhttp_execute(&c->parser, data, n);
  if (rc == HPE_PAUSED) {
    if (llhttp_get_error_pos(&c->parser) != data + n) c->stray = 1;
  } else if (rc != HPE_OK && !c->err_code) {
    fb_hc_fail(c, "protocol", "invalid response: %s", llhttp_get_error_reason(&c->parser));
  }
}

/* Pushes status and the headers as a table of lowercased names; a repeated header's values
 * are joined with ", " (Set-Cookie's with "\n": its values may contain commas). */
void fb_hc_push_head(lua_State *L, conn_t *c) {
  int i;
  lua_checkstack(L, 8);
  lua_pushinteger(L, c->parser.status_code);
  lua_createtable(L, 0, c->nspans);
  for (i = 0; i < c->nspans; i++) {
    span_t *sp = &c->spans[i];
    char *name = c->head.data + sp->name_off;
    uint32_t k;
    for (k = 0; k < sp->name_len; k++) name[k] = (char)tolower((unsigned char)name[k]);
    lua_pushlstring(L, name, sp->name_len);   /* stack: headers name */
    lua_pushvalue(L, -1);
    lua_rawget(L, -3);                        /* stack: headers name previous */
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushlstring(L, c->head.data + sp->value_off, sp->value_len);
    } else {
      int cookie = sp->name_len == 10 && memcmp(name, "set-cookie", 10) == 0;
      lua_pushstring(L, cookie ? "\n" : ", ");
      lua_pushlstring(L, c->head.data + sp->value_off, sp->value_len);
      lua_concat(L, 3);
    }
    lua_rawset(L, -3);
  }
}

int fb_hc_finish(conn_t *c) {
  llhttp_finish(&c->parser);
  return c->done;
}

void fb_hc_parser_init(conn_t *c) {
  if (!settings_ready) {
    llhttp_settings_init(&settings);
    settings.on_message_begin = on_message_begin;
    settings.on_status = on_status;
    settings.on_header_field = on_header_field;
    settings.on_header_field_complete = on_header_field_complete;
    settings.on_header_value = on_header_value;
    settings.on_header_value_complete = on_header_value_complete;
    settings.on_headers_complete = on_headers_complete;
    settings.on_body = on_body;
    settings.on_message_complete = on_message_complete;
    settings_ready = 1;
  }
  llhttp_init(&c->parser, HTTP_RESPONSE, &settings);
  c->parser.data = c;
}
