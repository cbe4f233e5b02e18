"""Run untrusted Python (model tool calls, HumanEval solutions) in a throw-away jail.

    from model.sandbox import run_python, run_tool_call
    r = run_python("print(6 * 7)", timeout=5.0, memory_mb=256)
    r.success, r.stdout, r.error, r.timed_out, r.jail      # True, "42\\n", None, False, "bwrap"
    run_tool_call("6 * 7", timeout=5.0, memory_mb=256)       # "42": the model's tool call, REPL-style

Defense in depth; any one layer failing still leaves the others:
1. A separate process in its own session / process group, killed as a group (SIGKILL) on timeout or when done,
   so no grandchild outlives the call. The parent reads stdout/stderr incrementally and stops (and kills) once
   `max_output` bytes arrived: a huge print costs the parent nothing.
2. Resource limits set by the trusted bootstrap before user code: RLIMIT_CPU (timeout + 1 s), RLIMIT_AS
   (address space = memory_mb), RLIMIT_FSIZE (files <= 16 MiB), RLIMIT_NPROC (fork limit), RLIMIT_NOFILE,
   no core dumps; plus a wall-clock timeout in the parent. Started as root, the bootstrap drops to uid/gid
   65534 (nobody), so RLIMIT_NPROC applies (the kernel exempts root) and file permissions bite.
3. A PEP 578 audit hook (sys.addaudithook; it cannot be removed) installed before user code: it refuses
   sockets, subprocess / os.system / os.exec* / os.spawn* / os.fork / os.posix_spawn / os.kill, ctypes, imports
   of socket / ctypes / subprocess machinery, open() for writing and remove / rename / mkdir / chmod / symlink
   outside the temp dir (the cwd; chdir is refused), setrlimit, gc introspection, and re-assigning a function's
   __defaults__ / __code__ (all the hook's state lives in its default arguments, so code that walks frames to the
   bootstrap's globals still cannot loosen it). Dangerous os functions are replaced by stubs that raise.
4. An OS-level jail when bubblewrap (`bwrap`) is installed and works: new network namespace (no interfaces
   but a down-or-empty loopback: nothing to connect to), new PID namespace (everything dies with it), IPC and
   UTS namespaces, a root made of read-only binds of /usr and the Python install only (no /home, /root, /etc,
   repo or checkpoints visible), a fresh tmpfs /tmp with the throw-away dir as the only writable path.
   Without bwrap (a fresh machine, a container without user namespaces) the call still runs on layers 1-3 and
   says so in `ExecResult.jail` ("none: <why>").

nanochat's sandbox (layers 1-2 + nulled functions,
https://github.com/karpathy/nanochat/blob/master/nanochat/execution.py) leaks network and ctypes;
tests/test_sandbox.py shows both blocked here, each with the audit hook alone and, where bwrap exists, with the jail
alone.
"""
import ast
import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MAX_OUTPUT = 64 * 1024  # bytes per stream; more and the program is killed and marked as an error
FILE_SIZE_LIMIT = 16 * 1024 * 1024
NOBODY = 65534


@dataclass
class ExecResult:
    stdout: str
    stderr: str
    error: str | None  # None on success; else a one-line reason ("ZeroDivisionError: ...", "timed out", ...)
    timed_out: bool
    success: bool
    jail: str = ""  # "bwrap" or "none: <why>": which OS-level jail this run had
    returncode: int | None = None


