/* fswatch.c: recursive directory watching for the code reloader. inotify watches one
 * directory at a time, so a watcher holds one uv_fs_event_t per directory of its tree and
 * follows directories as they appear and vanish. libuv callbacks only record paths in C;
 * a list reaches Lua only by being pushed onto the one waiting fiber before fb_fiber_ready. */
#include "fswatch.h"

#include <dirent.h>
#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <uv.h>

#include "fiber.h"
#include "log.h"

#define FSWATCH_MT "fibril.fswatch"
#define FSWATCH_MAX_DIRS 10000      /* default: past it watch() fails, later events rescan */
#define FSWATCH_MAX_PENDING 10000   /* default: past it the next list is { "*" } */
#define FSWATCH_LIMIT_MAX 10000000  /* ceiling of both options */
#define FSWATCH_SETTLE_MS 20        /* a waiter resumes this long after the first change */
#define FSWATCH_BUCKETS 64          /* initial hash buckets (a power of two), doubled */
#define FSWATCH_ELIMIT 1            /* dir_start: max_dirs reached (libuv codes are < 0) */

/* A path in one of a watcher's hash sets; it heads a dir_t or a change_t, and the path
 * bytes follow that struct in the same allocation. */
typedef struct node_s {
  struct node_s *hnext;
  size_t hash, len;
  char *path;                   /* absolute, len bytes, NUL-terminated */
} node_t;

typedef struct {
  node_t **b;                   /* nb buckets, nb a power of two */
  size_t nb, n;
} set_t;

typedef struct fb_fswatch_s fb_fswatch_t;

typedef struct dir_s {
  node_t node;                  /* first: a node_t * found in w->dirs is the dir_t */
  uv_fs_event_t ev;             /* ev.data points back here; freed in on_dir_closed */
  fb_fswatch_t *w;
  dev_t dev;                    /* what the path named when the watch started: a */
  ino_t ino;                    /* different directory moved there is not this one */
  struct dir_s *scan_next;      /* watch_tree's stack of directories still to read */
} dir_t;

typedef struct change_s {
  node_t node;                  /* first: in w->seen */
  struct change_s *next;        /* arrival order */
} change_t;

struct fb_fswatch_s {
  set_t dirs;                   /* directories watched now (a closing one is removed) */
  set_t seen;                   /* pending changed paths, deduplicated ... */
  change_t *head, *tail;        /* ... and in arrival order */
  size_t max_dirs, max_pending;
  int overflow;                 /* paths were dropped: the next list is { "*" } */
  int warned;                   /* the max_dirs warning was logged */
  unsigned handles;             /* handles not yet called back closed; w is freed at 0 */
  uv_timer_t settle;            /* resumes the waiter FSWATCH_SETTLE_MS after a change */
  fb_fiber_t *waiter;           /* the one fiber in next(), if any */
};

typedef struct { fb_fswatch_t *w; } box_t;   /* the userdata; w is NULL once closed */

static struct { size_t live_handles, live_watchers; } G;

size_t fb_fswatch_live_handles(void) { return G.live_handles; }

/* ---- path sets ---------------------------------------------------------------------- */

