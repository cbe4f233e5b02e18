"""Benchmark: the ReLU^2 MLP, eager vs torch.compile vs fused (Triton), forward / backward / forward+backward.

GPU (bf16): tokens in {8k, 32k, 64k} x (C, F = 4C) of GPTConfig.from_depth(12, 20, 26, 32); --quick keeps (8k, d20)
and (32k, d32). TFLOP/s from 4*M*C*F for the forward (two GEMMs), twice that for the backward (four); the "fwd"
row's peak memory holds the saved activations.
"""
import torch

from bench import harness
from kernels.relu2_mlp import relu2_mlp_reference, relu2_mlp_triton
from model.gpt import GPTConfig

SUITE = "relu2_mlp"

def run(quick):
    dev, dtype = ("cuda", torch.bfloat16) if harness.on_gpu() else ("cpu", torch.float32)
    pairs = [(8192, 20), (32768, 32)] if quick else [(m, d) for d in (12, 20, 26, 32) for m in (8192, 32768, 65536)]
    cases = [(m, GPTConfig.from_depth(d).n_embd) for m, d in pairs] if dev == "cuda" else [(64, 64)]
    rows = []
    for M, C in cases:
        Fh = 4 * C
        x = torch.randn(M, C, device=dev, dtype=dtype, requires_grad=True)
        w_fc = (torch.randn(Fh, C, device=dev, dtype=dtype) / C ** 0.5).requires_grad_(True)
        w_proj = (torch.randn(C, Fh, device=dev, dtype=dtype) / Fh ** 0.5).requires_grad_(True)
        dy = torch.randn(M, C, device=dev, dtype=dtype)
        inputs = (x, w_fc, w_proj)
        case = {"tokens": M, "C": C, "F": Fh, "dtype": str(dtype).replace("torch.", "")}
        compiled = {"compile": torch.compile(relu2_mlp_reference, dynamic=False)} if dev == "cuda" else {}  # per shape
        for name, fn in {"eager": relu2_mlp_reference, **compiled, "fused": relu2_mlp_triton}.items():
            rows += harness.fwd_bwd_rows(SUITE, case, name, fn, inputs, inputs, dy, 4 * M * C * Fh, 2, quick)
    return harness.add_ratios(rows, "eager")

if __name__ == "__main__":
    harness.main(SUITE, run)