# The trusted bootstrap: runs first in the child, arms every layer, then executes the user code read from stdin.
# argv: [result_fd, workdir, timeout_s, memory_mb, max_file_bytes, layers(json)]
_BOOTSTRAP = r'''
import sys, os, json, resource, builtins, stat
_fd = int(sys.argv[1]); _work = os.path.realpath(sys.argv[2]); _layers = json.loads(sys.argv[6])
_code = sys.stdin.read()
sys.stdin = open(os.devnull)
def _report(err):
    try: os.write(_fd, json.dumps({"error": err}).encode()[:4096])
    except Exception: pass
import pathlib  # the hook accepts pathlib paths; privileges are only dropped where nobody can read the stdlib
if _layers["rlimits"]:
    _t = int(float(sys.argv[3])) + 1
    for _r, _v in ((resource.RLIMIT_CPU, (_t, _t + 1)), (resource.RLIMIT_AS, (int(sys.argv[4]) << 20,) * 2),
                   (resource.RLIMIT_FSIZE, (int(sys.argv[5]),) * 2), (resource.RLIMIT_NPROC, (32, 32)),
                   (resource.RLIMIT_NOFILE, (64, 64)), (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(_r, _v)
    if _layers["drop"]:  # drop root: RLIMIT_NPROC does not apply to root, file permissions do not either
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.chdir(_work)
if _layers["audit"]:
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _BANNED_EVENTS = frozenset((
        "os.system", "os.exec", "os.spawn", "os.fork", "os.forkpty", "os.posix_spawn", "os.kill", "os.killpg",
        "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
        "ctypes.addressof", "ctypes.string_at", "ctypes.wstring_at", "socket.__new__", "socket.connect",
        "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto", "socket.sendmsg",
        "resource.setrlimit", "resource.prlimit", "gc.get_referrers",
        "gc.get_referents", "gc.get_objects", "os.chroot", "os.setuid", "signal.pthread_kill", "mmap.__new__",
        "os.symlink", "os.link", "os.chown", "os.chflags", "os.startfile", "webbrowser.open", "sys.addaudithook",
        "sys.setprofile", "sys.settrace", "code.__new__", "os.chdir", "os.fchdir"))
    _BANNED_MODULES = frozenset(("socket", "_socket", "ctypes", "_ctypes", "subprocess", "_posixsubprocess",
        "multiprocessing", "_multiprocessing", "pty", "ssl", "_ssl", "posix", "nt", "webbrowser"))
    _FUNC_ATTRS = frozenset(("__defaults__", "__kwdefaults__", "__code__", "__globals__", "__closure__"))
    _PATH_TYPES = (str, bytes, type(pathlib.Path()), type(pathlib.PurePath()))
    _PATH_EVENTS = frozenset(("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.truncate", "os.utime",
                              "shutil.rmtree", "os.rename", "os.listxattr", "os.setxattr", "os.removexattr"))

    def _inside(p, _work=_work, _T=_PATH_TYPES, _isinstance=isinstance, _str=str, _type=type):
        """Is path p inside the temp dir? Pure string work on captured builtins: user code cannot monkeypatch
        os.path to fool it, cannot chdir (blocked), cannot make symlinks (blocked), so no symlink resolution."""
        if _isinstance(p, int):  # an fd that was itself opened through this check
            return True
        if _type(p) not in _T:
            return False
        p = p.decode("utf-8", "surrogateescape") if _type(p) is bytes else _str(p)
        if not p.startswith("/"):
            p = _work + "/" + p
        parts = []
        for c in p.split("/"):
            if c == "..":
                if parts: parts.pop()
            elif c and c != ".":
                parts.append(c)
        return ("/" + "/".join(parts) + "/").startswith(_work + "/")

    # Every piece of state the hook reads is bound as a default argument (setting __defaults__ is refused), so
    # user code that reaches this module's globals (frames are not hidden) still cannot loosen it.
    def _hook(event, args, _B=_BANNED_EVENTS, _M=_BANNED_MODULES, _FA=_FUNC_ATTRS, _P=_PATH_EVENTS,
              _in=_inside, _W=_W, _D=os.O_DIRECTORY, _stat=os.stat, _isdir=stat.S_ISDIR, _any=any,
              _isinstance=isinstance, _int=int, _E=PermissionError, _SELF=()):
        if event in _B:
            raise _E(f"sandbox: {event} is not allowed")
        if event == "import" and (args[0] in _M or args[0].split(".")[0] in _M):
            raise ImportError(f"sandbox: import of {args[0]} is not allowed")
        if event == "object.__setattr__" and args[1] in _FA and _any(args[0] is f for f in _SELF):
            raise _E(f"sandbox: changing the sandbox's .{args[1]} is not allowed")
        if event == "open" and args[0] is not None:
            writing = (args[2] or 0) & _W or _any(c in (args[1] or "") for c in "wax+")
            if writing and not _in(args[0]):
                raise _E(f"sandbox: writing {args[0]!r} outside the temp dir is not allowed")
            # no fds of outside directories: with dir_fd they would make relative paths escape the check above
            if not _in(args[0]) and ((args[2] or 0) & _D or _isdir(_stat(args[0]).st_mode)):
                raise _E(f"sandbox: opening directory {args[0]!r} outside the temp dir is not allowed")
        if event in _P:
            paths = args[:2] if event == "os.rename" else args[:1]
            if _any(_isinstance(a, _int) and a >= 0 for a in args[2:] if a is not True and a is not False):
                raise _E(f"sandbox: {event} with dir_fd is not allowed")
            for p in paths:
                if p is not None and not _in(p):
                    raise _E(f"sandbox: {event} of {p!r} outside the temp dir is not allowed")
    _hook.__defaults__ = _hook.__defaults__[:-1] + ((_hook, _inside),)  # the functions whose state is guarded

    def _deny(name):
        def stub(*a, **k):
            raise PermissionError(f"sandbox: {name} is disabled")
        return stub
    import posix
    for _n in ("system", "fork", "forkpty", "kill", "killpg", "setuid", "setgid", "setreuid", "setregid",
               "setresuid", "setresgid", "setsid", "setpgid", "chroot", "execv", "execve", "execl", "execlp",
               "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnvp", "posix_spawn",
               "posix_spawnp", "popen", "symlink", "link", "chown", "lchown", "fchown", "chdir", "fchdir"):
        for _mod in (os, posix):
            if hasattr(_mod, _n):
                setattr(_mod, _n, _deny("os." + _n))
    for _m in list(sys.modules):  # posix stays cached (patched); a re-import after `del sys.modules[...]` is refused
        if _m in _BANNED_MODULES and _m not in ("posix", "nt"):
            del sys.modules[_m]
    builtins.exit = builtins.quit = _deny("exit()")
    sys.addaudithook(_hook)
del _layers
import types
_main = types.ModuleType("__main__")  # user code gets a fresh __main__: `import __main__` cannot reach us
_main.__builtins__ = builtins
sys.modules["__main__"] = _main
try:
    exec(compile(_code, "<sandbox>", "exec"), _main.__dict__)
except BaseException as e:
    name = type(e).__name__
    if isinstance(e, SystemExit):
        msg = f"SystemExit({e.code}): exiting is not allowed"
    else:
        msg = f"{name}: {e}" if str(e) else name
    try: sys.stdout.flush()
    except BaseException: pass
    _report(msg)
    os._exit(1)
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
'''