static size_t hash_path(const char *s, size_t len) {
  uint64_t h = 14695981039346656037u;       /* FNV-1a */
  size_t i;
  for (i = 0; i < len; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211u;
  return (size_t)h;
}

static int set_init(set_t *s) {
  s->b = calloc(FSWATCH_BUCKETS, sizeof *s->b);
  s->nb = s->b ? FSWATCH_BUCKETS : 0;
  s->n = 0;
  return s->b != NULL;
}

static node_t *set_find(const set_t *s, const char *path, size_t len) {
  size_t h = hash_path(path, len);
  node_t *n;
  for (n = s->b[h & (s->nb - 1)]; n; n = n->hnext)
    if (n->hash == h && n->len == len && memcmp(n->path, path, len) == 0) return n;
  return NULL;
}

/* Growing is best effort: without memory the chains only get longer. */
static void set_add(set_t *s, node_t *n) {
  node_t **slot;
  if (s->n >= s->nb) {
    node_t **b = calloc(s->nb * 2, sizeof *b), *m, *next;
    size_t i;
    if (b) {
      for (i = 0; i < s->nb; i++)
        for (m = s->b[i]; m; m = next) {
          next = m->hnext;
          m->hnext = b[m->hash & (s->nb * 2 - 1)];
          b[m->hash & (s->nb * 2 - 1)] = m;
        }
      free(s->b);
      s->b = b;
      s->nb *= 2;
    }
  }
  slot = &s->b[n->hash & (s->nb - 1)];
  n->hnext = *slot;
  *slot = n;
  s->n++;
}

/* Allocates a struct of size bytes headed by a node for path (len bytes), or NULL. */
static void *node_new(size_t size, const char *path, size_t len) {
  node_t *n = malloc(size + len + 1);
  if (!n) return NULL;
  n->hnext = NULL;
  n->path = (char *)n + size;
  memcpy(n->path, path, len);
  n->path[len] = '\0';
  n->len = len;
  n->hash = hash_path(path, len);
  return n;
}

/* dst = dir "/" name; returns the length, or 0 when it does not fit in PATH_MAX. */
static size_t path_join(char *dst, const node_t *dir, const char *name, size_t nlen) {
  size_t sep = dir->len > 1, len = dir->len + sep + nlen;   /* dir "/" takes no separator */
  if (nlen == 0 || nlen > NAME_MAX || len >= PATH_MAX) return 0;
  memcpy(dst, dir->path, dir->len);
  dst[dir->len] = '/';
  memcpy(dst + dir->len + sep, name, nlen);
  dst[len] = '\0';
  return len;
}

/* True when path c lies strictly inside directory d. */
static int is_below(const node_t *c, const node_t *d) {
  if (c->len <= d->len || memcmp(c->path, d->path, d->len) != 0) return 0;
  return d->len == 1 || c->path[d->len] == '/';            /* d->len == 1: d is "/" */
}

/* ---- pending changes ---------------------------------------------------------------- */

static void changes_clear(fb_fswatch_t *w) {
  change_t *c, *next;
  for (c = w->head; c; c = next) {
    next = c->next;
    free(c);
  }
  w->head = w->tail = NULL;
  memset(w->seen.b, 0, w->seen.nb * sizeof *w->seen.b);
  w->seen.n = 0;
}

/* Drops every pending path: the reloader has to rescan everything ("*"). */
static void changes_overflow(fb_fswatch_t *w) {
  changes_clear(w);
  w->overflow = 1;
}

/* Records path (len bytes, copied) as changed, once until the next list is taken. */
static void change_add(fb_fswatch_t *w, const char *path, size_t len) {
  change_t *c;
  if (w->overflow || set_find(&w->seen, path, len)) return;
  if (w->seen.n >= w->max_pending || !(c = node_new(sizeof *c, path, len))) {
    changes_overflow(w);
    return;
  }
  c->next = NULL;
  if (w->tail) w->tail->next = c;
  else w->head = c;
  w->tail = c;
  set_add(&w->seen, &c->node);
}

/* Pushes the pending list onto L ({ "*" } after an overflow) and clears it. */
static void changes_push(fb_fswatch_t *w, lua_State *L) {
  change_t *c;
  int i = 0;
  lua_checkstack(L, 3);
  if (w->overflow) {
    lua_createtable(L, 1, 0);                /* stack: list */
    lua_pushliteral(L, "*");
    lua_rawseti(L, -2, 1);
  } else {
    lua_createtable(L, (int)w->seen.n, 0);   /* stack: list */
    for (c = w->head; c; c = c->next) {
      lua_pushlstring(L, c->node.path, c->node.len);
      lua_rawseti(L, -2, ++i);
    }
  }
  changes_clear(w);
  w->overflow = 0;
}

/* ---- handles ------------------------------------------------------------------------ */

static void watcher_release(fb_fswatch_t *w) {
  G.live_handles--;
  if (--w->handles > 0) return;
  free(w);                                   /* the sets were freed by watcher_close */
  G.live_watchers--;
}

static void on_dir_closed(uv_handle_t *h) {
  dir_t *d = h->data;
  watcher_release(d->w);
  free(d);
}

static void on_settle_closed(uv_handle_t *h) { watcher_release(h->data); }

static void on_settle(uv_timer_t *t) {
  fb_fswatch_t *w = t->data;
  fb_fiber_t *f = w->waiter;
  if (!f || !(w->head || w->overflow)) return;
  w->waiter = NULL;
  changes_push(w, fb_fiber_thread(f));
  fb_fiber_ready(f, 1);
}

/* Arms the settle timer when a fiber waits and something is pending. The rest of a burst
 * (an editor's write then rename, a checkout) arrives meanwhile and shares the one list. */
static void wake_soon(fb_fswatch_t *w) {
  if (w->waiter && (w->head || w->overflow) && !uv_is_active((uv_handle_t *)&w->settle))
    uv_timer_start(&w->settle, on_settle, FSWATCH_SETTLE_MS, 0);
}

static void on_event(uv_fs_event_t *h, const char *name, int events, int status);

/* Starts watching the directory path (len bytes). Returns 0 and sets *out, FSWATCH_ELIMIT
 * past max_dirs, or a libuv error (UV_ENOENT: it vanished; UV_ENOSPC: the inotify limit). */
static int dir_start(fb_fswatch_t *w, const char *path, size_t len, dir_t **out) {
  struct stat st;
  dir_t *d;
  int rc;
  if (w->dirs.n >= w->max_dirs) return FSWATCH_ELIMIT;
  if (!(d = node_new(sizeof *d, path, len))) return UV_ENOMEM;
  d->w = w;
  d->scan_next = NULL;
  uv_fs_event_init(fb_sched_loop(), &d->ev);   /* from here only uv_close frees d */
  d->ev.data = d;
  w->handles++;
  G.live_handles++;
  rc = uv_fs_event_start(&d->ev, on_event, d->node.path, 0);
  if (rc == 0 && stat(d->node.path, &st) != 0) rc = uv_translate_sys_error(errno);
  if (rc < 0) {
    uv_close((uv_handle_t *)&d->ev, on_dir_closed);
    return rc;
  }
  d->dev = st.st_dev;
  d->ino = st.st_ino;
  set_add(&w->dirs, &d->node);
  *out = d;
  return 0;
}

/* Starts watching path (len bytes) and every directory below it that is not a symbolic
 * link, not hidden (".git") and not watched yet. With report set, every other entry found
 * is a change: it may have been written before its directory's watch started, which is
 * also why each watch starts before its directory is read. Returns 0 or dir_start's error;
 * a subdirectory that vanishes or may not be read meanwhile is skipped. */
static int watch_tree(fb_fswatch_t *w, const char *path, size_t len, int report) {
  char child[PATH_MAX];
  dir_t *stack, *d, *c;
  int rc = dir_start(w, path, len, &stack);
  if (rc) return rc;
  while ((d = stack) != NULL) {
    DIR *dp = opendir(d->node.path);
    struct dirent *e;
    stack = d->scan_next;
    if (!dp) continue;                       /* gone meanwhile: its own watch says so */
    while ((e = readdir(dp)) != NULL) {
      size_t nlen = strnlen(e->d_name, NAME_MAX + 1), clen;
      struct stat st;
      int is_dir = e->d_type == DT_DIR;
      if (e->d_name[0] == '.' && (nlen == 1 || (nlen == 2 && e->d_name[1] == '.'))) continue;
      if (!(clen = path_join(child, &d->node, e->d_name, nlen))) {
        if (report) changes_overflow(w);     /* a path past PATH_MAX: let a rescan see it */
        continue;
      }
      if (e->d_type == DT_UNKNOWN)           /* some file systems leave the type out */
        is_dir = lstat(child, &st) == 0 && S_ISDIR(st.st_mode);
      if (!is_dir) {
        if (report) change_add(w, child, clen);
        continue;
      }
      if (e->d_name[0] == '.' || set_find(&w->dirs, child, clen)) continue;
      rc = dir_start(w, child, clen, &c);
      if (rc == UV_ENOENT || rc == UV_ENOTDIR || rc == UV_EACCES || rc == UV_ELOOP) continue;
      if (rc) {
        closedir(dp);
        return rc;
      }
      c->scan_next = stack;
      stack = c;
    }
    closedir(dp);
  }
  return 0;
}

/* d is gone (deleted, moved away, replaced, or its watch failed): stop watching it and
 * every directory below it, whose events would now carry paths that no longer exist. */
static void dir_vanish(fb_fswatch_t *w, dir_t *d) {
  size_t i;
  for (i = 0; i < w->dirs.nb; i++) {
    node_t **pp = &w->dirs.b[i];
    while (*pp) {
      node_t *n = *pp;
      if (n == &d->node || is_below(n, &d->node)) {
        *pp = n->hnext;                      /* d stays readable until on_dir_closed */
        w->dirs.n--;
        uv_close((uv_handle_t *)&((dir_t *)n)->ev, on_dir_closed);
      } else {
        pp = &n->hnext;
      }
    }
  }
}

/* True while path still names the directory d started watching. */
static int dir_is_there(const dir_t *d, const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISDIR(st.st_mode) && st.st_dev == d->dev &&
         st.st_ino == d->ino;
}

/* An entry was created, deleted or moved in or out (path, len bytes). Follows a directory
 * that appeared and forgets one that went. */
static void entry_renamed(fb_fswatch_t *w, const char *path, size_t len, const char *name) {
  node_t *n = set_find(&w->dirs, path, len);
  struct stat st;
  int rc;
  if (n && dir_is_there((dir_t *)n, path)) return;
  if (n) dir_vanish(w, (dir_t *)n);          /* and a directory now there starts afresh */
  if (name[0] == '.' || lstat(path, &st) != 0 || !S_ISDIR(st.st_mode)) return;
  if ((rc = watch_tree(w, path, len, 1)) == 0) return;
  changes_overflow(w);                       /* part of the tree goes unwatched: rescan */
  if (!w->warned) {
    char q[PATH_MAX + 64];
    w->warned = 1;
    fb_log(FB_WARN, "fswatch", "msg=\"cannot watch a new directory\" path=%s err=%s",
           fb_log_quote(q, sizeof q, path, len),
           rc == FSWATCH_ELIMIT ? "max_dirs" : uv_err_name(rc));
  }
}

/* inotify reports an event on d itself (deleted, moved, chmod) with no name, and libuv then
 * passes the basename of the watched path instead: that name, when no entry of d has it, is
 * taken for d itself (so a deleted file named like its directory goes unreported). Only
 * such an event, or the parent's, ends d's watch: events on d's entries queued before it
 * (rm -r deletes them first) are still reported. */
static void on_event(uv_fs_event_t *h, const char *name, int events, int status) {
  dir_t *d = h->data;
  fb_fswatch_t *w = d->w;
  char child[PATH_MAX];
  size_t nlen = name ? strnlen(name, NAME_MAX + 1) : 0, clen;
  const char *base = strrchr(d->node.path, '/') + 1;
  struct stat st;

  if (uv_is_closing((uv_handle_t *)h)) return;
  if (status < 0 || nlen == 0) {             /* the watch itself failed */
    change_add(w, d->node.path, d->node.len);
    dir_vanish(w, d);
  } else if (!(clen = path_join(child, &d->node, name, nlen))) {
    changes_overflow(w);                     /* a path past PATH_MAX: a rescan sees it */
  } else if (strcmp(base, name) == 0 && lstat(child, &st) != 0) {
    if (!dir_is_there(d, d->node.path)) {    /* IN_DELETE_SELF, IN_MOVE_SELF */
      change_add(w, d->node.path, d->node.len);
      dir_vanish(w, d);
    }                                        /* else IN_ATTRIB on d: nothing inside changed */
  } else {
    change_add(w, child, clen);
    /* Directory events carry IN_ISDIR, which libuv folds into UV_RENAME with the creates,
     * deletes and moves: entry_renamed's lstat tells them apart. */
    if (events & UV_RENAME) entry_renamed(w, child, clen, name);
  }
  wake_soon(w);
}

/* Closes every handle; w itself is freed by the last close callback. A fiber waiting in
 * next() resumes with (nil, "closed", "closed"). */
static void watcher_close(fb_fswatch_t *w) {
  fb_fiber_t *f = w->waiter;
  size_t i;
  if (f) {
    lua_State *co = fb_fiber_thread(f);
    w->waiter = NULL;
    lua_checkstack(co, 3);
    lua_pushnil(co);
    lua_pushliteral(co, "closed");
    lua_pushliteral(co, "closed");
    fb_fiber_ready(f, 3);
  }
  for (i = 0; i < w->dirs.nb; i++) {
    node_t *n, *next;
    for (n = w->dirs.b[i]; n; n = next) {
      next = n->hnext;
      uv_close((uv_handle_t *)&((dir_t *)n)->ev, on_dir_closed);
    }
  }
  changes_clear(w);
  free(w->dirs.b);
  free(w->seen.b);
  w->dirs.b = w->seen.b = NULL;
  w->dirs.nb = w->seen.nb = w->dirs.n = 0;
  uv_close((uv_handle_t *)&w->settle, on_settle_closed);
}

/* ---- Lua API ------------------------------------------------------------------------ */

static int push_error(lua_State *L, const char *code) {
  lua_pushnil(L);
  lua_insert(L, -2);                         /* stack: nil msg */
  lua_pushstring(L, code);
  return 3;
}

/* Reads opts[key] (argument 2) as a whole number from 1 to FSWATCH_LIMIT_MAX. */
static size_t opt_limit(lua_State *L, const char *key, size_t dflt) {
  lua_Number v;
  if (lua_isnoneornil(L, 2)) return dflt;
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_getfield(L, 2, key);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return dflt;
  }
  v = lua_tonumber(L, -1);
  if (lua_type(L, -1) != LUA_TNUMBER || !(v >= 1 && v <= FSWATCH_LIMIT_MAX) ||
      v != (lua_Number)(size_t)v)
    luaL_error(L, "fswatch.watch: %s must be a whole number from 1 to %d", key,
               FSWATCH_LIMIT_MAX);
  lua_pop(L, 1);
  return (size_t)v;
}

