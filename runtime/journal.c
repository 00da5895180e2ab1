/* journal.c: durable appends for the deferred-task journal (lua/fibril/deferred/journal.lua).
 * Writes, fdatasync and the compaction rewrite run on libuv's thread pool, one operation per
 * journal at a time, so the loop never blocks on the disk. A failed append is cut back off
 * the file (ftruncate), so a record is either whole on disk or absent. Records are checksummed
 * with fb_journal_crc32 (exported for spec/runtime/journal_spec.lua via ffi). */
#include "journal.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "fiber.h"

#define JOURNAL_MT "fibril.journal"
#define JOURNAL_WRITE_MAX (64u << 20)   /* one batch: bounded, the Lua side batches below it */

struct fb_journal_s {
  int fd;
  int busy;                 /* an operation is on the pool: the next one must wait for it */
  int closing;              /* closed from Lua while busy: the op's callback frees it */
  char *path;               /* owned: the rewrite renames path.tmp over it */
};

typedef struct { fb_journal_t *j; } box_t;    /* the userdata; j is NULL once closed */

typedef enum { OP_APPEND, OP_SYNC, OP_REWRITE } op_kind_t;

typedef struct jop_s {
  uv_work_t work;           /* work.data points back here */
  fb_fiber_t *fiber;        /* NULL once detached: the callback then only frees */
  fb_journal_t *j;
  op_kind_t kind;
  int sync;                 /* OP_APPEND: fdatasync after the write */
  char *data;               /* owned: a copy of the bytes, freed with the op */
  size_t len;
  int new_fd;               /* OP_REWRITE: the rewritten file, now the journal's fd */
  int err;                  /* errno of the first failure, 0 on success */
  const char *what;         /* the call that failed ("write", "fdatasync", "rename") */
  struct jop_s *next, *prev;
} jop_t;

static struct {
  jop_t *pending;           /* in flight: detached at lua_close */
  size_t live_journals, live_ops;
} J;

size_t fb_journal_live(void) { return J.live_journals + J.live_ops; }

/* ---- CRC-32 (IEEE, reflected 0xEDB88320), table built once ----------------------------- */

static uint32_t crc_table[256];

