"""Shared test setup. Without CUDA the Triton kernels run under the interpreter, which must be switched on before
triton is imported anywhere."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project is run from its root, not installed (pyproject's `pythonpath` covers this process): subprocesses and
# torchrun workers find it through PYTHONPATH, ahead of any same-named package in site-packages.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

try:
    import torch
    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)

@pytest.fixture
def cpu_rank():
    """One CPU rank in this process (train.distributed.init_distributed) -> its DistInfo. A group another test left
    up is reused and left up; a group this fixture created is destroyed afterwards, whether the test passed or not."""
    import torch.distributed as dist

    from train.distributed import cleanup, init_distributed
    owned = not dist.is_initialized()
    yield init_distributed("cpu")
    if owned:
        cleanup()

@pytest.fixture
def eager_single_thread():
    """Eager kernels on one thread: for tests of tiny shapes, where OpenMP threads spinning on a shared 2-core box
    cost 10-100x."""
    import kernels
    prev, threads = kernels.get_mode(), torch.get_num_threads()
    kernels.set_mode("eager")
    torch.set_num_threads(1)
    yield
    kernels.set_mode(prev)
    torch.set_num_threads(threads)

@pytest.fixture
def fused():
    """Fused (Triton) kernels for one test; on CPU they run under the interpreter set up above."""
    import kernels
    prev = kernels.get_mode()
    kernels.set_mode("fused")
    yield
    kernels.set_mode(prev)
