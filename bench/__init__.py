"""Benchmark suites: `python -m bench.<suite>`, or all with `python -m bench.kernels --suite all`. Off CUDA the fused
providers run under the Triton interpreter, switched on here, before triton is imported, for every suite."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
