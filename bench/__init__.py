"""Benchmark suites: `python -m bench.<suite>`, or all with `python -m bench.kernels --suite all`. Without CUDA the
fused providers run under the Triton interpreter, which must be on before triton is imported: importing this package
switches it on, once, for every suite."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
