"""The direction of imports: kernels/ imports nothing of ours but the switch, model/ never imports train/ or bench/,
train/ never imports bench/. Every module is parsed (imports inside functions count too)."""
import ast
import pathlib

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