_bwrap_status = None  # cached (ok: bool, why: str)


def _bwrap_args(workdir):
    """bwrap command prefix: read-only system + Python install, private /tmp with workdir the only writable dir."""
    args = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--proc", "/proc", "--dev", "/dev"]
    for p in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(p):
            args += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            args += ["--ro-bind", p, p]
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/") and prefix != "/usr":
        parts = prefix.strip("/").split("/")
        for i in range(1, len(parts)):  # parents of the Python install must be traversable by nobody
            args += ["--perms", "0755", "--dir", "/" + "/".join(parts[:i])]
        args += ["--ro-bind", prefix, prefix]
    args += ["--tmpfs", "/tmp", "--bind", workdir, workdir, "--chdir", workdir]
    return args


def _python():
    return os.path.realpath(sys.executable)


def bwrap_available():
    """(ok, why): is bubblewrap installed and able to run Python here? Probed once per process."""
    global _bwrap_status
    if _bwrap_status is None:
        if os.environ.get("TRITONCHAT_NO_BWRAP") == "1":
            _bwrap_status = (False, "bubblewrap disabled by TRITONCHAT_NO_BWRAP=1")
        elif shutil.which("bwrap") is None:
            _bwrap_status = (False, "bubblewrap (bwrap) not installed; `apt-get install bubblewrap` adds the OS jail")
        else:
            with tempfile.TemporaryDirectory(prefix="tc_sbx_probe_") as d:
                try:
                    p = subprocess.run(_bwrap_args(d) + [_python(), "-I", "-S", "-c", "print('ok')"],
                                       capture_output=True, timeout=20)
                    ok = p.returncode == 0 and p.stdout.strip() == b"ok"
                    why = "" if ok else f"bwrap does not work here: {p.stderr.decode(errors='replace').strip()[:200]}"
                except (OSError, subprocess.TimeoutExpired) as e:
                    ok, why = False, f"bwrap does not work here: {e}"
            _bwrap_status = (ok, why)
    return _bwrap_status


