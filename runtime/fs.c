/* fs.c: file system calls for fibers (stat, lstat, realpath, open, positional reads) on
 * libuv's thread pool, each suspending only its own fiber (and one synchronous directory
 * listing, for the app loader). A request in flight is either
 * resumed or detached (fiber = NULL), and a detached one's callback only frees. A descriptor
 * is closed only once no request on it is in flight: the kernel reuses numbers at once. */
#include "fs.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <uv.h>

#include "fiber.h"

#define FS_FILE_MT "fibril.fs.file"
#define FS_READ_MAX (16u << 20)    /* largest single read: its buffer is malloc'd whole */
#define FS_OFFSET_MAX 9007199254740992.0   /* 2^53: the largest offset a Lua number holds */

typedef enum { OP_STAT, OP_LSTAT, OP_FSTAT, OP_REALPATH, OP_OPEN, OP_READ } op_kind_t;

struct fb_fs_file_s {
  uv_file fd;
  unsigned inflight;            /* reads and fstats on fd not yet called back */
  int closing;                  /* closed from Lua: the close starts when inflight is 0 */
  uv_fs_t close_req;            /* close_req.data points back here */
};

typedef struct { fb_fs_file_t *file; } box_t;   /* the userdata; file is NULL once closed */

typedef struct fs_op_s {
  uv_fs_t req;                  /* req.data points back here */
  fb_fiber_t *fiber;            /* NULL once detached: the callback then only cleans up */
  op_kind_t kind;
  /* OP_OPEN: the struct the new descriptor goes into, owned until a box or a close takes
   * it. OP_READ, OP_FSTAT: the file being used, counted in its inflight. */
  fb_fs_file_t *file;
  char *buf;                    /* OP_READ: owned; freed with the op, whatever the result */
  struct fs_op_s *live_next, *live_prev;
} fs_op_t;

static struct {
  fs_op_t *pending;             /* in flight: detached at lua_close (on_lua_close) */
  size_t live_fds, live_ops, live_closes;
} F;

size_t fb_fs_live_fds(void) { return F.live_fds; }
size_t fb_fs_live_requests(void) { return F.live_ops + F.live_closes; }

/* ---- results and errors: C reports (nil, msg, code), Lua callers raise ---------------- */

static int push_error(lua_State *L, const char *msg, const char *code) {
  lua_pushnil(L);
  lua_pushstring(L, msg);
  lua_pushstring(L, code);
  return 3;
}

static int push_uv_error(lua_State *L, int err) {
  return push_error(L, uv_strerror(err), uv_err_name(err));
}

static const char *type_name(uint64_t mode) {
  if (S_ISREG(mode)) return "file";
  if (S_ISDIR(mode)) return "directory";
  if (S_ISLNK(mode)) return "link";
  return "other";
}

/* Pushes { size, mtime, mtime_nsec, type, ino, mode }: mtime in whole seconds (what HTTP
 * dates carry) and mtime_nsec the nanoseconds within it: a sum in one double would round
 * 0.999999999 s up into the next second. */
static void push_stat(lua_State *L, const uv_stat_t *s) {
  lua_createtable(L, 0, 6);
  lua_pushnumber(L, (lua_Number)s->st_size);
  lua_setfield(L, -2, "size");
  lua_pushnumber(L, (lua_Number)s->st_mtim.tv_sec);
  lua_setfield(L, -2, "mtime");
  lua_pushnumber(L, (lua_Number)s->st_mtim.tv_nsec);
  lua_setfield(L, -2, "mtime_nsec");
  lua_pushstring(L, type_name(s->st_mode));
  lua_setfield(L, -2, "type");
  lua_pushnumber(L, (lua_Number)s->st_ino);
  lua_setfield(L, -2, "ino");
  lua_pushnumber(L, (lua_Number)(s->st_mode & 07777));
  lua_setfield(L, -2, "mode");
}

/* ---- descriptors ------------------------------------------------------------------ */

static void on_closed(uv_fs_t *req) {
  fb_fs_file_t *file = req->data;
  uv_fs_req_cleanup(req);
  free(file);                   /* a failed close still gave the number back (close(2)) */
  F.live_fds--;
  F.live_closes--;
}

