"""Benchmark: the LM head's loss (linear -> fp32 softcap -> cross-entropy), forward+backward and no-grad forward.

GPU (bf16): V = 65536, C = n_embd of d20 and d32 (1280, 2048), tokens in {8k, 32k, 64k}; --quick keeps (8k, d20) and
(32k, d32); 10 % of the targets are ignored (-1). Providers: eager = linear_cross_entropy_reference (matmul, .float(),
15 tanh(z / 15), F.cross_entropy: materialises N x V); compile = torch.compile of it; chunked = the same per chunk of
tokens under torch.utils.checkpoint (the fused path's logits budget), the plain-PyTorch way to bound memory; fused =
linear_cross_entropy_triton (cuBLAS GEMMs + one Triton row kernel, gradients computed in the forward). TFLOP/s: forward
2*N*V*C, fwd+bwd 6*N*V*C (chunked recomputes z: 8*N*V*C, counted as 6). Out of GPU memory: a row with oom=True.
"""
import torch
from torch.utils.checkpoint import checkpoint

from bench import harness
from kernels.linear_cross_entropy import linear_cross_entropy_reference, linear_cross_entropy_triton
from model.gpt import SOFTCAP, GPTConfig

SUITE = "linear_cross_entropy"
CHUNK_ELEMENTS = 1 << 28  # the fused path's logits budget per chunk, given to the chunked provider too

def chunked_reference(h, w, targets):
    """Mean cross-entropy (targets -1 ignored) chunk by chunk; each chunk's logits are rebuilt in backward, not kept."""
    chunk = max(1, CHUNK_ELEMENTS // w.shape[0])
    total = sum(checkpoint(linear_cross_entropy_reference, h[a:a + chunk], w, targets[a:a + chunk], softcap=SOFTCAP,
                           reduction="sum", use_reentrant=False) for a in range(0, h.shape[0], chunk))
    return total / (targets != -1).sum().clamp(min=1)

def run(quick):
    dev = "cuda" if harness.on_gpu() else "cpu"
    if dev == "cuda":
        pairs = [(8192, 20), (32768, 32)] if quick else [(n, d) for d in (20, 32) for n in (8192, 32768, 65536)]
        cases, dtype = [(n, GPTConfig.from_depth(d).n_embd, GPTConfig().vocab_size) for n, d in pairs], torch.bfloat16
    else:
        cases, dtype = [(64, GPTConfig.from_depth(1).n_embd, 512)], torch.float32
    rows = []
    for N, C, V in cases:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, C, generator=g).to(dev, dtype).requires_grad_(True)
        w = (torch.randn(V, C, generator=g) * (3.0 / C ** 0.5)).to(dev, dtype).requires_grad_(True)
        targets = torch.randint(0, V, (N,), generator=g)
        targets[::10] = -1
        targets = targets.to(dev)
        case = {"tokens": N, "C": C, "V": V, "dtype": str(dtype).replace("torch.", "")}
        flops = 2 * N * V * C  # forward: z = h w^T
        compiled = {"compile": torch.compile(linear_cross_entropy_reference, dynamic=False)} if dev == "cuda" else {}
        providers = {"eager": linear_cross_entropy_reference, **compiled, "chunked": chunked_reference,
                     "fused": linear_cross_entropy_triton}
        for name, fn in providers.items():
            both = lambda: torch.autograd.grad(fn(h, w, targets), (h, w))
            fwd = torch.no_grad()(lambda: fn(h, w, targets))
            for pass_, f, fl in (("fwd+bwd", both, 3 * flops), ("fwd", fwd, flops)):
                try:
                    rows.append(harness.timed_row(SUITE, case, name, pass_, f, quick, peak=True, flops=fl))
                except torch.cuda.OutOfMemoryError:
                    rows.append(harness.row(SUITE, case, name, pass_, None, oom=True))
                torch.cuda.empty_cache()  # a no-op without CUDA
        h = w = None  # the case's tensors go before the next, larger case is allocated
        torch.cuda.empty_cache()
    return harness.add_ratios(rows, "eager")

if __name__ == "__main__":
    harness.main(SUITE, run)
