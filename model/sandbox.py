"""Run untrusted Python (model tool calls, HumanEval solutions) inside an OS jail, or not at all.

    r = run_python("print(6 * 7)", timeout=5.0, memory_mb=256)  # r.success, r.stdout == "42\\n", r.jail == "bwrap"
    run_tool_call("6 * 7")                                        # "42": exactly what a Python REPL shows
    jail_status().banner                                          # one line saying how the tool runs here

Every call gets a fresh jail, in three layers:
1. bubblewrap (_bwrap_args), started unprivileged: new user (uid 65534, no capabilities, no nested user namespaces),
   PID, network, IPC, UTS and cgroup namespaces; read-only binds of /usr and the Python install, a TEMP_QUOTA tmpfs /tmp
   as the only writable path; killing the jail's PID 1 ends every process in it; a seccomp filter (seccomp_program).
2. rlimits (CPU, address space, file size, processes, fds, no core) set by the trusted bootstrap before user code; in
   the parent a wall-clock timeout and a `max_output` cap per stream, then the process group is killed.
3. A PEP 578 audit hook: a tripwire, not a wall (native code walks past it), turning the obvious attempts (sockets,
   subprocesses, ctypes, writes outside the temp dir) into clear errors.
Without a working bwrap the tool refuses, naming the reason and the fix; only TRITONCHAT_UNSAFE_NO_JAIL=1 runs layers
2-3 without the jail, for code you trust. nanochat's sandbox (layer 2 plus nulled functions, no OS boundary):
https://github.com/karpathy/nanochat/blob/master/nanochat/execution.py"""
import contextlib
import dataclasses
import errno
import functools
import itertools
import json
import os
import re
import select
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

MAX_OUTPUT = 64 * 1024  # bytes per stream; more and the program is killed and marked as an error
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # bytes per file (RLIMIT_FSIZE)
TEMP_QUOTA = 32 * 1024 * 1024  # bytes of the jail's /tmp, all files together
NOBODY = 65534
UNSAFE_ENV = "TRITONCHAT_UNSAFE_NO_JAIL"
BWRAP = "bwrap"  # looked up on PATH (tests point it at a missing file to take the jail away)
SYSTEM_PYTHON = "/usr/bin/python3"
UNSAFE_HINT = f"only for code you trust, {UNSAFE_ENV}=1 runs it without a jail"
INSTALL_HINT = f"install bubblewrap (`sudo apt-get install -y bubblewrap`, or `make install` as root); {UNSAFE_HINT}"
USERNS_HINT = ("the jail needs unprivileged user namespaces (sysctl user.max_user_namespaces > 0; where AppArmor "
               f"restricts them, kernel.apparmor_restrict_unprivileged_userns=0); {UNSAFE_HINT}")
_TAG = "tc_sbx_"  # heads every call's code (so ps shows it) and names unsafe-mode temp dirs: tc_sbx_<pid>_<n>

@dataclasses.dataclass
class ExecResult:
    stdout: str
    stderr: str
    error: str | None  # None on success; else a one-line reason ("ZeroDivisionError: ...", "timed out", ...)
    timed_out: bool
    success: bool
    jail: str = ""  # "bwrap", or "none: <why>" when the call ran without a jail or was refused
    returncode: int | None = None

@dataclasses.dataclass(frozen=True)
class JailStatus:
    """How the python tool runs on this machine (jail_status())."""
    mode: str                # "bwrap" (jailed), "unsafe" (no jail, TRITONCHAT_UNSAFE_NO_JAIL=1) or "refused"
    why: str                 # why there is no jail ("" when jailed)
    python: str | None = None  # the interpreter that runs user code
    prefix: str | None = None  # its install prefix (bound read-only into the jail)
    bwrap: str | None = None   # the bwrap binary
    fix: str = INSTALL_HINT    # how to get the jail

    @property
    def banner(self):
        """One line for the chat CLI and the server to print at start."""
        if self.mode == "bwrap":
            return (f"python tool: jailed by bubblewrap (no network, own user/PID namespaces, uid {NOBODY}, read-only "
                    f"system, {TEMP_QUOTA >> 20} MiB temp dir; {self.python})")
        if self.mode == "unsafe":
            return (f"python tool: UNSAFE, NO JAIL ({UNSAFE_ENV}=1): model-written code runs with resource limits "
                    f"and an audit hook only ({self.why})")
        return f"python tool: DISABLED: {self.why}. To enable it: {self.fix}"