static void crc_init(void) {
  uint32_t i, k, c;
  for (i = 0; i < 256; i++) {
    c = i;
    for (k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    crc_table[i] = c;
  }
}

uint32_t fb_journal_crc32(uint32_t crc, const void *data, size_t len) {
  const unsigned char *p = data;
  if (crc_table[1] == 0) crc_init();
  crc = ~crc;
  while (len--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return ~crc;
}

/* ---- the thread-pool side: plain POSIX calls, no Lua ----------------------------------- */

static int write_all(int fd, const char *p, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

static void fail(jop_t *op, const char *what, int err) {
  if (!op->err) {
    op->err = err;
    op->what = what;
  }
}

static void do_append(jop_t *op) {
  int fd = op->j->fd, rc;
  off_t start = lseek(fd, 0, SEEK_END);
  if (start < 0) return fail(op, "lseek", errno);
  if ((rc = write_all(fd, op->data, op->len)) != 0) {
    /* Cut a partial record off, so the next append does not glue onto it. */
    if (ftruncate(fd, start) != 0) { /* the reader's checksum still rejects the torn bytes */ }
    return fail(op, "write", rc);
  }
  if (op->sync && fdatasync(fd) != 0) fail(op, "fdatasync", errno);
}

/* Writes data to path.tmp, syncs it, renames it over path and syncs the directory, so a crash
 * leaves either the old journal or the new one, whole. */
static void do_rewrite(jop_t *op) {
  const char *path = op->j->path;
  size_t plen = strlen(path);
  char *tmp = malloc(plen + 5), *dir, *slash;
  int fd, dfd, rc;
  if (!tmp) return fail(op, "malloc", ENOMEM);
  memcpy(tmp, path, plen);
  memcpy(tmp + plen, ".tmp", 5);
  fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    fail(op, "open", errno);
    free(tmp);
    return;
  }
  if ((rc = write_all(fd, op->data, op->len)) != 0) fail(op, "write", rc);
  else if (fdatasync(fd) != 0) fail(op, "fdatasync", errno);
  else if (rename(tmp, path) != 0) fail(op, "rename", errno);
  if (op->err) {
    close(fd);
    unlink(tmp);
    free(tmp);
    return;
  }
  free(tmp);
  op->new_fd = fd;
  if ((dir = strdup(path)) != NULL) {      /* the rename is durable once the directory is */
    slash = strrchr(dir, '/');
    if (slash) *(slash == dir ? slash + 1 : slash) = '\0';
    dfd = open(slash ? dir : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      if (fsync(dfd) != 0) fail(op, "fsync", errno);
      close(dfd);
    }
    free(dir);
  }
}

static void on_work(uv_work_t *w) {
  jop_t *op = w->data;
  switch (op->kind) {
  case OP_APPEND: do_append(op); break;
  case OP_SYNC: if (fdatasync(op->j->fd) != 0) fail(op, "fdatasync", errno); break;
  case OP_REWRITE: do_rewrite(op); break;
  }
}

/* ---- the loop side ---------------------------------------------------------------------- */

static void journal_free(fb_journal_t *j) {
  if (j->fd >= 0) close(j->fd);
  free(j->path);
  free(j);
  J.live_journals--;
}

static void op_free(jop_t *op) {
  if (op->prev) op->prev->next = op->next;
  else J.pending = op->next;
  if (op->next) op->next->prev = op->prev;
  free(op->data);
  free(op);
  J.live_ops--;
}

static void op_cancel(fb_fiber_t *f, void *data) {
  jop_t *op = data;
  (void)f;
  op->fiber = NULL;         /* the write goes on (it cannot be taken back); nobody waits */
}

static void on_after(uv_work_t *w, int status) {
  jop_t *op = w->data;
  fb_journal_t *j = op->j;
  fb_fiber_t *f = op->fiber;
  lua_State *co;
  if (status == UV_ECANCELED) fail(op, "queue", ECANCELED);
  if (op->kind == OP_REWRITE && op->new_fd >= 0) {
    close(j->fd);            /* the old inode: renamed over, nothing more goes to it */
    j->fd = op->new_fd;
  }
  j->busy = 0;
  if (j->closing) journal_free(j);
  if (f) {
    co = fb_fiber_thread(f);
    lua_checkstack(co, 3);
    if (op->err) {
      lua_pushnil(co);
      lua_pushfstring(co, "%s: %s", op->what, strerror(op->err));
      lua_pushstring(co, uv_err_name(uv_translate_sys_error(op->err)));
      fb_fiber_ready(f, 3);
    } else {
      lua_pushboolean(co, 1);
      fb_fiber_ready(f, 1);
    }
  }
  op_free(op);
}

static fb_journal_t *check_open(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, JOURNAL_MT);
  if (!box->j) luaL_error(L, "journal: closed");
  return box->j;
}

/* Starts op kind on the journal at argument 1 with the bytes at argument 2 (copied), and
 * suspends the calling fiber until it is done: true | nil, msg, code. */
static int start(lua_State *L, op_kind_t kind, const char *who) {
  fb_journal_t *j = check_open(L);
  size_t len = 0;
  const char *data = kind == OP_SYNC ? NULL : luaL_checklstring(L, 2, &len);
  fb_fiber_t *f;
  jop_t *op;
  int rc;
  if (len > JOURNAL_WRITE_MAX) return luaL_error(L, "%s: %d bytes at most", who, (int)JOURNAL_WRITE_MAX);
  if (j->busy) return luaL_error(L, "%s: another operation is in flight", who);
  f = fb_fiber_check(L, who);
  if (!(op = calloc(1, sizeof *op))) return luaL_error(L, "%s: out of memory", who);
  if (len && !(op->data = malloc(len))) {
    free(op);
    return luaL_error(L, "%s: out of memory", who);
  }
  if (len) memcpy(op->data, data, len);
  op->len = len;
  op->kind = kind;
  op->j = j;
  op->new_fd = -1;
  op->sync = kind == OP_APPEND ? lua_toboolean(L, 3) : 0;
  op->work.data = op;
  op->next = J.pending;
  if (J.pending) J.pending->prev = op;
  J.pending = op;
  J.live_ops++;
  rc = uv_queue_work(fb_sched_loop(), &op->work, on_work, on_after);
  if (rc < 0) {
    op_free(op);
    lua_pushnil(L);
    lua_pushstring(L, uv_strerror(rc));
    lua_pushstring(L, uv_err_name(rc));
    return 3;
  }
  j->busy = 1;
  op->fiber = f;
  fb_fiber_on_cancel(f, op_cancel, op);
  return fb_fiber_suspend(L, f, -1);
}

/* j:append(bytes [, sync]) -> true | nil, msg, code: one write at the end, then fdatasync
 * when sync is true. On failure nothing of bytes stays in the file. */
static int l_journal_append(lua_State *L) { return start(L, OP_APPEND, "journal:append"); }

/* j:sync() -> true | nil, msg, code: fdatasync (for fsync = "batch"). */
static int l_journal_sync(lua_State *L) { return start(L, OP_SYNC, "journal:sync"); }

/* j:rewrite(bytes) -> true | nil, msg, code: replaces the whole file atomically (compaction);
 * later appends go to the new file. */
static int l_journal_rewrite(lua_State *L) { return start(L, OP_REWRITE, "journal:rewrite"); }

/* open(path) -> journal | nil, msg, code. Creates the file (0644) for appending. Synchronous:
 * called once at boot and by the CLI, before any request is served. */
static int l_journal_open(lua_State *L) {
  size_t len;
  const char *path = luaL_checklstring(L, 1, &len);
  fb_journal_t *j;
  box_t *box;
  int fd;
  if (strlen(path) != len) {
    lua_pushnil(L);
    lua_pushstring(L, "path contains a NUL byte");
    lua_pushstring(L, "EINVAL");
    return 3;
  }
  fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    int e = errno;
    lua_pushnil(L);
    lua_pushfstring(L, "cannot open %s: %s", path, strerror(e));
    lua_pushstring(L, uv_err_name(uv_translate_sys_error(e)));
    return 3;
  }
  box = lua_newuserdata(L, sizeof *box);           /* stack: box */
  box->j = NULL;
  luaL_getmetatable(L, JOURNAL_MT);
  lua_setmetatable(L, -2);
  if (!(j = calloc(1, sizeof *j)) || !(j->path = strdup(path))) {
    free(j);
    close(fd);
    return luaL_error(L, "journal.open: out of memory");
  }
  j->fd = fd;
  box->j = j;
  J.live_journals++;
  return 1;
}

