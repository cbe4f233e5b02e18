"""Benchmark: fused RoPE + QK-norm flash attention vs eager (torch ops + SDPA), torch.compile, FlexAttention.

    python -m bench.attention [--quick]

GPU (bf16, D = 128, causal, B*T = 32k tokens): T in {1k, 2k, 4k, 8k} (B = 32k / T), H = 16 with Hkv = 16 (MHA) and
Hkv = 4 (GQA); --quick keeps T = 2k MHA only (the GPU check's time budget). Providers:
  eager    reference_attention: apply_rotary + rms_norm as torch ops, then SDPA forced to the flash backend
           (falls back to SDPA's own choice, recorded in the row as sdpa_backend, if flash refuses the inputs)
  compile  torch.compile of the same function
  flex     torch.compile(FlexAttention with a causal BlockMask + the same RoPE / norm ops)
  fused    kernels.attention.triton_attention (ours: K rotated/normalised in a pre-pass, Q on load)
  fused_kloop  forward only: the in-loop alternative (K rotated/normalised on every tile load, no pre-pass), kept
           so the design choice in kernels/attention.py can be settled by this measurement
TFLOP/s from the explicit causal count (RoPE / norm flops ignored, they are O(T D)):
  forward  = 2 matmuls x 2*T*T*D per (batch, head), halved by the causal mask = 2 * B * H * T^2 * D
  backward = 2.5 x forward (5 matmuls instead of 2: the FlashAttention convention), fwd+bwd = 3.5 x forward.
Peak memory = torch.cuda.max_memory_allocated above the inputs while the pass runs.
CPU: tiny fp32 shapes, eager vs fused under the Triton interpreter -- exercises the code path only; those timings
measure the interpreter, not the kernel.

    python -m bench.attention --sass [bf16|fp16] [64|128]

needs no GPU: compiles every Hopper autotune config for sm_90 and prints shared memory, whether tl.dot became wgmma
(HGMMA in the SASS) and how many local-memory spill instructions (LDL/STL) sit inside the innermost loops.
"""
import contextlib
import os
import re
import sys

import torch

SASS = __name__ == "__main__" and "--sass" in sys.argv
if not torch.cuda.is_available() and not SASS:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the fused path runs interpreted

from bench import harness  # noqa: E402
from kernels.attention import (apply_rotary, reference_attention, rms_norm, triton_attention,  # noqa: E402
                               triton_attention_forward_k_in_loop)

SUITE = "attention"
TOKENS, HEADS, HEAD_DIM = 32768, 16, 128