# The trusted bootstrap: arms layers 2-3, then runs the code from stdin (as a program, or as the REPL does: "single"
# mode shows each expression's repr). argv: result_fd, workdir, timeout_s, memory_mb, max_file_bytes, layers, tag
_BOOTSTRAP = r'''
import sys, os, json, resource, builtins, stat, ast
_fd = int(sys.argv[1]); _work = os.path.realpath(sys.argv[2]); _layers = json.loads(sys.argv[6])
_code = sys.stdin.read()
sys.stdin = open(os.devnull)
import pathlib  # imported before the hook: the hook accepts pathlib paths
if _layers["rlimits"]:
    _t = int(float(sys.argv[3])) + 1
    for _r, _v in ((resource.RLIMIT_CPU, (_t, _t + 1)), (resource.RLIMIT_AS, (int(sys.argv[4]) << 20,) * 2),
                   (resource.RLIMIT_FSIZE, (int(sys.argv[5]),) * 2), (resource.RLIMIT_NPROC, (32, 32)),
                   (resource.RLIMIT_NOFILE, (64, 64)), (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(_r, _v)
os.chdir(_work)
if _layers["audit"]:
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _BANNED_EVENTS = frozenset("""os.system os.exec os.spawn os.fork os.forkpty os.posix_spawn os.kill os.killpg
        subprocess.Popen pty.spawn ctypes.dlopen ctypes.dlsym ctypes.cdata ctypes.call_function ctypes.addressof
        ctypes.string_at ctypes.wstring_at socket.__new__ socket.connect socket.bind socket.getaddrinfo
        socket.gethostbyname socket.sendto socket.sendmsg resource.setrlimit resource.prlimit gc.get_referrers
        gc.get_referents gc.get_objects os.chroot os.setuid signal.pthread_kill mmap.__new__ os.symlink os.link
        os.chown os.chflags os.startfile webbrowser.open sys.addaudithook sys.setprofile sys.settrace code.__new__
        os.chdir os.fchdir""".split())
    _BANNED_MODULES = frozenset("""socket _socket ctypes _ctypes subprocess _posixsubprocess multiprocessing
        _multiprocessing pty ssl _ssl posix nt webbrowser""".split())
    _FUNC_ATTRS = frozenset(("__defaults__", "__kwdefaults__", "__code__", "__globals__", "__closure__"))
    _PATH_TYPES = (str, bytes, type(pathlib.Path()), type(pathlib.PurePath()))
    _PATH_EVENTS = frozenset("""os.remove os.rmdir os.mkdir os.chmod os.truncate os.utime shutil.rmtree os.rename
        os.listxattr os.setxattr os.removexattr""".split())

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
              _isinstance=isinstance, _int=int, _str=str, _E=PermissionError, _SELF=()):
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
        if event == "sqlite3.connect" and args[0] != ":memory:" and (
                not _in(args[0]) or _str(args[0]).startswith("file:")):
            raise _E(f"sandbox: a database at {args[0]!r} outside the temp dir is not allowed")
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
    for _n in """system fork forkpty kill killpg setuid setgid setreuid setregid setresuid setresgid setsid setpgid
               chroot execv execve execl execlp execvp execvpe spawnv spawnve spawnl spawnle spawnlp spawnvp
               posix_spawn posix_spawnp popen symlink link chown lchown fchown chdir fchdir mkfifo mknod""".split():
        for _mod in (os, posix):
            if hasattr(_mod, _n):
                setattr(_mod, _n, _deny("os." + _n))
    for _m in list(sys.modules):  # posix stays cached (patched); a re-import after `del sys.modules[...]` is refused
        if _m in _BANNED_MODULES and _m not in ("posix", "nt"):
            del sys.modules[_m]
    builtins.exit = builtins.quit = _deny("exit()")
    sys.addaudithook(_hook)
_repl = _layers["repl"]
del _layers
import types
_main = types.ModuleType("__main__")  # user code gets a fresh __main__: `import __main__` cannot reach us
_main.__builtins__ = builtins
sys.modules["__main__"] = _main
try:
    _compiled = (compile(ast.Interactive(ast.parse(_code, "<sandbox>").body), "<sandbox>", "single") if _repl
                 else compile(_code, "<sandbox>", "exec"))
    exec(_compiled, _main.__dict__)
except BaseException as e:
    msg = (f"SystemExit({e.code}): exiting is not allowed" if isinstance(e, SystemExit)
           else f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    try: sys.stdout.flush()
    except BaseException: pass
    try: os.write(_fd, json.dumps({"error": msg}).encode()[:4096])
    except Exception: pass
    os._exit(1)
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
'''