/* watch(dir [, { max_dirs, max_pending }]) -> watcher | nil, msg, code. Walks the tree
 * synchronously (watch time only); dir is made absolute with realpath when relative. */
static int l_fswatch_watch(lua_State *L) {
  size_t len;
  const char *dir = luaL_checklstring(L, 1, &len);   /* borrowed while on the stack */
  size_t max_dirs = opt_limit(L, "max_dirs", FSWATCH_MAX_DIRS);
  size_t max_pending = opt_limit(L, "max_pending", FSWATCH_MAX_PENDING);
  char root[PATH_MAX];
  struct stat st;
  fb_fswatch_t *w;
  box_t *box;
  int rc = 0;

  if (strlen(dir) != len) rc = UV_EINVAL;
  else if (len >= PATH_MAX) rc = UV_ENAMETOOLONG;
  else if (dir[0] == '/') {
    memcpy(root, dir, len + 1);
    while (len > 1 && root[len - 1] == '/') root[--len] = '\0';
  } else if (!realpath(dir, root)) {
    rc = uv_translate_sys_error(errno);
  } else {
    len = strlen(root);
  }
  if (rc == 0 && stat(root, &st) != 0) rc = uv_translate_sys_error(errno);
  if (rc == 0 && !S_ISDIR(st.st_mode)) rc = UV_ENOTDIR;
  if (rc) {
    lua_pushfstring(L, "fswatch: cannot watch '%s': %s", dir, uv_strerror(rc));
    return push_error(L, uv_err_name(rc));
  }

  box = lua_newuserdata(L, sizeof *box);     /* stack: ... box */
  box->w = NULL;
  luaL_getmetatable(L, FSWATCH_MT);
  lua_setmetatable(L, -2);
  if (!(w = calloc(1, sizeof *w)) || !set_init(&w->dirs) || !set_init(&w->seen)) {
    if (w) free(w->dirs.b);
    free(w);
    return luaL_error(L, "fswatch.watch: out of memory");
  }
  w->max_dirs = max_dirs;
  w->max_pending = max_pending;
  uv_timer_init(fb_sched_loop(), &w->settle);
  w->settle.data = w;
  w->handles = 1;
  G.live_handles++;
  G.live_watchers++;
  if ((rc = watch_tree(w, root, len, 0)) != 0) {
    watcher_close(w);
    if (rc == FSWATCH_ELIMIT) {
      lua_pushfstring(L, "fswatch: more than %d directories under '%s' (max_dirs)",
                      (int)max_dirs, dir);
      return push_error(L, "limit");
    }
    lua_pushfstring(L, "fswatch: cannot watch '%s': %s%s", dir, uv_strerror(rc),
                    rc == UV_ENOSPC ? " (inotify watches are limited by "
                    "/proc/sys/fs/inotify/max_user_watches)" : "");
    return push_error(L, uv_err_name(rc));
  }
  box->w = w;
  return 1;
}

