"""Benchmark: fused RoPE + QK-norm flash attention vs eager (torch ops + SDPA), torch.compile, FlexAttention.

GPU (bf16, causal): the d20 heads (H = 10, D = 128), 16 x 2048 tokens as T in {1k, 2k, 4k, 8k}, B = tokens / T,
Hkv = H (MHA) and 2 (GQA); --quick keeps T = 2k MHA. Providers: eager = attention_reference (RoPE + rms_norm as torch
ops, then SDPA forced to flash, or SDPA's own choice if flash refuses the inputs: the row's sdpa_backend); compile =
torch.compile of it; flex = torch.compile(FlexAttention with a causal BlockMask + the same RoPE / norm ops); fused =
attention_triton. TFLOP/s from the causal count (RoPE / norm ignored): forward = 2 * B * H * T^2 * D (2 matmuls of
2*T*T*D per head, halved by the mask), backward = 2.5 x forward (5 matmuls: the FlashAttention convention).
"""
import torch

from bench import harness
from kernels.attention import apply_rotary, attention_reference, attention_triton, rms_norm
from model.gpt import GPTConfig, precompute_rotary

SUITE = "attention"
D20 = GPTConfig.from_depth(20)
TOKENS = 16 * D20.sequence_len  # the d20 preset's device batch of 16 sequences

def _providers(inputs, T, H, Hkv):
    """name -> (fn, extra row fields)"""
    if not harness.on_gpu():
        return {"eager": (attention_reference, {}), "fused": (attention_triton, {})}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    try:  # flash if it accepts these inputs, else SDPA's own choice
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            attention_reference(*inputs)
        backend, in_backend = "flash", sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # as a decorator: entered per call
    except RuntimeError:
        backend, in_backend = "default", lambda f: f
    block_mask = create_block_mask(lambda b, h, qi, kvi: qi >= kvi, None, None, T, T, device=inputs[0].device)

    def flex(q, k, v, cos, sin):
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                           enable_gqa=H != Hkv)
        return y.transpose(1, 2)
    extra, compiled = {"sdpa_backend": backend}, torch.compile(attention_reference)
    return {"eager": (in_backend(attention_reference), extra), "compile": (in_backend(compiled), extra),
            "flex": (torch.compile(flex), {}), "fused": (attention_triton, {})}

def run(quick):
    dev, dtype = ("cuda", torch.bfloat16) if harness.on_gpu() else ("cpu", torch.float32)
    H, D, T0 = D20.n_head, D20.head_dim, D20.sequence_len
    if dev == "cpu":
        cases = [(1, 64, 4, 4, 64), (1, 64, 4, 2, 64)]
    elif quick:  # one case: compiling the compile / flex providers dominates a quick GPU run
        cases = [(TOKENS // T0, T0, H, H, D)]
    else:
        cases = [(TOKENS // T, T, H, hkv, D) for T in (1024, 2048, 4096, 8192) for hkv in (H, 2)]  # MHA, GQA
    rows = []
    for B, T, H, Hkv, D in cases:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, T, n, D, generator=g).to(dev, dtype).requires_grad_(True) for n in (H, Hkv, Hkv))
        dy = torch.randn(B, T, H, D, generator=g).to(dev, dtype)
        inputs = (q, k, v, *precompute_rotary(T, D, device=dev))
        case = {"B": B, "T": T, "H": H, "Hkv": Hkv, "D": D, "dtype": str(dtype).replace("torch.", "")}
        flops = 2 * B * H * T * T * D  # forward: (QK^T + PV) = 4*T*T*D per head, halved by the causal mask
        for name, (fn, extra) in _providers(inputs, T, H, Hkv).items():
            rows += harness.fwd_bwd_rows(SUITE, case, name, fn, inputs, (q, k, v), dy, flops, 2.5, quick, **extra)
    return harness.add_ratios(rows, "eager")

if __name__ == "__main__":
    harness.main(SUITE, run)