/* Takes ownership of file: its descriptor is closed and the struct freed in on_closed. */
static void file_close_start(fb_fs_file_t *file) {
  file->close_req.data = file;
  F.live_closes++;
  if (uv_fs_close(fb_sched_loop(), &file->close_req, file->fd, on_closed) < 0) {
    /* Only bad arguments fail here, which an fd we opened is not: close it inline. */
    uv_fs_t req;
    uv_fs_close(fb_sched_loop(), &req, file->fd, NULL);
    uv_fs_req_cleanup(&req);
    on_closed(&file->close_req);
  }
}

/* One request on file has been called back; the last one starts a pending close. */
static void file_release(fb_fs_file_t *file) {
  if (--file->inflight == 0 && file->closing) file_close_start(file);
}

/* ---- requests --------------------------------------------------------------------- */

static fs_op_t *op_new(lua_State *L, op_kind_t kind, const char *who) {
  fs_op_t *op = calloc(1, sizeof *op);
  if (!op) luaL_error(L, "%s: out of memory", who);
  op->kind = kind;
  op->req.data = op;
  op->live_next = F.pending;
  if (F.pending) F.pending->live_prev = op;
  F.pending = op;
  F.live_ops++;
  return op;
}

/* Frees op and what it owns (buf, the request's copies); op->file must be settled first. */
static void op_free(fs_op_t *op) {
  if (op->live_prev) op->live_prev->live_next = op->live_next;
  else F.pending = op->live_next;
  if (op->live_next) op->live_next->live_prev = op->live_prev;
  uv_fs_req_cleanup(&op->req);
  free(op->buf);
  free(op);
  F.live_ops--;
}

/* A cancel, or lua_close: stop waiting. libuv cannot stop a request a thread has taken, so
 * the callback still comes (with UV_ECANCELED if it had not started) and then only frees. */
static void op_detach(fs_op_t *op) {
  op->fiber = NULL;
  uv_cancel((uv_req_t *)&op->req);
}

static void op_cancel(fb_fiber_t *f, void *data) {
  (void)f;
  op_detach(data);
}

static void on_fs_done(uv_fs_t *req) {
  fs_op_t *op = req->data;
  fb_fiber_t *f = op->fiber;
  ssize_t r = req->result;
  lua_State *co;
  box_t *box;
  int n = 1;

  if (op->kind == OP_OPEN) {
    if (r >= 0) {               /* from here the descriptor must be closed by someone */
      op->file->fd = (uv_file)r;
      F.live_fds++;
      if (!f) file_close_start(op->file);   /* nobody will take it: close at once */
    } else {
      free(op->file);
    }
    if (!f || r < 0) op->file = NULL;
  } else if (op->file) {
    file_release(op->file);     /* the struct lives on until on_closed: no further use here */
    op->file = NULL;
  }
  if (!f) {
    op_free(op);
    return;
  }
  co = fb_fiber_thread(f);
  lua_checkstack(co, 3);
  if (r < 0) {
    n = push_uv_error(co, (int)r);
  } else {
    switch (op->kind) {
    case OP_STAT:
    case OP_LSTAT:
    case OP_FSTAT:
      push_stat(co, &req->statbuf);
      break;
    case OP_REALPATH:
      lua_pushstring(co, req->ptr);   /* copied before op_free's cleanup frees ptr */
      break;
    case OP_OPEN:
      box = lua_newuserdata(co, sizeof *box);   /* stack: box; from here the box owns it */
      box->file = op->file;
      op->file = NULL;
      luaL_getmetatable(co, FS_FILE_MT);
      lua_setmetatable(co, -2);
      break;
    case OP_READ:
      lua_pushlstring(co, op->buf, (size_t)r);  /* "" at end of file */
      break;
    }
  }
  op_free(op);
  fb_fiber_ready(f, n);
}

/* Suspends f on op once rc (the uv_fs_* result) says it is in flight; otherwise frees op and
 * returns the error at once. */
static int op_suspend(lua_State *L, fb_fiber_t *f, fs_op_t *op, int rc) {
  if (rc < 0) {
    if (op->kind == OP_OPEN) free(op->file);
    op->file = NULL;
    op_free(op);
    return push_uv_error(L, rc);
  }
  op->fiber = f;
  fb_fiber_on_cancel(f, op_cancel, op);
  return fb_fiber_suspend(L, f, -1);
}

/* path argument 1: borrowed while on the stack; libuv copies it into the request. Returns
 * NULL (after pushing nil, msg, code) for a path with a NUL byte, which the kernel would cut. */
static const char *check_path(lua_State *L) {
  size_t len;
  const char *path = luaL_checklstring(L, 1, &len);
  if (strlen(path) != len) return NULL;
  return path;
}