static fb_fswatch_t *check_open(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, FSWATCH_MT);
  if (!box->w) luaL_error(L, "fswatch: watcher is closed");
  return box->w;
}

static void next_cancel(fb_fiber_t *f, void *data) {
  fb_fswatch_t *w = data;
  (void)f;
  w->waiter = NULL;                          /* what is pending stays for the next call */
  uv_timer_stop(&w->settle);
}

/* next([timeout]) -> { path, ... } | nil, err (timeout, cancel) | nil, "closed", "closed".
 * Returns at once when changes are pending; else suspends until some arrive. */
static int l_watch_next(lua_State *L) {
  fb_fswatch_t *w = check_open(L);
  double timeout = -1;
  fb_fiber_t *f;
  if (!lua_isnoneornil(L, 2)) {
    timeout = luaL_checknumber(L, 2);
    if (!(timeout >= 0)) return luaL_error(L, "fswatch:next: timeout must be >= 0 seconds");
    if (timeout > 1e9) timeout = -1;
  }
  if (w->waiter) return luaL_error(L, "fswatch:next: another fiber is already waiting");
  if (w->head || w->overflow) {
    changes_push(w, L);
    return 1;
  }
  f = fb_fiber_check(L, "fswatch:next");
  w->waiter = f;
  fb_fiber_on_cancel(f, next_cancel, w);
  return fb_fiber_suspend(L, f, timeout);
}

