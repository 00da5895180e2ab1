/* process.c: child processes for fibers: spawn, wait (suspends until exit), kill; this
 * process's pid and ppid; signal traps; a TCP port reserved (bound, never listening).
 * A child's uv_process_t lives in a malloc'd fb_process_t that outlives the handle: the
 * handle closes when the child exits (or at close), the struct is freed once both its close
 * callback has run and the userdata has let go, so wait() still answers after the exit. */
#include "process.h"

#include <errno.h>
#include <lauxlib.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "fiber.h"

#define PROCESS_MT "fibril.process"
#define PORT_MT "fibril.process.port"
#define TRAP_MT "fibril.process.trap"
#define MAX_ARGS 256           /* argv entries a spawn may pass, the file included */
#define MAX_ENV_ADDED 256      /* variables a spawn may add to the inherited environment */

extern char **environ;

typedef struct fb_process_s {
  uv_process_t h;              /* h.data points back here */
  fb_fiber_t *waiter;          /* the one fiber in wait(), if any; NULL once resumed/detached */
  int pid;
  int exited;                  /* exit_status and term_signal are set */
  int64_t exit_status;
  int term_signal;
  unsigned char closing;       /* uv_close called on h */
  unsigned char closed;        /* h's close callback has run */
  unsigned char boxed;         /* a userdata still points here */
} fb_process_t;

typedef struct { fb_process_t *p; } box_t;    /* p is NULL once closed */
typedef struct { int fd; } port_box_t;        /* fd is -1 once closed */
typedef struct { uv_signal_t *h; } trap_box_t; /* h is NULL once closed; freed when closed */

static struct {
  size_t live_processes;       /* structs not yet freed */
  size_t live_ports;           /* reserved sockets still open */
  size_t live_traps;           /* signal trap handles not yet freed */
} P;

static const struct { const char *name; int signum; } signals[] = {
  { "SIGHUP", SIGHUP }, { "SIGINT", SIGINT }, { "SIGQUIT", SIGQUIT }, { "SIGILL", SIGILL },
  { "SIGTRAP", SIGTRAP }, { "SIGABRT", SIGABRT }, { "SIGBUS", SIGBUS }, { "SIGFPE", SIGFPE },
  { "SIGKILL", SIGKILL }, { "SIGUSR1", SIGUSR1 }, { "SIGSEGV", SIGSEGV },
  { "SIGUSR2", SIGUSR2 }, { "SIGPIPE", SIGPIPE }, { "SIGALRM", SIGALRM },
  { "SIGTERM", SIGTERM }, { "SIGCHLD", SIGCHLD }, { "SIGCONT", SIGCONT },
  { "SIGSTOP", SIGSTOP }, { "SIGTSTP", SIGTSTP }, { "SIGTTIN", SIGTTIN },
  { "SIGTTOU", SIGTTOU }, { "SIGXCPU", SIGXCPU }, { "SIGXFSZ", SIGXFSZ },
  { "SIGVTALRM", SIGVTALRM }, { "SIGPROF", SIGPROF }, { "SIGWINCH", SIGWINCH },
  { "SIGSYS", SIGSYS }, { NULL, 0 }
};

/* Pushes the signal's name ("SIGKILL"), or "SIG<n>" for one not in the table. */
static void push_signal_name(lua_State *L, int signum) {
  int i;
  for (i = 0; signals[i].name; i++) {
    if (signals[i].signum == signum) {
      lua_pushstring(L, signals[i].name);
      return;
    }
  }
  lua_pushfstring(L, "SIG%d", signum);
}

/* A signal from argument idx: a number, "SIGTERM" or "TERM"; default SIGTERM. Raises. */
static int check_signal(lua_State *L, int idx) {
  const char *name;
  int i;
  if (lua_isnoneornil(L, idx)) return SIGTERM;
  if (lua_type(L, idx) == LUA_TNUMBER) {
    int n = (int)lua_tointeger(L, idx);
    if (n < 0 || n > 64) luaL_error(L, "process: no signal number %d", n);
    return n;
  }
  name = luaL_checkstring(L, idx);
  for (i = 0; signals[i].name; i++) {
    if (strcmp(signals[i].name, name) == 0 || strcmp(signals[i].name + 3, name) == 0)
      return signals[i].signum;
  }
  return luaL_error(L, "process: unknown signal '%s'", name);
}