static int path_call(lua_State *L, op_kind_t kind, const char *who) {
  const char *path = check_path(L);
  uv_loop_t *loop = fb_sched_loop();
  fb_fiber_t *f;
  fs_op_t *op;
  int rc;
  if (!path) return push_error(L, "path contains a NUL byte", "EINVAL");
  f = fb_fiber_check(L, who);
  op = op_new(L, kind, who);
  switch (kind) {
  case OP_LSTAT: rc = uv_fs_lstat(loop, &op->req, path, on_fs_done); break;
  case OP_REALPATH: rc = uv_fs_realpath(loop, &op->req, path, on_fs_done); break;
  default: rc = uv_fs_stat(loop, &op->req, path, on_fs_done); break;
  }
  return op_suspend(L, f, op, rc);
}

/* stat(path) -> { size, mtime, mtime_nsec, type, ino, mode } | nil, msg, code */
static int l_fs_stat(lua_State *L) { return path_call(L, OP_STAT, "fs.stat"); }

/* lstat(path): as stat, but a symbolic link is described itself (type "link"). */
static int l_fs_lstat(lua_State *L) { return path_call(L, OP_LSTAT, "fs.lstat"); }

/* realpath(path) -> the absolute path with every link, "." and ".." resolved | nil, msg, code */
static int l_fs_realpath(lua_State *L) { return path_call(L, OP_REALPATH, "fs.realpath"); }

/* list(path) -> { { name =, type = "file"|"dir"|"link"|"other"|"unknown" }, ... } (any order,
 * without "." and "..") | nil, msg, code. Synchronous, on the calling thread: the app loader
 * lists a few local directories at boot and at each reload, and must not yield half-way
 * through swapping modules. Not for directories on slow or network file systems. */
static int l_fs_list(lua_State *L) {
  const char *path = check_path(L);
  uv_fs_t req;
  uv_dirent_t ent;
  int rc, n = 0;
  if (!path) return push_error(L, "path contains a NUL byte", "EINVAL");
  rc = uv_fs_scandir(fb_sched_loop(), &req, path, 0, NULL);
  if (rc < 0) {
    uv_fs_req_cleanup(&req);
    return push_uv_error(L, rc);
  }
  lua_createtable(L, rc, 0);                 /* stack: list */
  while (uv_fs_scandir_next(&req, &ent) != UV_EOF) {
    const char *type;
    switch (ent.type) {
    case UV_DIRENT_FILE: type = "file"; break;
    case UV_DIRENT_DIR: type = "dir"; break;
    case UV_DIRENT_LINK: type = "link"; break;
    case UV_DIRENT_UNKNOWN: type = "unknown"; break;
    default: type = "other"; break;
    }
    lua_createtable(L, 0, 2);                /* stack: list entry */
    lua_pushstring(L, ent.name);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, type);
    lua_setfield(L, -2, "type");
    lua_rawseti(L, -2, ++n);
  }
  uv_fs_req_cleanup(&req);
  return 1;
}

/* open(path [, "nofollow"]) -> file | nil, msg, code. Read-only. O_NONBLOCK keeps a FIFO
 * from holding a pool thread until a writer comes (it does nothing to regular files);
 * "nofollow" fails with ELOOP when the last component is a symbolic link. */
static int l_fs_open(lua_State *L) {
  static const char *const follow[] = { "follow", "nofollow", NULL };
  const char *path = check_path(L);
  int flags = UV_FS_O_RDONLY | UV_FS_O_NONBLOCK, rc;
  fb_fiber_t *f;
  fs_op_t *op;
  if (luaL_checkoption(L, 2, "follow", follow) == 1) flags |= UV_FS_O_NOFOLLOW;
  if (!path) return push_error(L, "path contains a NUL byte", "EINVAL");
  f = fb_fiber_check(L, "fs.open");
  op = op_new(L, OP_OPEN, "fs.open");
  if (!(op->file = calloc(1, sizeof *op->file))) {
    op_free(op);
    return luaL_error(L, "fs.open: out of memory");
  }
  rc = uv_fs_open(fb_sched_loop(), &op->req, path, flags, 0, on_fs_done);
  return op_suspend(L, f, op, rc);
}

/* ---- file methods ----------------------------------------------------------------- */

static fb_fs_file_t *check_open(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, FS_FILE_MT);
  if (!box->file) luaL_error(L, "fs: file is closed");
  return box->file;
}

/* read(file, len [, offset]) -> string ("" at end of file) | nil, msg, code. Reads at most
 * len bytes at offset (default: the file position); fewer only at the end of the file. */