def _world_readable(path):
    """Can any user reach and read `path` (o+x on every parent, o+rx on path)?"""
    parts = os.path.realpath(path).split("/")
    for i in range(2, len(parts) + 1):
        mode = os.stat("/".join(parts[:i]) or "/").st_mode
        if not mode & stat.S_IXOTH or (i == len(parts) and not mode & stat.S_IROTH):
            return False
    return True


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run(code, timeout=5.0, memory_mb=256, max_output=MAX_OUTPUT, *, audit=True, rlimits=True, jail=True):
    """run_python with switches for each layer, so tests can show that every layer holds on its own."""
    ok, why = bwrap_available() if jail else (False, "jail switched off")
    workdir = tempfile.mkdtemp(prefix="tc_sbx_")
    r_fd, w_fd = os.pipe()
    try:
        if os.getuid() == 0 and rlimits:
            os.chown(workdir, NOBODY, NOBODY)  # the bootstrap drops to nobody, who must own the temp dir
        # Drop root to nobody, in the jail always (its Python bind is world-readable), outside only when nobody
        # can still read the Python install (a Python under /root cannot be: then the hook has to do).
        drop = rlimits and os.getuid() == 0 and (ok or _world_readable(os.path.dirname(os.__file__)))
        layers = json.dumps({"audit": audit, "rlimits": rlimits, "drop": drop})
        cmd = [_python(), "-I", "-S", "-B", "-c", _BOOTSTRAP, str(w_fd), workdir, str(timeout), str(memory_mb),
               str(FILE_SIZE_LIMIT), layers]
        if ok:
            cmd = _bwrap_args(workdir) + cmd
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": workdir}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(w_fd,), cwd=workdir, env=env, start_new_session=True)
        os.close(w_fd)
        w_fd = None
        try:
            proc.stdin.write(code.encode("utf-8", errors="replace"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out, err, timed_out, overflow = _collect(proc, timeout, max_output)
        _kill_group(proc)  # anything the program left behind dies with it
        rc = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        report = _read_all(r_fd)
    finally:
        if w_fd is not None:
            os.close(w_fd)
        os.close(r_fd)
        shutil.rmtree(workdir, ignore_errors=True)
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif overflow:
        error = f"output limit exceeded ({max_output} bytes); program killed"
    elif rc != 0:
        try:
            error = json.loads(report)["error"] if report else None
        except (ValueError, KeyError, TypeError):
            error = None
        if error is None:
            error = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            if rc in (-signal.SIGXCPU, -signal.SIGKILL) or "MemoryError" in stderr:
                error += " (CPU or memory limit)"
    jail_note = "bwrap" if ok else f"none: {why}"
    if os.getuid() == 0 and rlimits and not drop:
        jail_note += "; ran as root (the Python install is not readable by nobody), so RLIMIT_NPROC does not bind"
    return ExecResult(stdout, stderr, error, timed_out, error is None, jail_note, rc)


def _collect(proc, timeout, max_output):
    """Read both pipes as data arrives until EOF, the deadline, or too much output. Never buffers > max_output."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    timed_out = overflow = False
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(min(left, 0.25)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
                continue
            buf = bufs[key.fd]
            buf += chunk[:max_output - len(buf)]
            if len(buf) >= max_output:
                overflow = True
        if overflow:
            break
    # EOF on both pipes; give the process (not its vanished children) the rest of the deadline to exit
    if not timed_out and not overflow:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    sel.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), timed_out, overflow


def _read_all(fd):
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) < 8192:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    return data.decode("utf-8", "replace")


def run_python(code, timeout=5.0, memory_mb=256, max_output=MAX_OUTPUT):
    """Execute `code` in a fresh jailed Python process. Never raises for anything the code does.

    Returns ExecResult(stdout, stderr, error, timed_out, success, jail, returncode); stdout/stderr are capped at
    `max_output` bytes each (more kills the program: error "output limit exceeded")."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    return _run(code, timeout=timeout, memory_mb=memory_mb, max_output=max_output)


def _print_last_expression(code):
    """`code` with a trailing expression statement wrapped in print(), as a REPL shows it; unchanged if the code
    ends otherwise or does not parse (the sandbox then reports the SyntaxError)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    last = tree.body[-1]
    tree.body[-1] = ast.Expr(ast.Call(ast.Name("print", ast.Load()), [last.value], []))
    return ast.unparse(ast.fix_missing_locations(tree))


def run_tool_call(code, timeout=5.0, memory_mb=256):
    """Run a model's python tool call (the text between <|python_start|> and <|python_end|>) -> the tool's answer.

    A trailing expression is printed, REPL-style, so a calculator call such as `12 * 7` answers "84". The answer is
    stdout without its final newline; a failed call answers its stdout followed by "Error: <reason>" ("Error: timed
    out"). Limits as run_python: timeout in seconds, memory_mb of address space."""
    res = run_python(_print_last_expression(code), timeout=timeout, memory_mb=memory_mb)
    if res.success:
        return res.stdout.rstrip("\n")
    err = "timed out" if res.timed_out else (res.error or "error")
    return (res.stdout + "Error: " + err).strip()


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()
    print(run_python(src))
