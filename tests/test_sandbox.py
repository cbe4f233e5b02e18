"""model/sandbox.py: every attack returns an error result and leaves the parent (this pytest process) unharmed.

Network and ctypes (what nanochat's sandbox leaks) are checked with all layers, with the audit hook alone
(jail off) and, where bubblewrap works, with the jail alone (hook off)."""
import os
import socket
import subprocess
import threading
import time

import pytest

from model.sandbox import ExecResult, _run, bwrap_available, run_python, run_tool_call

HAS_BWRAP = bwrap_available()[0]
LAYERS = [pytest.param({}, id="all-layers"), pytest.param({"jail": False}, id="audit-only"),
          pytest.param({"audit": False}, id="jail-only",
                       marks=pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not available"))]


def _no_leftovers():
    """No sandbox process survives its call (they all carry their tc_sbx_ temp dir in argv)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return not any("tc_sbx_" in line and "ps -eo" not in line for line in out.splitlines())


def test_ok_and_metadata():
    r = run_python("import math\nprint(sum(i * i for i in range(10)), math.gcd(12, 18))")
    assert isinstance(r, ExecResult)
    assert r.success and r.error is None and not r.timed_out and r.returncode == 0
    assert r.stdout == "285 6\n"
    assert r.jail == "bwrap" if HAS_BWRAP else r.jail.startswith("none: ")


def test_user_exception_and_temp_dir_writes():
    r = run_python("open('a.txt', 'w').write('hi')\nprint(open('a.txt').read())\n1 / 0")
    assert not r.success and r.stdout == "hi\n"
    assert r.error == "ZeroDivisionError: division by zero"


def test_tool_call_answers_repl_style():
    """What the engine forces back after a model's <|python_start|> ... <|python_end|>."""
    assert run_tool_call("12 * 7") == "84"  # a trailing expression is printed
    assert run_tool_call("x = 3\nprint('x is', x)\nx + 1") == "x is 3\n4"
    assert run_tool_call("x = 3") == ""
    assert run_tool_call("print('so far')\n1 / 0") == "so far\nError: ZeroDivisionError: division by zero"
    assert run_tool_call("12 *").startswith("Error: SyntaxError")
    assert run_tool_call("while True:\n    pass", timeout=1.0) == "Error: timed out"


def test_infinite_loop():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", timeout=1.0)
    assert r.timed_out and not r.success and "timed out" in r.error
    assert time.monotonic() - t0 < 5
    assert _no_leftovers()


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


def test_memory_bomb():
    r = run_python("a = []\nwhile True:\n    a.append(bytearray(10 ** 7))", timeout=2.0, memory_mb=128)
    assert not r.success and "MemoryError" in r.error
    r = run_python("x = bytearray(4 * 1024 ** 3)", memory_mb=128)
    assert not r.success and "MemoryError" in r.error


def test_os_system_and_subprocess():
    for code in ["import os; os.system('echo pwned')", "import subprocess; subprocess.run(['echo', 'pwned'])",
                 "import os; os.execv('/bin/echo', ['echo', 'pwned'])",
                 "import os; os.posix_spawn('/bin/echo', ['echo'], {})",
                 "import os; os.popen('echo pwned').read()", "import pty; pty.spawn('/bin/sh')"]:
        r = run_python(code)
        assert not r.success and "pwned" not in r.stdout, code
        assert "sandbox" in r.error, (code, r.error)


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
    if "audit" not in layers:
        assert not r.success and "ctypes" in r.error
    # with the hook off, libc's system() runs inside the jail: no /bin/sh there, and /tmp is a private tmpfs


def test_huge_print():
    t0 = time.monotonic()
    r = run_python("while True:\n    print('x' * 10000)", timeout=5.0, max_output=50_000)
    assert not r.success and "output limit" in r.error and not r.timed_out
    assert len(r.stdout) <= 50_000
    r = run_python("import sys\nsys.stderr.write('e' * 10 ** 7)", max_output=50_000)
    assert not r.success and len(r.stderr) <= 50_000
    assert time.monotonic() - t0 < 5


def test_sys_exit_and_kill():
    for code in ["import sys; sys.exit(0)", "exit()", "raise SystemExit(3)"]:
        r = run_python(code)
        assert not r.success and r.error, code
    r = run_python(f"import os, signal; os.kill({os.getpid()}, signal.SIGKILL)")
    assert not r.success and "sandbox" in r.error  # and we are still here to assert it


def test_hook_cannot_be_loosened():
    for code in ["import sys\ng = sys._getframe(0).f_back.f_globals\ng['_hook'].__defaults__ = ()",
                 "import sys\ng = sys._getframe(0).f_back.f_globals\n"
                 "g['_inside'].__code__ = (lambda *a, **k: True).__code__\nopen('/pwned_sbx', 'w')",
                 "import sys\ndel sys.modules['posix']\nimport posix\nposix.system('echo pwned')",
                 "import os\nos.path.realpath = lambda p: p\nopen('/pwned_sbx', 'w')"]:
        r = run_python(code)
        assert not r.success and "pwned" not in r.stdout, code
    assert not os.path.exists("/pwned_sbx")


def test_stdlib_still_usable():
    r = run_python("import collections, dataclasses, json, re, fractions, unittest, shutil\n"
                   "@dataclasses.dataclass\nclass A:\n    x: int = 1\nassert A().x == 1\n"
                   "P = collections.namedtuple('P', 'x y')\nprint(json.dumps(P(1, 2)._asdict()))")
    assert r.success, r.error
    assert r.stdout == '{"x": 1, "y": 2}\n'