static int push_error(lua_State *L, const char *msg, const char *code) {
  lua_pushnil(L);
  lua_pushstring(L, msg);
  lua_pushstring(L, code);
  return 3;
}

static int push_uv_error(lua_State *L, int err) {
  return push_error(L, uv_strerror(err), uv_err_name(err));
}

/* Seconds from argument idx: none/nil = wait forever (-1). */
static double opt_timeout(lua_State *L, int idx) {
  double s;
  if (lua_isnoneornil(L, idx)) return -1;
  s = luaL_checknumber(L, idx);
  if (!(s >= 0)) luaL_error(L, "process.wait: timeout must be a non-negative number of seconds");
  return s > 1e9 ? -1 : s;
}

/* ---- the child's handle ------------------------------------------------------------- */

static void process_free_if_done(fb_process_t *p) {
  if (p->closed && !p->boxed) {
    free(p);
    P.live_processes--;
  }
}

static void on_process_closed(uv_handle_t *h) {
  fb_process_t *p = h->data;
  p->closed = 1;
  process_free_if_done(p);
}

static void process_close_handle(fb_process_t *p) {
  if (p->closing) return;
  p->closing = 1;
  uv_close((uv_handle_t *)&p->h, on_process_closed);
}

/* Resumes the waiter, if any, with (exit_status, signal name | nil). */
static void resume_exited(fb_process_t *p) {
  fb_fiber_t *f = p->waiter;
  lua_State *co;
  if (!f) return;
  p->waiter = NULL;
  co = fb_fiber_thread(f);
  lua_checkstack(co, 2);
  lua_pushnumber(co, (lua_Number)p->exit_status);
  if (p->term_signal) push_signal_name(co, p->term_signal);
  else lua_pushnil(co);
  fb_fiber_ready(f, 2);
}

/* libuv reaps the child (its SIGCHLD handler) and calls this once; the handle is done. */
static void on_child_exit(uv_process_t *h, int64_t exit_status, int term_signal) {
  fb_process_t *p = h->data;
  p->exited = 1;
  p->exit_status = exit_status;
  p->term_signal = term_signal;
  resume_exited(p);
  process_close_handle(p);
}

static void wait_cancel(fb_fiber_t *f, void *data) {
  fb_process_t *p = data;
  (void)f;
  p->waiter = NULL;          /* the scheduler resumes the fiber with (nil, err) */
}

static fb_process_t *check_open(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, PROCESS_MT);
  if (!box->p) luaL_error(L, "process: the process object is closed");
  return box->p;
}

/* Counts spawn{}'s args list (checked again, entry by entry, when argv is filled in). */
static int count_args(lua_State *L, int opts) {
  int n;
  lua_getfield(L, opts, "args");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  luaL_argcheck(L, lua_istable(L, -1), 1, "args must be a list of strings");
  n = (int)lua_objlen(L, -1);
  if (n > MAX_ARGS - 1) luaL_error(L, "process.spawn: more than %d arguments", MAX_ARGS - 1);
  lua_pop(L, 1);
  return n;
}

/* Counts env{} entries (string keys and values) and checks them. */
static int count_env(lua_State *L, int opts) {
  int n = 0;
  lua_getfield(L, opts, "env");               /* stack: env */
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  luaL_argcheck(L, lua_istable(L, -1), 1, "env must be a table of strings");
  lua_pushnil(L);
  while (lua_next(L, -2)) {                   /* stack: env key value */
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "process.spawn: env keys and values must be strings");
    if (strchr(lua_tostring(L, -2), '=') || !*lua_tostring(L, -2))
      luaL_error(L, "process.spawn: env name '%s' is empty or holds '='", lua_tostring(L, -2));
    if (++n > MAX_ENV_ADDED) luaL_error(L, "process.spawn: more than %d env entries", MAX_ENV_ADDED);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return n;
}

