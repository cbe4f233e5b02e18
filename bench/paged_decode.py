"""Benchmark: paged decode attention (flash-decoding) vs SDPA; the Engine's decode tokens/s is bench/engine.py's.

GPU (bf16, D = 128, H = 16, Hkv in {16, 4}, block_size in {16, 64}, batch in {1, 8, 64, 256}, context in {1k, 4k,
16k, 32k}; --quick: batch {8, 64} x context {4k, 16k}; every sequence at the full context, pages shuffled in the
pool): fused = paged_decode_attention_triton; eager = paged_decode_attention_reference (gathers the pages to a dense
(B, L, Hkv, D) copy, then SDPA with a length mask); sdpa_dense = SDPA on a contiguous (B, Hkv, L, D) cache (no
paging). GB/s counts the bytes a decode step must move: K + V of every valid token, q and the output. Cases whose
cache does not fit in free GPU memory are skipped (per provider: eager needs a gathered copy, sdpa_dense a dense one).
"""
from functools import partial

import torch
import torch.nn.functional as F

from bench import harness
from kernels.paged_decode import paged_decode_attention_reference, paged_decode_attention_triton

SUITE = "paged_decode"

def _timed_or_oom(case, name, fn, args, quick, bytes_):
    try:
        return [harness.timed_row(SUITE, case, name, "decode", lambda: fn(*args), quick, bytes_=bytes_)]
    except torch.OutOfMemoryError:
        print(f"[{SUITE}] skip {name} {case}: out of memory")
        return []

def run(quick):
    dev, dtype = ("cuda", torch.bfloat16) if harness.on_gpu() else ("cpu", torch.float32)
    free = lambda: torch.cuda.mem_get_info()[0] if dev == "cuda" else 1 << 62
    if dev == "cuda":
        batches, contexts = ((8, 64), (4096, 16384)) if quick else ((1, 8, 64, 256), (1024, 4096, 16384, 32768))
        grid = [(bs, B, L, hkv) for bs in (16, 64) for B in batches for L in contexts for hkv in (16, 4)]
        cases = [dict(B=B, L=L, H=16, Hkv=hkv, D=128, block_size=bs) for bs, B, L, hkv in grid]
    else:
        cases = [dict(B=B, L=L, H=4, Hkv=2, D=64, block_size=16) for B, L in ((1, 100), (3, 64))]
    rows = []
    for c in cases:
        B, L, H, Hkv, D, bs = c["B"], c["L"], c["H"], c["Hkv"], c["D"], c["block_size"]
        case = dict(c, dtype=str(dtype).replace("torch.", ""))
        cache_bytes = 2 * B * L * Hkv * D * dtype.itemsize
        bytes_ = cache_bytes + 2 * B * H * D * dtype.itemsize  # K + V read once, q read, out written
        if 1.2 * cache_bytes > free():
            print(f"[{SUITE}] skip {case}: the cache ({cache_bytes / 2**30:.1f} GiB) does not fit")
            continue
        nblk = B * -(-L // bs)
        k_cache = torch.empty(nblk, bs, Hkv, D, device=dev, dtype=dtype).normal_()
        v_cache = torch.empty_like(k_cache).normal_()
        table = torch.randperm(nblk, device=dev).view(B, -1).to(torch.int32)  # fragmented pool
        seq_lens = torch.full((B,), L, device=dev, dtype=torch.int32)
        q = torch.randn(B, H, D, device=dev, dtype=dtype)
        paged = (q, k_cache, v_cache, table, seq_lens)
        eager_fits = 1.2 * cache_bytes < free()  # its gathered copy
        rows += _timed_or_oom(case, "fused", paged_decode_attention_triton, paged, quick, bytes_)
        if eager_fits:
            rows += _timed_or_oom(case, "eager", paged_decode_attention_reference, paged, quick, bytes_)
        fits_dense = 1.2 * cache_bytes < free() + cache_bytes  # the dense cache replaces the paged one
        del k_cache, v_cache, paged
        if fits_dense:
            kd = torch.empty(B, Hkv, L, D, device=dev, dtype=dtype).normal_()
            dense = (q[:, :, None, :], kd, torch.empty_like(kd).normal_())
            sdpa = partial(F.scaled_dot_product_attention, enable_gqa=H != Hkv)
            rows += _timed_or_oom(case, "sdpa_dense", sdpa, dense, quick, bytes_)
            del kd, dense
        torch.cuda.empty_cache()  # a no-op without CUDA
    return harness.add_ratios(rows, "eager")

if __name__ == "__main__":
    harness.main(SUITE, run)