def _flash_or_default(q, k, v, cos, sin):
    """Which SDPA backend the eager row gets: flash if it accepts these inputs, else SDPA's default choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            reference_attention(q, k, v, cos, sin)
        return "flash", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    except RuntimeError:
        return "default", contextlib.nullcontext


def _flex_provider(T, H, Hkv, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    block_mask = create_block_mask(lambda b, h, qi, kvi: qi >= kvi, None, None, T, T, device=device)

    def flex(q, k, v, cos, sin):
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                           enable_gqa=H != Hkv)
        return y.transpose(1, 2)
    return torch.compile(flex)


def _providers(inputs, T, H, Hkv):
    """name -> (fn, extra row fields, passes)"""
    both, fwd_only = ("fwd", "bwd", "fwd+bwd"), ("fwd",)
    ours = {"fused": (triton_attention, {}, both), "fused_kloop": (triton_attention_forward_k_in_loop, {}, fwd_only)}
    if not harness.on_gpu():
        return {"eager": (reference_attention, {}, both), **ours}
    backend, ctx = _flash_or_default(*inputs)

    def eager(*a):
        with ctx():
            return reference_attention(*a)
    compiled = torch.compile(reference_attention)

    def compile_(*a):
        with ctx():
            return compiled(*a)
    return {"eager": (eager, {"sdpa_backend": backend}, both), "compile": (compile_, {"sdpa_backend": backend}, both),
            "flex": (_flex_provider(T, H, Hkv, inputs[0].device), {}, both), **ours}


def _cases(quick):
    if not harness.on_gpu():
        return [(1, 64, 4, 4, 64), (1, 64, 4, 2, 64)], torch.float32
    if quick:  # one case: compiling the compile / flex providers dominates a quick GPU run
        return [(TOKENS // 2048, 2048, HEADS, HEADS, HEAD_DIM)], torch.bfloat16
    return [(TOKENS // T, T, HEADS, hkv, HEAD_DIM) for T in (1024, 2048, 4096, 8192) for hkv in (HEADS, 4)], \
        torch.bfloat16


def causal_flops(B, T, H, D):
    return 2 * B * H * T * T * D  # forward: (QK^T + PV) = 4*T*T*D per head, halved by the causal mask


def run(quick):
    dev = "cuda" if harness.on_gpu() else "cpu"
    cases, dtype = _cases(quick)
    rows = []
    for B, T, H, Hkv, D in cases:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, T, n, D, generator=g).to(dev, dtype).requires_grad_(True) for n in (H, Hkv, Hkv))
        dy = torch.randn(B, T, H, D, generator=g).to(dev, dtype)
        base = torch.arange(T, dtype=torch.float32)[:, None] / 10000 ** (torch.arange(0, D, 2) / D)
        cos, sin = base.cos().to(dev), base.sin().to(dev)
        inputs = (q, k, v, cos, sin)
        case = {"B": B, "T": T, "H": H, "Hkv": Hkv, "D": D, "dtype": str(dtype).replace("torch.", "")}
        flops = causal_flops(B, T, H, D)
        for name, (fn, extra, passes) in _providers(inputs, T, H, Hkv).items():
            fwd = lambda: fn(*inputs)
            y = fwd()
            bwd = lambda: torch.autograd.grad(y, (q, k, v), dy, retain_graph=True)
            both = lambda: torch.autograd.grad(fwd(), (q, k, v), dy)
            for pass_, f, fl in (("fwd", fwd, flops), ("bwd", bwd, 2.5 * flops), ("fwd+bwd", both, 3.5 * flops)):
                if pass_ not in passes:
                    continue
                t = harness.bench(f, quick=quick)
                peak = harness.peak_memory_mb(f) if pass_ != "bwd" else None
                rows.append(harness.row(SUITE, case, name, pass_, t["ms"], flops=fl, peak_mb=peak,
                                        ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], **extra))
            del y
    return harness.add_ratios(rows, "eager")


def _spills_in_inner_loops(sass):
    """Count LDL/STL inside innermost loops (backward branches) of nvdisasm output."""
    label_addr, ins, label = {}, [], None
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            label = m.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            if label:
                label_addr[label], label = addr, None
            ins.append((addr, m.group(2)))
    loops = [(label_addr[m.group(1)], a) for a, t in ins
             if (m := re.search(r"BRA\s+`?\(?(\.L_x_\d+)", t)) and label_addr.get(m.group(1), a) < a]
    inner = [(lo, hi) for lo, hi in loops
             if not any(lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi) for l2, h2 in loops)]
    return sum(1 for a, t in ins if ("LDL" in t or "STL" in t) and any(lo <= a <= hi for lo, hi in inner))


def sass_report(dtype="bf16", head_dim=128):
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.attention as A
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    ints, floats = {"T", "H", "HKV", "T_BUCKET"}, {"sm_scale", "eps"}
    fp32_ptrs = {"COS", "SIN", "LSE", "RSTD_Q", "RSTD_K", "DELTA"}
    for name, kern, configs in (("fwd", A._attn_fwd, A._FWD_CONFIGS), ("dkdv", A._attn_bwd_dkdv, A._DKDV_CONFIGS),
                                ("dq", A._attn_bwd_dq, A._DQ_CONFIGS)):
        fn = kern.fn
        for c in configs:
            consts = dict(CAUSAL=True, QK_NORM=True, HEAD_DIM=head_dim, PRECISION="tf32", **c.kwargs)
            if "K_ROPE" in fn.arg_names:
                consts["K_ROPE"] = False
            sig = {a: "constexpr" if a in consts else "i32" if a in ints else "fp32" if a in floats else
                   "*fp32" if a in fp32_ptrs else f"*{dtype}" for a in fn.arg_names}
            src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": c.num_warps, "num_stages": c.num_stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(ck.asm["cubin"])
                f.flush()
                sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
            print(f"{name:5s} {c.kwargs} warps={c.num_warps} stages={c.num_stages} smem={ck.metadata.shared} "
                  f"HGMMA={sass.count('HGMMA')} spills_in_inner_loops={_spills_in_inner_loops(sass)} "
                  f"spills_total={sass.count('LDL') + sass.count('STL')}", flush=True)


if __name__ == "__main__":
    if SASS:
        args = sys.argv[sys.argv.index("--sass") + 1:]
        sass_report(*(args[:1] or ["bf16"]), *(int(a) for a in args[1:2]))
    else:
        harness.main(SUITE, run)