/* Builds the child's environment: the inherited one, minus names env{} sets, plus env{}.
 * Returns a malloc'd NULL-terminated array whose added "K=V" strings are malloc'd too
 * (entries [0, nadded) of it); free with env_free. NULL when out of memory. */
static char **env_build(lua_State *L, int opts, int nadd, int *nadded) {
  size_t ninherit = 0, i, k = 0;
  char **envp;
  for (i = 0; environ && environ[i]; i++) ninherit++;
  envp = calloc(ninherit + (size_t)nadd + 1, sizeof *envp);
  if (!envp) return NULL;
  *nadded = 0;
  lua_getfield(L, opts, "env");               /* stack: env */
  lua_pushnil(L);
  while (lua_next(L, -2)) {                   /* stack: env key value */
    size_t klen, vlen;
    const char *key = lua_tolstring(L, -2, &klen), *val = lua_tolstring(L, -1, &vlen);
    char *kv = malloc(klen + vlen + 2);
    if (!kv) {
      lua_pop(L, 3);
      while (k > 0) free(envp[--k]);
      free(envp);
      return NULL;
    }
    memcpy(kv, key, klen);
    kv[klen] = '=';
    memcpy(kv + klen + 1, val, vlen + 1);
    envp[k++] = kv;
    lua_pop(L, 1);
  }
  *nadded = (int)k;
  for (i = 0; i < ninherit; i++) {
    const char *eq = strchr(environ[i], '=');
    size_t nlen = eq ? (size_t)(eq - environ[i]) : strlen(environ[i]);
    int overridden = 0;
    size_t j;
    for (j = 0; j < (size_t)*nadded && !overridden; j++)
      overridden = strncmp(envp[j], environ[i], nlen) == 0 && envp[j][nlen] == '=';
    if (!overridden) envp[k++] = environ[i];   /* borrowed: environ outlives the spawn */
  }
  envp[k] = NULL;
  lua_pop(L, 1);
  return envp;
}

static void env_free(char **envp, int nadded) {
  int i;
  if (!envp) return;
  for (i = 0; i < nadded; i++) free(envp[i]);
  free(envp);
}

/* spawn{ file | [1], args = {...}, env = {K = V} (added to the inherited environment),
 * cwd = dir, stdio = "inherit" | "ignore", detached = bool } -> process | nil, msg, code.
 * args are argv[1..]; argv[0] is file, looked up on PATH when it has no '/'. */