# Seccomp: syscalls answered with EPERM inside the jail. name: (x86_64 number, aarch64 number).
_DENIED_SYSCALLS = {
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "keyctl": (250, 219),
    "add_key": (248, 217), "request_key": (249, 218), "bpf": (321, 280), "userfaultfd": (323, 282),
    "perf_event_open": (298, 241), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "unshare": (272, 97), "setns": (308, 268), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "swapon": (167, 224), "swapoff": (168, 225),
    "reboot": (169, 142), "acct": (163, 89), "quotactl": (179, 60), "syslog": (103, 116), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "mount_setattr": (442, 442),
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # linux/audit.h

def seccomp_program(machine=None):
    """Classic BPF (struct sock_filter array, as bwrap --seccomp reads it) denying _DENIED_SYSCALLS with EPERM and
    every syscall of a foreign ABI (i386 on x86_64, x32); None on an architecture without a table here."""
    machine = machine or os.uname().machine
    if machine not in _AUDIT_ARCH:
        return None
    nrs = sorted({nums[0 if machine == "x86_64" else 1] for nums in _DENIED_SYSCALLS.values()})
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO(EPERM)
    # seccomp_data: nr at offset 0, arch at offset 4; jump offsets count the instructions skipped
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, _AUDIT_ARCH[machine]), (ret, 0, 0, deny), (ld, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((jge, len(nrs) + 1, 0, 0x40000000))  # __X32_SYSCALL_BIT
    prog += [(jeq, len(nrs) - i, 0, nr) for i, nr in enumerate(nrs)] + [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)

def _seccomp_fd():
    """A pipe's read end holding seccomp_program() for bwrap to read (it fits the pipe buffer); None without one."""
    if (program := seccomp_program()) is None:
        return None
    r, w = os.pipe()
    with open(w, "wb") as f:
        f.write(program)
    return r

def _bwrap_args(bwrap, prefix, seccomp_fd, info_fd=None):
    """The jail's command prefix; `prefix`: the interpreter's install; bwrap writes {"child-pid": ...} to `info_fd`."""
    args = [bwrap, "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns",
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev"]
    for p in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(p):
            args += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            args += ["--ro-bind", p, p]
    if prefix != "/usr" and not prefix.startswith("/usr/"):
        parts = prefix.strip("/").split("/")
        for i in range(1, len(parts)):  # parents of the Python install, traversable by the jail's user
            args += ["--perms", "0755", "--dir", "/" + "/".join(parts[:i])]
        args += ["--ro-bind", prefix, prefix]
    args += ["--size", str(TEMP_QUOTA), "--tmpfs", "/tmp", "--chdir", "/tmp", "--remount-ro", "/dev",
             "--remount-ro", "/"]
    args += [] if seccomp_fd is None else ["--seccomp", str(seccomp_fd)]
    return args + ([] if info_fd is None else ["--info-fd", str(info_fd)])

def _jail_init(info_fd):
    """A pidfd (never a recycled pid) of the jail's PID 1, from bwrap's --info-fd; None if bwrap failed first."""
    data = b""
    while select.select([info_fd], [], [], 30)[0] and (chunk := os.read(info_fd, 4096)):
        data += chunk
        try:
            return os.pidfd_open(json.loads(data)["child-pid"])
        except (ValueError, KeyError, TypeError):  # not all of it yet
            continue
        except OSError:  # already gone
            break

def _unprivileged():
    """Popen arguments that start the child as uid/gid 65534 when we are root (user code never runs as root)."""
    return dict(user=NOBODY, group=NOBODY, extra_groups=[]) if os.geteuid() == 0 else {}

def _interpreters():
    """(interpreter, install prefix) pairs that may run user code, best first: ours, then the system's."""
    ours = (os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix))
    system = os.path.realpath(SYSTEM_PYTHON)
    return [ours] + ([(system, "/usr")] if os.path.exists(system) and system != ours[0] else [])

def _try(cmd, fd=None):
    """Run a probe command unprivileged (passing it `fd`, closed after) -> "" if it printed ok, else a short reason."""
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=30, pass_fds=() if fd is None else (fd,), cwd="/",
                           **_unprivileged())
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if fd is not None:
            os.close(fd)
    if p.returncode == 0 and p.stdout.strip() == b"ok":
        return ""
    return p.stderr.decode(errors="replace").strip()[-200:] or f"exit code {p.returncode}"

