"""model/sandbox.py: every attack returns an error result, stays inside the jail and leaves the parent (this pytest
process) unharmed; without a jail the tool refuses.

The escapes (a native extension written to the temp dir and imported, pidfd kill of the parent, fifos / device nodes
/ databases outside the temp dir, a detached child, the parent's environment, the repository's files) are tried
with every layer and with the jail alone (audit hook off: what native code gets). CI runs them with bubblewrap
installed (`make install`); on a machine without it they are skipped, except in CI, where they fail."""
import os
import random
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from model import sandbox
from model.sandbox import ExecResult, _run, jail_status, run_python, run_tool_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_BWRAP = jail_status().mode == "bwrap"
needs_jail = pytest.mark.skipif(not HAS_BWRAP and not os.environ.get("CI"),
                                reason=f"no working bubblewrap here ({jail_status().why})")
LAYERS = [pytest.param({}, id="all-layers", marks=needs_jail), pytest.param({"jail": False}, id="audit-only"),
          pytest.param({"audit": False}, id="jail-only", marks=needs_jail)]
JAILED = [pytest.param({}, id="all-layers"), pytest.param({"audit": False}, id="jail-only")]

def _ours():
    """`uid args` of every live process of this test process's sandbox calls (tagged tc_sbx_<pid>_ in argv)."""
    out = subprocess.run(["ps", "-ewwo", "uid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"tc_sbx_{os.getpid()}_" in line and "ps -ewwo" not in line]

def _no_leftovers():
    """No sandbox process survives its call."""
    return not _ours()

@needs_jail
def test_ok_and_metadata():
    r = run_python("import math\nprint(sum(i * i for i in range(10)), math.gcd(12, 18))")
    assert isinstance(r, ExecResult)
    assert r.success and r.error is None and not r.timed_out and r.returncode == 0
    assert r.stdout == "285 6\n"
    assert r.jail == "bwrap" and jail_status().banner.startswith("python tool: jailed by bubblewrap")

def test_refuses_without_jail(monkeypatch):
    """No bubblewrap: nothing runs, and the answer says why and how to fix it; only the loud opt-in runs code."""
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    status = jail_status()
    assert status.mode == "refused" and "DISABLED" in status.banner and "apt-get install" in status.banner
    r = run_python("open('ran', 'w')\nprint('ran')")
    assert not r.success and r.stdout == "" and r.jail.startswith("none: ")
    assert "bubblewrap" in r.error and "not installed" in r.error and "apt-get install -y bubblewrap" in r.error
    assert run_tool_call("6 * 7").startswith("Error: python tool disabled: bubblewrap (/nonexistent/bwrap) is not")
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    assert jail_status().mode == "unsafe" and "UNSAFE, NO JAIL" in jail_status().banner
    r = run_python("print(6 * 7)")
    assert r.success and r.stdout == "42\n" and r.jail.startswith("none: ")

def test_refuses_with_a_broken_jail(monkeypatch):
    """bwrap installed but unable to make its namespaces (no unprivileged user namespaces): refused, saying so."""
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)  # the probe runs it unprivileged
        fake = os.path.join(d, "bwrap")
        with open(fake, "w") as f:
            f.write("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
        os.chmod(fake, 0o755)
        monkeypatch.setattr(sandbox, "BWRAP", fake)
        monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
        r = run_python("print('ran')")
    assert not r.success and r.stdout == "" and "cannot start a jail here" in r.error
    assert "No permissions to creating new namespace" in r.error and "user namespaces" in r.error

@needs_jail
def test_user_exception_and_temp_dir_writes():
    r = run_python("open('a.txt', 'w').write('hi')\nprint(open('a.txt').read())\n1 / 0")
    assert not r.success and r.stdout == "hi\n"
    assert r.error == "ZeroDivisionError: division by zero"

@needs_jail
def test_tool_call_is_what_a_repl_shows():
    """What the engine forces back after a model's <|python_start|> ... <|python_end|>: the REPL's display."""
    assert run_tool_call("12 * 7") == "84"
    assert run_tool_call("print(6 * 7)") == "42"  # print's value, None, is not shown
    assert run_tool_call("[].append(1)") == ""
    assert run_tool_call("'a' * 3") == "'aaa'"  # repr, as the REPL
    assert run_tool_call("None") == ""
    assert run_tool_call("x = 3\nprint('x is', x)\nx + 1") == "x is 3\n4"
    assert run_tool_call("x = 3") == ""
    assert run_tool_call("for i in range(2):\n    i") == "0\n1"
    assert run_tool_call("print('so far')\n1 / 0") == "so far\nError: ZeroDivisionError: division by zero"
    assert run_tool_call("12 *").startswith("Error: SyntaxError")
    assert run_tool_call("while True:\n    pass", timeout=1.0) == "Error: timed out"
    assert run_python("6 * 7").stdout == ""  # a program, not a REPL: nothing shown

@needs_jail
def test_infinite_loop():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", timeout=1.0)
    assert r.timed_out and not r.success and "timed out" in r.error
    assert time.monotonic() - t0 < 5
    assert _no_leftovers()

@needs_jail
@pytest.mark.parametrize("layers", [pytest.param({}, id="all-layers"),
                                    pytest.param({"audit": False}, id="rlimits+jail-without-hook")])
def test_fork_bomb(layers):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = _run(code, timeout=1.0, **layers)
    assert not r.success
    if not layers:  # the hook refuses the first fork (the loop above swallows that and spins to the timeout)
        assert "os.fork" in run_python("import os\nos.fork()").error
    assert _no_leftovers()  # killed as a group / with its PID namespace
    assert run_python("print('still fine')").stdout == "still fine\n"

@needs_jail
def test_memory_bomb():
    r = run_python("a = []\nwhile True:\n    a.append(bytearray(10 ** 7))", timeout=2.0, memory_mb=128)
    assert not r.success and "MemoryError" in r.error
    r = run_python("x = bytearray(4 * 1024 ** 3)", memory_mb=128)
    assert not r.success and "MemoryError" in r.error

@needs_jail
def test_os_system_and_subprocess():
    for code in ["import os; os.system('echo pwned')", "import subprocess; subprocess.run(['echo', 'pwned'])",
                 "import os; os.execv('/bin/echo', ['echo', 'pwned'])",
                 "import os; os.posix_spawn('/bin/echo', ['echo'], {})",
                 "import os; os.popen('echo pwned').read()", "import pty; pty.spawn('/bin/sh')"]:
        r = run_python(code)
        assert not r.success and "pwned" not in r.stdout, code
        assert "sandbox" in r.error, (code, r.error)

@needs_jail
def test_write_outside_temp_dir(tmp_path):
    for code in ["open('/pwned_sbx', 'w').write('x')", "open('../pwned_sbx', 'a')",
                 "import os; os.open('/pwned_sbx', os.O_WRONLY | os.O_CREAT)",
                 "import pathlib; pathlib.Path('/pwned_sbx').write_text('x')",
                 "import os; os.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=os.open('/', os.O_RDONLY))",
                 "import os; os.chdir('/'); open('pwned_sbx', 'w')",
                 "import os; os.symlink('/', 'root'); open('root/pwned_sbx', 'w')"]:
        r = run_python(code)
        assert not r.success, code
    assert not os.path.exists("/pwned_sbx")

@needs_jail
def test_delete_files(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in [f"import os; os.remove({str(victim)!r})", f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                 f"import os; os.rename({str(victim)!r}, 'mine.txt')", "import os; os.rmdir('/tmp')",
                 "import shutil; shutil.rmtree('/usr/lib')"]:
        r = run_python(code)
        assert not r.success, code
    assert victim.read_text() == "keep me"
    # deleting inside the temp dir is fine
    r = run_python("import os\nopen('t', 'w').close()\nos.remove('t')\nprint(os.listdir('.'))")
    assert r.success and r.stdout == "[]\n"

@pytest.mark.parametrize("layers", LAYERS)
def test_network_blocked(layers):
    """A listener on the parent's loopback must never see the sandbox connect (nanochat's sandbox would)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(3)
    port = srv.getsockname()[1]
    got = []
    th = threading.Thread(target=lambda: got.append(_accept(srv)))
    th.start()
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'leak')\nprint('connected')")
    r = _run(code, timeout=2.0, **layers)
    socket.create_connection(("127.0.0.1", port)).close()  # unblock accept(): this one is ours
    th.join()
    srv.close()
    assert not r.success and "connected" not in r.stdout
    assert got == [b""], "the sandbox reached the parent's socket"

def _accept(srv):
    try:
        conn, _ = srv.accept()
        conn.settimeout(1)
        with conn:
            return conn.recv(16)
    except OSError:
        return None

@pytest.mark.parametrize("layers", LAYERS)
def test_ctypes_blocked(layers, tmp_path):
    marker = "/tmp/tc_sbx_ctypes_pwned"
    code = f"import ctypes\nctypes.CDLL(None).system(b'echo pwned > {marker}')\nprint('ran')"
    r = _run(code, **layers)
    assert not os.path.exists(marker)
    if layers.get("audit") is not False:
        assert not r.success and "ctypes" in r.error
    # with the hook off, libc's system() runs inside the jail: no /bin/sh there, and /tmp is a private tmpfs

@needs_jail
def test_huge_print():
    t0 = time.monotonic()
    r = run_python("while True:\n    print('x' * 10000)", timeout=5.0, max_output=50_000)
    assert not r.success and "output limit" in r.error and not r.timed_out
    assert len(r.stdout) <= 50_000
    r = run_python("import sys\nsys.stderr.write('e' * 10 ** 7)", max_output=50_000)
    assert not r.success and len(r.stderr) <= 50_000
    assert time.monotonic() - t0 < 5

@needs_jail
def test_sys_exit_and_kill():
    for code in ["import sys; sys.exit(0)", "exit()", "raise SystemExit(3)"]:
        r = run_python(code)
        assert not r.success and r.error, code
    r = run_python(f"import os, signal; os.kill({os.getpid()}, signal.SIGKILL)")
    assert not r.success and "sandbox" in r.error  # and we are still here to assert it

@needs_jail
def test_hook_cannot_be_loosened():
    for code in ["import sys\ng = sys._getframe(0).f_back.f_globals\ng['_hook'].__defaults__ = ()",
                 "import sys\ng = sys._getframe(0).f_back.f_globals\n"
                 "g['_inside'].__code__ = (lambda *a, **k: True).__code__\nopen('/pwned_sbx', 'w')",
                 "import sys\ndel sys.modules['posix']\nimport posix\nposix.system('echo pwned')",
                 "import os\nos.path.realpath = lambda p: p\nopen('/pwned_sbx', 'w')"]:
        r = run_python(code)
        assert not r.success and "pwned" not in r.stdout, code
    assert not os.path.exists("/pwned_sbx")

@needs_jail
def test_stdlib_still_usable():
    r = run_python("import collections, dataclasses, json, re, fractions, unittest, shutil\n"
                   "@dataclasses.dataclass\nclass A:\n    x: int = 1\nassert A().x == 1\n"
                   "P = collections.namedtuple('P', 'x y')\nprint(json.dumps(P(1, 2)._asdict()))")
    assert r.success, r.error
    assert r.stdout == '{"x": 1, "y": 2}\n'

# ---------------------------------------------------------------------------------------------------------------
# Escapes: each is tried with all layers and with the jail alone (what native code gets past the audit hook).

NATIVE = r'''
import glob, importlib.machinery, importlib.util, os, shutil, sys
src = glob.glob(os.path.dirname(os.__file__) + "/lib-dynload/_ctypes.*.so")[0]
dst = os.path.join(os.getcwd(), os.path.basename(src))  # a shared object written into the temp dir ...
shutil.copy(src, dst)
loader = importlib.machinery.ExtensionFileLoader("_ctypes", dst)
sys.modules["_ctypes"] = importlib.util.module_from_spec(importlib.util.spec_from_loader("_ctypes", loader))
loader.exec_module(sys.modules["_ctypes"])  # ... and imported: from here on C runs whatever it likes
import ctypes
libc = ctypes.CDLL(None)
print("uid", libc.getuid(), libc.geteuid())
libc.system(b"kill -9 PARENT; echo pwned > MARKER; cat /proc/PARENT/environ; (setsid sleep SLEEP &)")
print("native code ran")
'''

def _escape(code, layers, tmp_path, monkeypatch):
    """Run `code` (PARENT, MARKER, SLEEP, TMP and REPO substituted) with a secret in our environment -> (result,
    the secret, the sleep duration that tags a would-be detached child)."""
    secret = f"hunter2-{random.randrange(10 ** 9)}"
    monkeypatch.setenv("TC_SBX_TEST_SECRET", secret)
    sleep = f"{random.randrange(1000, 9999)}.5"
    for key, value in (("PARENT", str(os.getpid())), ("MARKER", str(tmp_path / "pwned")), ("SLEEP", sleep),
                       ("TMP", str(tmp_path)), ("REPO", ROOT)):
        code = code.replace(key, value)
    return _run(code, timeout=5.0, **layers), secret, sleep

def _contained(r, secret, sleep, tmp_path):
    assert secret not in r.stdout + r.stderr
    assert not (tmp_path / "pwned").exists() and not any(p.name.startswith("pwned") for p in tmp_path.iterdir())
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and sleep in subprocess.run(["ps", "-ewwo", "args="], capture_output=True,
                                                                  text=True).stdout:
        time.sleep(0.1)
    assert sleep not in subprocess.run(["ps", "-ewwo", "args="], capture_output=True, text=True).stdout
    assert _no_leftovers()
    assert "uid 0 " not in r.stdout  # never root

@needs_jail
@pytest.mark.parametrize("layers", JAILED)
def test_native_extension_is_contained(layers, tmp_path, monkeypatch):
    r, secret, sleep = _escape(NATIVE, layers, tmp_path, monkeypatch)
    if layers.get("audit") is False:  # the hook is off: the extension really ran, as the jail's user
        assert "native code ran" in r.stdout and f"uid {sandbox.NOBODY} {sandbox.NOBODY}" in r.stdout, r
    _contained(r, secret, sleep, tmp_path)

@needs_jail
@pytest.mark.parametrize("layers", JAILED)
def test_cannot_signal_the_parent(layers, tmp_path, monkeypatch):
    code = ("import os, signal\nfor pid in (os.getppid(), PARENT):\n    try:\n"
            "        signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)\n    except OSError as e:\n"
            "        print(pid, type(e).__name__)\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError as e:\n        print(pid, type(e).__name__)\nprint('done')")
    r, secret, sleep = _escape(code, layers, tmp_path, monkeypatch)
    if layers.get("audit") is False:
        assert f"{os.getpid()} ProcessLookupError" in r.stdout  # the caller is not even visible
    _contained(r, secret, sleep, tmp_path)  # and we are still here to check

@needs_jail
@pytest.mark.parametrize("layers", JAILED)
def test_no_fifo_node_or_database_outside_the_temp_dir(layers, tmp_path, monkeypatch):
    code = ("import os, sqlite3, stat\n"
            "makers = {'fifo': os.mkfifo, 'node': lambda p: os.mknod(p, stat.S_IFIFO | 0o600),\n"
            "          'db': lambda p: sqlite3.connect(p).execute('create table t(x)')}\n"
            "for d in ('/', '/tmp/..', '/dev', '/dev/shm', 'TMP', 'REPO', '/usr/lib', '/proc'):\n"
            "    for kind, make in makers.items():\n"
            "        try:\n            make(d + '/pwned_' + kind)\n            print('made', d, kind)\n"
            "        except Exception as e:\n            print('refused', d, kind, type(e).__name__)\n")
    r, secret, sleep = _escape(code, layers, tmp_path, monkeypatch)
    assert r.success and "made" not in r.stdout and r.stdout.count("refused") == 24, r
    assert not [p for p in os.listdir(ROOT) if p.startswith("pwned_")]
    _contained(r, secret, sleep, tmp_path)
    # inside the temp dir a database is fine (and, past the hook, which refuses them all, a fifo)
    fifo = "os.mkfifo('f')\n" if layers.get("audit") is False else ""
    r = _run(f"import os, sqlite3\n{fifo}sqlite3.connect('d.db').execute('create table t(x)')\n"
             "print(sorted(os.listdir('.')))", **layers)
    assert r.success and r.stdout == ("['d.db', 'f']\n" if fifo else "['d.db']\n"), r

@needs_jail
@pytest.mark.parametrize("layers", JAILED)
def test_no_process_outlives_the_call(layers, tmp_path, monkeypatch):
    code = ("import subprocess\n"
            "subprocess.Popen(['setsid', 'sleep', 'SLEEP'], start_new_session=True, stdout=subprocess.DEVNULL,\n"
            "                 stderr=subprocess.DEVNULL)\nprint('spawned')")
    r, secret, sleep = _escape(code, layers, tmp_path, monkeypatch)
    if layers.get("audit") is False:
        assert r.success and r.stdout == "spawned\n", r
    _contained(r, secret, sleep, tmp_path)

@needs_jail
@pytest.mark.parametrize("layers", JAILED)
def test_no_view_of_the_parent_or_the_repository(layers, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("private notes")
    code = ("import os\nfor path in ('/proc/PARENT/environ', '/proc/PARENT/cmdline', '/proc/1/environ',\n"
            "             f'/proc/{os.getppid()}/environ', 'REPO/README.md', 'REPO/model/sandbox.py',\n"
            "             'TMP/notes.txt', '/root/.bash_history', '/etc/passwd'):\n"
            "    try:\n        print(path, open(path, 'rb').read()[:200])\n    except OSError as e:\n"
            "        print(path, type(e).__name__)\n"
            "print(os.listdir('/'), dict(os.environ))\n"
            "print([p for p in os.listdir('/proc') if p.isdigit()])")
    r, secret, sleep = _escape(code, layers, tmp_path, monkeypatch)
    assert r.success, r
    assert "private notes" not in r.stdout and "tritonchat" not in r.stdout.lower()
    assert f"/proc/{os.getpid()}/environ FileNotFoundError" in r.stdout
    pids = eval(r.stdout.splitlines()[-1])  # the jail's own processes only: its init and the interpreter
    assert len(pids) <= 3 and str(os.getpid()) not in pids
    _contained(r, secret, sleep, tmp_path)

@needs_jail
def test_never_runs_as_root():
    """Seen from the host: every process of a call (bwrap included) runs under an unprivileged uid."""
    seen = []
    th = threading.Thread(target=lambda: seen.append(run_python("import time, os\nprint(os.getuid())\n"
                                                                "time.sleep(3)")))
    th.start()
    procs = []
    for _ in range(120):
        procs = _ours() or procs
        if procs and any("python" in line for line in procs):
            break
        time.sleep(0.05)
    th.join()
    assert procs and all(int(line.split()[0]) != 0 for line in procs), procs
    assert seen[0].success and seen[0].stdout == f"{sandbox.NOBODY}\n"

@needs_jail
def test_disk_quota():
    t0 = time.monotonic()
    r = run_python("for i in range(100):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))")  # 100 MiB of 1 MiB files
    assert not r.success and "No space left on device" in r.error, r
    r = run_python("open('big', 'wb').write(b'x' * (20 << 20))")  # one file over RLIMIT_FSIZE
    assert not r.success and "File too large" in r.error, r
    assert time.monotonic() - t0 < 10

@needs_jail
def test_seccomp_denies_kernel_interfaces():
    if sandbox.seccomp_program() is None:
        pytest.skip(f"no seccomp table for {os.uname().machine}")
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.ptrace(0, 0, 0, 0), ctypes.get_errno())")  # PTRACE_TRACEME: 0 when allowed
    r = _run(code, audit=False)
    assert r.success and r.stdout == "-1 1\n", r  # EPERM

def test_stale_temp_dirs_are_swept(tmp_path, monkeypatch):
    """Temp dirs of a caller killed mid-call (the unsafe mode keeps them on the host) go at the next start."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sandbox._sweep_stale_dirs.cache_clear()
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale, live, other = (tmp_path / f"tc_sbx_{gone.pid}_3_ab", tmp_path / f"tc_sbx_{os.getpid()}_9_cd",
                          tmp_path / "unrelated")
    for d in (stale, live, other):
        d.mkdir()
        (d / "file").write_text("x")
    run_tool_call("1")  # swept first, whether the tool then runs or refuses
    assert not stale.exists() and live.exists() and other.exists()