static int l_spawn(lua_State *L) {
  uv_process_options_t o;
  uv_stdio_container_t stdio[3];
  const char *argv_buf[MAX_ARGS + 1];
  fb_process_t *p;
  box_t *box;
  char **envp = NULL;
  int nargs, nenv, nadded = 0, i, rc;
  const char *file, *mode;

  luaL_checktype(L, 1, LUA_TTABLE);
  memset(&o, 0, sizeof o);
  lua_getfield(L, 1, "file");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_rawgeti(L, 1, 1);
  }
  if (lua_type(L, -1) != LUA_TSTRING) return luaL_argerror(L, 1, "file must be a string");
  file = lua_tostring(L, -1);                 /* borrowed: the options table holds it */
  lua_pop(L, 1);
  nargs = count_args(L, 1);
  nenv = count_env(L, 1);
  lua_getfield(L, 1, "stdio");
  mode = luaL_optstring(L, -1, "inherit");
  if (strcmp(mode, "inherit") != 0 && strcmp(mode, "ignore") != 0)
    return luaL_argerror(L, 1, "stdio must be \"inherit\" or \"ignore\"");
  lua_pop(L, 1);
  lua_getfield(L, 1, "cwd");
  if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
    return luaL_argerror(L, 1, "cwd must be a string");
  o.cwd = lua_tostring(L, -1);                /* borrowed, or NULL */
  lua_pop(L, 1);
  lua_getfield(L, 1, "detached");
  if (lua_toboolean(L, -1)) o.flags |= UV_PROCESS_DETACHED;
  lua_pop(L, 1);

  argv_buf[0] = file;
  lua_getfield(L, 1, "args");                 /* stack: args | nil */
  for (i = 1; i <= nargs; i++) {
    lua_rawgeti(L, -1, i);
    if (lua_type(L, -1) != LUA_TSTRING)
      return luaL_error(L, "process.spawn: args[%d] must be a string", i);
    argv_buf[i] = lua_tostring(L, -1);        /* borrowed: the args table holds it */
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  argv_buf[nargs + 1] = NULL;

  /* The userdata first (it may raise on OOM, harmlessly while it points nowhere); nothing
   * raises past it, and every allocation below is released on each path. */
  box = lua_newuserdata(L, sizeof *box);      /* stack: opts box */
  box->p = NULL;
  luaL_getmetatable(L, PROCESS_MT);
  lua_setmetatable(L, -2);
  if (nenv > 0 && !(envp = env_build(L, 1, nenv, &nadded)))
    return push_error(L, "out of memory", "ENOMEM");
  p = calloc(1, sizeof *p);
  if (!p) {
    env_free(envp, nadded);
    return push_error(L, "out of memory", "ENOMEM");
  }
  P.live_processes++;
  p->h.data = p;
  for (i = 0; i < 3; i++) {
    stdio[i].flags = strcmp(mode, "inherit") == 0 ? UV_INHERIT_FD : UV_IGNORE;
    stdio[i].data.fd = i;
  }
  o.file = file;
  o.args = (char **)argv_buf;
  o.env = envp;
  o.stdio_count = 3;
  o.stdio = stdio;
  o.exit_cb = on_child_exit;
  rc = uv_spawn(fb_sched_loop(), &p->h, &o);
  env_free(envp, nadded);                      /* the child has its copy (exec'd or failed) */
  if (rc != 0) {
    process_close_handle(p);                   /* libuv initialised the handle: close it */
    return push_uv_error(L, rc);
  }
  p->pid = p->h.pid;
  box->p = p;
  p->boxed = 1;
  return 1;
}

static int l_process_pid(lua_State *L) {
  lua_pushinteger(L, check_open(L)->pid);
  return 1;
}

/* wait([timeout]) -> exit_status, signal name | nil; nil, err (timeout, cancel); nil, msg,
 * "closed" when the object is closed meanwhile. Answers at once after the exit. */
static int l_process_wait(lua_State *L) {
  fb_process_t *p = check_open(L);
  double timeout = opt_timeout(L, 2);
  fb_fiber_t *f;
  if (p->exited) {
    lua_pushnumber(L, (lua_Number)p->exit_status);
    if (p->term_signal) push_signal_name(L, p->term_signal);
    else lua_pushnil(L);
    return 2;
  }
  if (p->waiter) return luaL_error(L, "process.wait: another fiber is already waiting for pid %d",
                                   p->pid);
  f = fb_fiber_check(L, "process.wait");
  p->waiter = f;
  fb_fiber_on_cancel(f, wait_cancel, p);
  return fb_fiber_suspend(L, f, timeout);
}

/* kill([signal]) -> true | nil, msg, code ("ESRCH" once the child has exited). */
static int l_process_kill(lua_State *L) {
  fb_process_t *p = check_open(L);
  int signum = check_signal(L, 2), rc;
  if (p->exited || p->closing) return push_error(L, "the process has exited", "ESRCH");
  rc = uv_process_kill(&p->h, signum);
  if (rc != 0) return push_uv_error(L, rc);
  lua_pushboolean(L, 1);
  return 1;
}