/* close, __gc: idempotent; with an operation in flight the descriptor closes after it. */
static int l_journal_close(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, JOURNAL_MT);
  fb_journal_t *j = box->j;
  if (!j) return 0;
  box->j = NULL;
  if (j->busy) j->closing = 1;
  else journal_free(j);
  return 0;
}

/* crc32(s [, crc]) -> the CRC-32 of s (continuing crc), as a number. */
static int l_journal_crc32(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  uint32_t crc = (uint32_t)luaL_optnumber(L, 2, 0);
  lua_pushnumber(L, (lua_Number)fb_journal_crc32(crc, s, len));
  return 1;
}

static int l_journal_live(lua_State *L) {
  lua_pushnumber(L, (lua_Number)J.live_journals);
  lua_pushnumber(L, (lua_Number)J.live_ops);
  return 2;
}

/* lua_close: ops in flight have fibers about to be freed; detach them. */
static void on_lua_close(void) {
  jop_t *op;
  for (op = J.pending; op; op = op->next) op->fiber = NULL;
}

static const luaL_Reg methods[] = {
  { "append", l_journal_append },
  { "sync", l_journal_sync },
  { "rewrite", l_journal_rewrite },
  { "close", l_journal_close },
  { NULL, NULL }
};

static const luaL_Reg funcs[] = {
  { "open", l_journal_open },
  { "crc32", l_journal_crc32 },
  { "live", l_journal_live },
  { NULL, NULL }
};

int luaopen_fibril_core_journal(lua_State *L) {
  lua_newtable(L);                                  /* stack: module */
  luaL_setfuncs(L, funcs, 0);
  if (luaL_newmetatable(L, JOURNAL_MT)) {           /* stack: module mt */
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_journal_close);
    lua_setfield(L, -2, "__gc");
    fb_sched_on_close(on_lua_close);
  }
  lua_pop(L, 1);
  lua_pushnumber(L, JOURNAL_WRITE_MAX);
  lua_setfield(L, -2, "WRITE_MAX");
  return 1;
}