/* close, __close and __gc: idempotent; later calls but dirs() raise "watcher is closed". */
static int l_watch_close(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, FSWATCH_MT);
  fb_fswatch_t *w = box->w;
  if (!w) return 0;
  box->w = NULL;
  watcher_close(w);
  return 0;
}

/* dirs() -> how many directories are watched now (0 once closed). */
static int l_watch_dirs(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, FSWATCH_MT);
  lua_pushnumber(L, box->w ? (lua_Number)box->w->dirs.n : 0);
  return 1;
}

/* live() -> libuv handles owned by watchers, watchers not yet freed. */
static int l_fswatch_live(lua_State *L) {
  lua_pushnumber(L, (lua_Number)G.live_handles);
  lua_pushnumber(L, (lua_Number)G.live_watchers);
  return 2;
}

static const luaL_Reg watch_methods[] = {
  { "next", l_watch_next },
  { "close", l_watch_close },
  { "dirs", l_watch_dirs },
  { NULL, NULL }
};

static const luaL_Reg fswatch_funcs[] = {
  { "watch", l_fswatch_watch },
  { "live", l_fswatch_live },
  { NULL, NULL }
};

int luaopen_fibril_core_fswatch(lua_State *L) {
  lua_newtable(L);                           /* stack: module */
  luaL_setfuncs(L, fswatch_funcs, 0);
  if (luaL_newmetatable(L, FSWATCH_MT)) {    /* stack: module mt */
    lua_newtable(L);
    luaL_setfuncs(L, watch_methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_watch_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_watch_close);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  return 1;
}