/* exited() -> false | true, exit_status, signal name | nil */
static int l_process_exited(lua_State *L) {
  fb_process_t *p = check_open(L);
  lua_pushboolean(L, p->exited);
  if (!p->exited) return 1;
  lua_pushnumber(L, (lua_Number)p->exit_status);
  if (p->term_signal) push_signal_name(L, p->term_signal);
  else lua_pushnil(L);
  return 3;
}

/* close, __close and __gc: idempotent. Does not signal the child: one still running is
 * left to run (and is no longer reaped by this process). A fiber in wait() resumes with
 * (nil, "process object is closed", "closed"). */
static int l_process_close(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, PROCESS_MT);
  fb_process_t *p = box->p;
  if (!p) return 0;
  box->p = NULL;
  p->boxed = 0;
  if (p->waiter) {
    fb_fiber_t *f = p->waiter;
    lua_State *co = fb_fiber_thread(f);
    p->waiter = NULL;
    lua_checkstack(co, 3);
    fb_fiber_ready(f, push_error(co, "the process object is closed", "closed"));
  }
  if (p->closed) process_free_if_done(p);
  else process_close_handle(p);
  return 0;
}

static int l_process_is_closed(lua_State *L) {
  box_t *box = luaL_checkudata(L, 1, PROCESS_MT);
  lua_pushboolean(L, box->p == NULL);
  return 1;
}

/* ---- this process ------------------------------------------------------------------- */

static int l_pid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_os_getpid());
  return 1;
}

static int l_ppid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)uv_os_getppid());
  return 1;
}

/* kill(pid, [signal]) -> true | nil, msg, code ("ESRCH": no such process). */
static int l_kill(lua_State *L) {
  int pid = (int)luaL_checkinteger(L, 1), signum = check_signal(L, 2), rc;
  luaL_argcheck(L, pid > 0, 1, "pid must be a positive integer");
  rc = uv_kill(pid, signum);
  if (rc != 0) return push_uv_error(L, rc);
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- signal traps ------------------------------------------------------------------- */

static void on_trapped(uv_signal_t *h, int signum) {
  (void)h;
  (void)signum;               /* caught, and nothing else: the point is to not die of it */
}

static void on_trap_closed(uv_handle_t *h) {
  free(h);
  P.live_traps--;
}

/* trap(signal) -> trap. While a trap is open the signal never takes its default action in
 * this process: libuv's handler stays installed, so the signal still reaches every
 * signal.wait() and is otherwise ignored. A one-shot wait ending cannot leave a window in
 * which a repeated signal kills a draining server. The handle is unref'd: it does not keep
 * the loop alive. */
static int l_trap(lua_State *L) {
  int signum = check_signal(L, 1), rc;
  trap_box_t *box;
  uv_signal_t *h;
  luaL_argcheck(L, signum != SIGKILL && signum != SIGSTOP && signum != 0, 1,
                "this signal cannot be trapped");
  box = lua_newuserdata(L, sizeof *box);      /* before the malloc: a raise here leaks nothing */
  box->h = NULL;
  luaL_getmetatable(L, TRAP_MT);
  lua_setmetatable(L, -2);
  h = malloc(sizeof *h);
  if (!h) return push_error(L, "out of memory", "ENOMEM");
  uv_signal_init(fb_sched_loop(), h);
  P.live_traps++;
  rc = uv_signal_start(h, on_trapped, signum);
  if (rc != 0) {
    uv_close((uv_handle_t *)h, on_trap_closed);
    return push_uv_error(L, rc);
  }
  uv_unref((uv_handle_t *)h);
  box->h = h;
  return 1;
}

/* close and __gc: idempotent; the signal's previous handling returns. */
static int l_trap_close(lua_State *L) {
  trap_box_t *box = luaL_checkudata(L, 1, TRAP_MT);
  if (!box->h) return 0;
  uv_close((uv_handle_t *)box->h, on_trap_closed);
  box->h = NULL;
  return 0;
}

/* ---- a reserved port ---------------------------------------------------------------- */

/* reserve_port(host, port) -> reservation | nil, msg, code. Binds a TCP socket with
 * SO_REUSEPORT and never listens on it: no connection ever lands on it, yet while it is
 * open no process without SO_REUSEPORT (and the same user) can take the port. Port 0 picks
 * a free one; reservation:port() says which. Close-on-exec, so children never inherit it. */
static int l_reserve_port(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  int port = (int)luaL_checkinteger(L, 2), fd, one = 1, err;
  struct sockaddr_storage addr;
  port_box_t *box;
  luaL_argcheck(L, port >= 0 && port <= 65535, 2, "port must be from 0 to 65535");
  memset(&addr, 0, sizeof addr);
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&addr) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr) != 0)
    return push_error(L, "bad host (give an IPv4 or IPv6 address)", "EINVAL");
  fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return push_uv_error(L, -errno);
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
      bind(fd, (struct sockaddr *)&addr, addr.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                                   : sizeof(struct sockaddr_in)) != 0) {
    err = -errno;
    close(fd);
    return push_uv_error(L, err);
  }
  box = lua_newuserdata(L, sizeof *box);
  box->fd = fd;
  P.live_ports++;
  luaL_getmetatable(L, PORT_MT);
  lua_setmetatable(L, -2);
  return 1;
}

