"""The direction of imports: kernels/ imports nothing of ours but the switch, model/ never imports train/ or bench/,
train/ never imports bench/. Every module is parsed (imports inside functions count too)."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PARTS = ("kernels", "model", "train", "bench")
FORBIDDEN = {"kernels": {"model", "train", "bench"}, "model": {"train", "bench"}, "train": {"bench"}, "bench": set()}

def imported_parts(source, package):
    """(line, part) for every import of one of PARTS in `source`; relative imports resolve inside `package`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package if node.level else (node.module or "")]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in PARTS]
    return found

def violations(root=ROOT):
    out = []
    for part in PARTS:
        for path in sorted((root / part).rglob("*.py")):
            for line, target in imported_parts(path.read_text(), part):
                if target in FORBIDDEN[part]:
                    out.append(f"{path.relative_to(root)}:{line} imports {target}/")
    return out

def test_imports_point_one_way():
    assert violations() == []

@pytest.mark.parametrize("part, line, bad", [
    ("kernels", "from model.gpt import GPT", True),
    ("kernels", "import kernels", False),
    ("model", "    from train.loop import train", True),
    ("model", "import bench.harness", True),
    ("model", "from kernels.attention import attention", False),
    ("train", "from bench import harness", True),
    ("train", "from model.checkpoint import save_checkpoint", False),
])
def test_checker_catches_a_planted_import(tmp_path, part, line, bad):
    for p in PARTS:
        (tmp_path / p).mkdir()
    (tmp_path / part / "planted.py").write_text(f"def f():\n{line if line.startswith(' ') else '    ' + line}\n")
    assert bool(violations(tmp_path)) == bad

def _python(code, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()

def test_parts_are_not_installed_as_top_level_packages(tmp_path):
    """Outside the repository our generic folder names resolve to nothing of ours (they are run from the root)."""
    code = "import importlib.util as u; print([(n, (u.find_spec(n) or 0) and u.find_spec(n).origin) for n in %r])"
    found = _python(code % (PARTS,), cwd=tmp_path)
    assert str(ROOT) not in found, found

def test_a_pypi_kernels_package_does_not_shadow_ours(tmp_path):
    """With another `kernels` package ahead of site-packages, the repository still runs its own, and outside the
    repository `import kernels` still gives the other one."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("OTHER = True\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _python("import kernels; print(kernels.OTHER)", cwd=elsewhere, pythonpath=str(tmp_path)) == "True"
    ours = _python("import kernels, model.common; print(kernels.__file__)", cwd=ROOT, pythonpath=str(tmp_path))
    assert ours == str(ROOT / "kernels" / "__init__.py")
