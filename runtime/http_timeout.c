/* http_timeout.c: the HTTP server's timeouts. A connection has one deadline at a time (header,
 * body, keep-alive or send, by its state) and one uv timer, moved only when a deadline comes
 * earlier than the one it is armed for: a keep-alive request sets three deadlines and most
 * requests touch libuv's timer heap not at all. A timer firing early re-arms for the rest. */
#include "http_conn.h"
#include "log.h"

static void on_deadline(fb_http_conn_t *c) {
  uint64_t now = uv_now(c->tcp.loop);
  switch (c->state) {
  case CS_IDLE:                    /* idle keep-alive, or a response the client never read */
    if (c->write_queued)
      HTTP_WARN("conn=%u reason=send_timeout queued=%zu", c->id, c->write_queued);
    fb_http_conn_close(c);
    break;
  case CS_HEAD:
  case CS_BODY:
    HTTP_WARN("conn=%u reason=%s status=408", c->id,
           c->state == CS_HEAD ? "header_timeout"
           : c->body_due && now >= c->body_due ? "body_deadline" : "body_timeout");
    fb_http_send_error(c, 408);
    break;
  case CS_DISPATCHED:
  case CS_CLOSING:                 /* armed only while response bytes are stuck */
    HTTP_WARN("conn=%u reason=send_timeout queued=%zu", c->id, c->write_queued);
    fb_http_conn_close(c);
    break;
  }
}

/* The timer fires at timer_due; the deadline may have moved later since (or gone): then it
 * only re-arms for the rest. */
static void on_timer(uv_timer_t *t) {
  fb_http_conn_t *c = t->data;
  uint64_t now = uv_now(t->loop);
  c->timer_due = 0;
  if (c->deadline == 0) return;
  if (now < c->deadline) {
    uv_timer_start(&c->timer, on_timer, c->deadline - now, 0);
    c->timer_due = c->deadline;
    return;
  }
  c->deadline = 0;
  on_deadline(c);
}

void fb_http_arm_timer(fb_http_conn_t *c, uint64_t ms) {
  uint64_t due;
  if (ms == 0) {
    c->deadline = 0;
    return;
  }
  due = uv_now(c->timer.loop) + ms;
  c->deadline = due;
  if (c->timer_due == 0 || due < c->timer_due) {
    uv_timer_start(&c->timer, on_timer, ms, 0);
    c->timer_due = due;
  }
}

void fb_http_arm_body_timer(fb_http_conn_t *c) {
  uint64_t ms = c->srv->limits.body_timeout_ms;
  if (c->body_due) {
    uint64_t now = uv_now(c->timer.loop);
    uint64_t left = c->body_due > now ? c->body_due - now : 1;   /* 1: due now, fire next turn */
    if (ms == 0 || left < ms) ms = left;
  }
  fb_http_arm_timer(c, ms);
}

void fb_http_write_progress(fb_http_conn_t *c) {
  fb_http_limits_t *lim = &c->srv->limits;
  if (c->closes) return;
  switch (c->state) {
  case CS_IDLE:
    fb_http_arm_timer(c, c->write_queued ? lim->send_timeout_ms : lim->keepalive_timeout_ms);
    break;
  case CS_DISPATCHED:              /* the handler runs as long as it likes; a stuck client not */
  case CS_CLOSING:
    fb_http_arm_timer(c, c->write_queued ? lim->send_timeout_ms : 0);
    break;
  default:                         /* reading a request: its own timer applies */
    break;
  }
}