static int l_port_port(lua_State *L) {
  port_box_t *box = luaL_checkudata(L, 1, PORT_MT);
  struct sockaddr_storage a;
  socklen_t n = sizeof a;
  if (box->fd < 0) return luaL_error(L, "process: the port reservation is closed");
  if (getsockname(box->fd, (struct sockaddr *)&a, &n) != 0) return push_uv_error(L, -errno);
  lua_pushinteger(L, ntohs(a.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&a)->sin6_port
                                                   : ((struct sockaddr_in *)&a)->sin_port));
  return 1;
}

/* close and __gc: idempotent. */
static int l_port_close(lua_State *L) {
  port_box_t *box = luaL_checkudata(L, 1, PORT_MT);
  if (box->fd < 0) return 0;
  close(box->fd);
  box->fd = -1;
  P.live_ports--;
  return 0;
}

/* live() -> child process objects not yet freed, reserved ports open, traps not freed. */
static int l_live(lua_State *L) {
  lua_pushnumber(L, (lua_Number)P.live_processes);
  lua_pushnumber(L, (lua_Number)P.live_ports);
  lua_pushnumber(L, (lua_Number)P.live_traps);
  return 3;
}

static const luaL_Reg process_methods[] = {
  { "pid", l_process_pid },
  { "wait", l_process_wait },
  { "kill", l_process_kill },
  { "exited", l_process_exited },
  { "close", l_process_close },
  { "is_closed", l_process_is_closed },
  { NULL, NULL }
};

static const luaL_Reg port_methods[] = {
  { "port", l_port_port },
  { "close", l_port_close },
  { NULL, NULL }
};

static const luaL_Reg process_funcs[] = {
  { "spawn", l_spawn },
  { "pid", l_pid },
  { "ppid", l_ppid },
  { "kill", l_kill },
  { "reserve_port", l_reserve_port },
  { "trap", l_trap },
  { "live", l_live },
  { NULL, NULL }
};

int luaopen_fibril_core_process(lua_State *L) {
  lua_newtable(L);                            /* stack: module */
  luaL_setfuncs(L, process_funcs, 0);
  lua_newtable(L);                            /* stack: module methods */
  luaL_setfuncs(L, process_methods, 0);
  if (luaL_newmetatable(L, PROCESS_MT)) {     /* stack: module methods mt */
    lua_pushvalue(L, -2);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_process_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_process_close);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  lua_setfield(L, -2, "methods");             /* for lua/fibril/process.lua */
  if (luaL_newmetatable(L, PORT_MT)) {        /* stack: module mt */
    lua_newtable(L);
    luaL_setfuncs(L, port_methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_port_close);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, TRAP_MT)) {        /* stack: module mt */
    lua_newtable(L);
    lua_pushcfunction(L, l_trap_close);
    lua_setfield(L, -2, "close");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_trap_close);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  return 1;
}