@functools.cache  # the machine does not change under a running process
def _probe(bwrap, unsafe, euid):
    """-> JailStatus for this bwrap (None: not installed), opt-in to the unsafe mode and euid (a cache key only)."""
    if bwrap is None:
        why = f"bubblewrap ({BWRAP}) is not installed"
    else:
        errors = []
        for python, prefix in _interpreters():
            fd = _seccomp_fd()
            err = _try(_bwrap_args(bwrap, prefix, fd) + [python, "-I", "-S", "-c", "print('ok')"], fd)
            if not err:
                return JailStatus("bwrap", "", python, prefix, bwrap)
            errors.append(err)
        why = f"bubblewrap ({bwrap}) cannot start a jail here: " + "; ".join(dict.fromkeys(errors))
    fix = INSTALL_HINT if bwrap is None else USERNS_HINT
    if not unsafe:
        return JailStatus("refused", why, fix=fix)
    for python, prefix in _interpreters():
        if not _try([python, "-I", "-S", "-c", "print('ok')"]):
            return JailStatus("unsafe", why, python, prefix, fix=fix)
    return JailStatus("refused", why + f"; and no Python interpreter runs as uid {NOBODY} for {UNSAFE_ENV}", fix=fix)

def jail_status():
    """-> JailStatus: how run_python runs code here. The jail is probed once per process (per bwrap path)."""
    return _probe(shutil.which(BWRAP), os.environ.get(UNSAFE_ENV) == "1", os.geteuid())

_calls = itertools.count()

@functools.cache  # once per process and root
def _sweep_stale_dirs(root):
    """Remove unsafe-mode temp dirs (tc_sbx_<pid>_...) of callers killed mid-call."""
    for name in os.listdir(root):
        m = re.fullmatch(_TAG + r"(\d+)_.*", name)
        path = os.path.join(root, name)
        if not m or int(m.group(1)) == os.getpid() or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive under another user
            pass

