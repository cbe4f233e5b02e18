"""Ahead-of-time check of the attention kernels' Hopper code, no GPU needed: `python -m bench.sass [bf16|fp16] [64|128]`
compiles every Hopper autotune config of kernels.attention for sm_90 (Triton's bundled ptxas) and prints, per config,
the shared memory, whether tl.dot became wgmma (HGMMA in the SASS) and the local-memory spills (LDL/STL) inside the
innermost loops."""
import os
import re
import subprocess
import sys
import tempfile

# Compiling for sm_90 needs Triton's compiler, not the interpreter bench/__init__.py switches on without CUDA; as
# `python -m bench.sass` nothing has imported triton yet, so the switch can still be undone here.
if "triton" not in sys.modules:
    os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.attention import triton_kernels  # noqa: E402


def spills_in_inner_loops(sass):
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
    """Print one line per (kernel, Hopper config): smem bytes, HGMMA count, spills inside / outside inner loops."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench.sass: run it as `python -m bench.sass` (Triton was imported under the interpreter)")
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    ints, floats = {"T", "H", "HKV", "T_BUCKET"}, {"sm_scale", "eps"}
    fp32_ptrs = {"COS", "SIN", "LSE", "RSTD_Q", "RSTD_K", "DELTA"}
    for name, kern in triton_kernels().items():
        fn = kern.fn
        for c in kern.configs:
            consts = dict(CAUSAL=True, QK_NORM=True, HEAD_DIM=head_dim, PRECISION="tf32", **c.kwargs)
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
                  f"HGMMA={sass.count('HGMMA')} spills_in_inner_loops={spills_in_inner_loops(sass)} "
                  f"spills_total={sass.count('LDL') + sass.count('STL')}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    sass_report(*(args[:1] or ["bf16"]), *(int(a) for a in args[1:2]))