static int l_file_read(lua_State *L) {
  fb_fs_file_t *file = check_open(L);
  lua_Number len = luaL_checknumber(L, 2);
  lua_Number off = luaL_optnumber(L, 3, -1);
  fb_fiber_t *f;
  fs_op_t *op;
  uv_buf_t b;
  int rc;
  if (!(len >= 0 && len <= FS_READ_MAX) || len != (lua_Number)(size_t)len)
    return luaL_error(L, "file:read: len must be an integer from 0 to %d", (int)FS_READ_MAX);
  if (!lua_isnoneornil(L, 3) &&
      (!(off >= 0 && off <= FS_OFFSET_MAX) || off != (lua_Number)(int64_t)off))
    return luaL_error(L, "file:read: offset must be a non-negative integer");
  if (len == 0) {
    lua_pushliteral(L, "");
    return 1;
  }
  f = fb_fiber_check(L, "file:read");
  op = op_new(L, OP_READ, "file:read");
  if (!(op->buf = malloc((size_t)len))) {
    op_free(op);
    return luaL_error(L, "file:read: out of memory");
  }
  b = uv_buf_init(op->buf, (unsigned)len);   /* libuv copies the uv_buf_t array */
  rc = uv_fs_read(fb_sched_loop(), &op->req, file->fd, &b, 1, (int64_t)off, on_fs_done);
  if (rc == 0) {
    op->file = file;
    file->inflight++;
  }
  return op_suspend(L, f, op, rc);
}

/* stat(file) -> the table fs.stat gives, for the open descriptor (fstat). */
static int l_file_stat(lua_State *L) {
  fb_fs_file_t *file = check_open(L);
  fb_fiber_t *f = fb_fiber_check(L, "file:stat");
  fs_op_t *op = op_new(L, OP_FSTAT, "file:stat");
  int rc = uv_fs_fstat(fb_sched_loop(), &op->req, file->fd, on_fs_done);
  if (rc == 0) {
    op->file = file;
    file->inflight++;
  }
  return op_suspend(L, f, op, rc);
}

/* close, __close and __gc: idempotent, never suspends. The descriptor is closed on the pool
 * once no read on it is in flight; later calls on the file raise "fs: file is closed". */
static int l_file_close(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, FS_FILE_MT);
  fb_fs_file_t *file = box->file;
  if (!file) return 0;
  box->file = NULL;
  file->closing = 1;
  if (file->inflight == 0) file_close_start(file);
  return 0;
}

static int l_file_is_closed(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, FS_FILE_MT);
  lua_pushboolean(L, box->file == NULL);
  return 1;
}

/* live() -> open descriptors, requests in flight (closes included). */
static int l_fs_live(lua_State *L) {
  lua_pushnumber(L, (lua_Number)F.live_fds);
  lua_pushnumber(L, (lua_Number)(F.live_ops + F.live_closes));
  return 2;
}

/* Run by lua_close (fb_sched_on_close): requests in flight belong to no
 * userdata, so detach them before their fibers are freed; the loop run after lua_close
 * delivers their callbacks, which then only free (and close a descriptor just opened). */
static void on_lua_close(void) {
  fs_op_t *op;
  for (op = F.pending; op; op = op->live_next) op_detach(op);
}

static const luaL_Reg file_methods[] = {
  { "read", l_file_read },
  { "stat", l_file_stat },
  { "close", l_file_close },
  { "is_closed", l_file_is_closed },
  { NULL, NULL }
};

static const luaL_Reg fs_funcs[] = {
  { "stat", l_fs_stat },
  { "lstat", l_fs_lstat },
  { "realpath", l_fs_realpath },
  { "open", l_fs_open },
  { "list", l_fs_list },
  { "live", l_fs_live },
  { NULL, NULL }
};

int luaopen_fibril_core_fs(lua_State *L) {
  lua_newtable(L);                           /* stack: module */
  luaL_setfuncs(L, fs_funcs, 0);
  if (luaL_newmetatable(L, FS_FILE_MT)) {    /* stack: module mt */
    lua_newtable(L);
    luaL_setfuncs(L, file_methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_file_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_file_close);
    lua_setfield(L, -2, "__close");
    fb_sched_on_close(on_lua_close);
  }
  lua_pop(L, 1);
  lua_pushnumber(L, FS_READ_MAX);
  lua_setfield(L, -2, "READ_MAX");
  return 1;
}
