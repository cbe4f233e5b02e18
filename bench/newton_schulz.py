"""Benchmark: Newton-Schulz (5 steps), eager reference vs torch.compile of it vs the fused Triton kernels.

GPU (bf16, fp32 accumulation), pass "ns5": the d12/d20/d32 block matrices' shapes and a batch of 20 x (1280, 1280);
"gram": the symmetric X X^T alone (torch matmul vs gram_triton); "muon_step": the whole Muon step (model/optim.py)
over a d20 model's block matrices, eager vs fused. TFLOP/s for every provider uses the reference's FLOP count (per
step 4 m^2 n + 2 m^3, m <= n; Gram 2 m^2 n), so the symmetric kernels show up as a higher effective rate.
"""
import torch

import kernels
from bench import harness
from kernels.newton_schulz import gram_triton, newton_schulz_reference, newton_schulz_triton
from model.gpt import GPT, GPTConfig
from model.optim import Muon

SUITE = "newton_schulz"
STEPS = 5

def _ns_flops(batch, rows, cols):
    m, n = min(rows, cols), max(rows, cols)
    return batch * STEPS * (4 * m * m * n + 2 * m ** 3)

def run(quick):
    gpu = harness.on_gpu()
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    if not gpu:
        ns_shapes, gram_shapes, depth = [(1, 64, 96), (2, 32, 48)], [(1, 64, 96)], 1
    elif quick:  # the d20 shapes only: each ns5 shape costs a torch.compile of the reference (~10 s cold)
        ns_shapes, gram_shapes, depth = [(1, 1280, 5120), (20, 1280, 1280)], [(1, 4096, 4096)], 20
    else:
        ns_shapes = [(1, 768, 768), (1, 1280, 1280), (1, 1280, 5120), (1, 5120, 1280), (1, 4096, 4096),
                     (20, 1280, 1280)]
        gram_shapes, depth = [(1, 1280, 1280), (1, 1280, 5120), (1, 4096, 4096), (20, 1280, 1280)], 20
    compiled = {"compile": torch.compile(newton_schulz_reference, dynamic=False)} if gpu else {}
    providers = {"eager": newton_schulz_reference, **compiled, "fused": newton_schulz_triton}
    prev, rows = kernels.get_mode(), []
    try:
        for batch, m, n in ns_shapes:
            G = torch.randn(batch, m, n, device=dev, dtype=dtype).squeeze(0)
            case = {"op": "ns5", "batch": batch, "m": m, "n": n, "dtype": str(dtype).replace("torch.", "")}
            for name, fn in providers.items():
                rows.append(harness.timed_row(SUITE, case, name, "ns5", lambda: fn(G, steps=STEPS), quick,
                                              flops=_ns_flops(batch, m, n)))
        for batch, m, n in gram_shapes:  # the Gram product X X^T alone (m <= n)
            X = torch.randn(batch, m, n, device=dev, dtype=dtype)
            A = torch.empty(batch, m, m, device=dev, dtype=dtype)
            case = {"op": "gram", "batch": batch, "m": m, "n": n, "dtype": str(dtype).replace("torch.", "")}
            gram = {"eager": lambda: torch.bmm(X, X.mT, out=A), "fused": lambda: gram_triton(X, out=A)}
            rows += [harness.timed_row(SUITE, case, name, "gram", fn, quick, flops=2 * batch * m * m * n)
                     for name, fn in gram.items()]
        with torch.device("meta"):  # the shapes of the Muon-optimised matrices, no memory
            model = GPT(GPTConfig.from_depth(depth))
        shapes = [tuple(p.shape) for p in model.transformer.h.parameters() if p.ndim == 2]
        g = torch.Generator(device=dev).manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s, device=dev, generator=g) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device=dev, generator=g)
        opt = Muon(params, lr=0.02, momentum=0.95)
        case = {"op": "muon_step", "depth": depth, "matrices": len(shapes)}
        for name in ("eager", "fused"):  # the optimizer calls the dispatcher: flip the mode (outside the timed call)
            kernels.set_mode(name)
            rows.append(harness.timed_row(SUITE, case, name, "muon_step", opt.step, quick,
                                          flops=sum(_ns_flops(1, *s) for s in shapes),
                                          rep=None if gpu else 1))  # CPU: the interpreter, slow
    finally:
        kernels.set_mode(prev)
    return harness.add_ratios(rows, "eager")

if __name__ == "__main__":
    harness.main(SUITE, run)