def _run(code, timeout=5.0, memory_mb=256, max_output=MAX_OUTPUT, *, audit=True, rlimits=True, jail=True, repl=False):
    """run_python with a switch per layer (tests show what each holds alone); jail=False forces the unsafe mode."""
    _sweep_stale_dirs(tempfile.gettempdir())
    if jail:
        status = jail_status()
    elif (status := _probe(None, True, os.geteuid())).python:
        status = dataclasses.replace(status, why="jail switched off")
    if status.mode == "refused":
        return ExecResult("", "", f"python tool disabled: {status.why}; {status.fix}", False, False,
                          f"none: {status.why}")
    tag = f"{_TAG}{os.getpid()}_{next(_calls)}"
    layers = json.dumps({"audit": audit, "rlimits": rlimits, "repl": repl})
    r_fd, w_fd = os.pipe()
    ours, theirs = [r_fd], [w_fd]  # fds closed at the end / as soon as the child holds its copies
    workdir = None
    try:
        if status.mode == "bwrap":
            seccomp_fd = _seccomp_fd()
            theirs += [] if seccomp_fd is None else [seccomp_fd]
            info_r, info_w = os.pipe()
            ours, theirs = ours + [info_r], theirs + [info_w]
            cmd, work = _bwrap_args(status.bwrap, status.prefix, seccomp_fd, info_w), "/tmp"
        else:
            workdir = work = tempfile.mkdtemp(prefix=tag + "_")
            if os.geteuid() == 0:
                os.chown(workdir, NOBODY, NOBODY)
            cmd = []
        cmd += [status.python, "-I", "-S", "-B", "-c", f"# {tag}\n{_BOOTSTRAP}", str(w_fd), work, str(timeout),
                str(memory_mb), str(FILE_SIZE_LIMIT), layers, tag]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": work}
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                pass_fds=theirs, cwd=workdir or "/", start_new_session=True, **_unprivileged())
        while theirs:
            os.close(theirs.pop())
        init = _jail_init(info_r) if status.mode == "bwrap" else None
        ours += [] if init is None else [init]
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(code.encode("utf-8", errors="replace"))
            proc.stdin.close()
        out, err, timed_out, overflow = _collect(proc, timeout, max_output)
        if init is not None and proc.poll() is None:
            signal.pidfd_send_signal(init, signal.SIGKILL)  # the kernel kills every process in the jail; bwrap exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the unsafe mode's group (or a stuck bwrap)
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        os.set_blocking(r_fd, False)
        report = ""
        with contextlib.suppress(BlockingIOError):  # the bootstrap's one write of at most 4096 bytes, if any
            report = os.read(r_fd, 8192).decode("utf-8", "replace")
    finally:
        for f in ours + theirs:
            os.close(f)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif overflow:
        error = f"output limit exceeded ({max_output} bytes); program killed"
    elif rc != 0:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            error = json.loads(report)["error"] if report else None
        if error is None:
            error = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            if rc in (-signal.SIGXCPU, -signal.SIGKILL) or "MemoryError" in stderr:
                error += " (CPU or memory limit)"
    jail_note = "bwrap" if status.mode == "bwrap" else f"none: {status.why}"
    return ExecResult(stdout, stderr, error, timed_out, error is None, jail_note, rc)

def _collect(proc, timeout, max_output):
    """Read both pipes as data arrives until EOF, the deadline, or too much output. Never buffers > max_output."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}  # stdout, stderr
    deadline = time.monotonic() + timeout
    timed_out = overflow = False
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and not overflow:
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
                overflow |= len(buf) >= max_output
    # EOF on both pipes; give the process (not its vanished children) the rest of the deadline to exit
    if not timed_out and not overflow:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    return *map(bytes, bufs.values()), timed_out, overflow

def run_python(code, timeout=5.0, memory_mb=256, max_output=MAX_OUTPUT):
    """Execute `code` as a program in a fresh jailed Python process -> ExecResult; never raises for what the code does.
    stdout/stderr are capped at `max_output` bytes each (more kills it: "output limit exceeded"). Without a jail (and
    without TRITONCHAT_UNSAFE_NO_JAIL=1) nothing runs: error "python tool disabled: <why>; <how to fix>"."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    return _run(code, timeout=timeout, memory_mb=memory_mb, max_output=max_output)

def run_tool_call(code, timeout=5.0, memory_mb=256):
    """A model's python tool call (the text between <|python_start|> and <|python_end|>) -> what a Python REPL shows
    for it, without the final newline: printed output and the repr of each top-level expression that is not None
    (`12 * 7` -> "84", `[].append(1)` -> ""). A failed call answers its stdout + "Error: <reason>" ("Error: timed out",
    "Error: python tool disabled: ..."). timeout in seconds, memory_mb of address space, as run_python."""
    res = _run(code, timeout=timeout, memory_mb=memory_mb, repl=True)
    if res.success:
        return res.stdout.rstrip("\n")
    return (res.stdout + "Error: " + ("timed out" if res.timed_out else res.error)).strip()

if __name__ == "__main__":
    print(jail_status().banner)
    print(run_python(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()))
