"""Benchmark: paged decode attention (flash-decoding) vs SDPA, and engine decode tokens/s eager vs fused.

    python -m bench.paged_decode [--quick]

Kernel rows (GPU, bf16, D = 128, H = 16, Hkv in {16, 4}, block_size in {16, 64}, batch in {1, 8, 64, 256}, context
in {1k, 4k, 16k, 32k}; --quick: batch {8, 64} x context {4k, 16k}; every sequence at the full context, pages
shuffled in the pool): fused = paged_decode_attention_triton; eager = paged_decode_attention_reference (gathers the
pages to a dense (B, L, Hkv, D) copy, then SDPA with a length mask); sdpa_dense = SDPA on a contiguous (B, Hkv, L, D)
cache (no paging at all). GB/s counts the bytes a decode step must move: K + V of every valid token, q and the output
(the harness adds pct_peak_copy). Cases whose cache does not fit in free GPU memory are skipped (per provider: eager
needs a second, gathered copy; sdpa_dense its own dense cache).
Engine rows: decode tokens/s of model.engine.Engine at batch 1 and 64, eager vs fused (GPU: a random d12 model in
bf16, 256-token prompts; tokens/s = B / time of one decode step, measured over N steps after the prefill).
CPU: tiny fp32 shapes under the Triton interpreter, a smoke test: the timings measure the interpreter, not the kernel.
"""
import time
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import kernels
from bench import harness
from bench.kernels import timed_row
from kernels.paged_decode import paged_decode_attention_reference, paged_decode_attention_triton
from model.tokenizer import SPECIAL_TOKENS

SUITE = "paged_decode"
# The engine only needs the special-token ids here (no tool calls, no stop).
_TOKENIZER = SimpleNamespace(bos_token_id=0, encode_special=SPECIAL_TOKENS.index, decode=lambda ids: "",
                             encode=lambda text, prepend=None, append=None: [10 + b for b in text.encode()])


def _cases(quick):
    if not harness.on_gpu():
        return [dict(B=B, L=L, H=4, Hkv=2, D=64, block_size=16) for B, L in ((1, 100), (3, 64))], torch.float32
    batches, contexts = ((8, 64), (4096, 16384)) if quick else ((1, 8, 64, 256), (1024, 4096, 16384, 32768))
    grid = [(bs, B, L, hkv) for bs in (16, 64) for B in batches for L in contexts for hkv in (16, 4)]
    return [dict(B=B, L=L, H=16, Hkv=hkv, D=128, block_size=bs) for bs, B, L, hkv in grid], torch.bfloat16


def _free_bytes():
    return torch.cuda.mem_get_info()[0] if harness.on_gpu() else 1 << 62


def _timed_or_oom(case, name, fn, args, quick, bytes_):
    try:
        return [timed_row(SUITE, case, name, "decode", lambda: fn(*args), quick, bytes_=bytes_)]
    except torch.OutOfMemoryError:
        print(f"[{SUITE}] skip {name} {case}: out of memory")
        return []


def _kernel_rows(quick):
    dev = "cuda" if harness.on_gpu() else "cpu"
    cases, dtype = _cases(quick)
    esize = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for c in cases:
        B, L, H, Hkv, D, bs = c["B"], c["L"], c["H"], c["Hkv"], c["D"], c["block_size"]
        case = dict(c, dtype=str(dtype).replace("torch.", ""))
        cache_bytes = 2 * B * L * Hkv * D * esize
        bytes_ = cache_bytes + 2 * B * H * D * esize  # K + V read once, q read, out written
        if 1.2 * cache_bytes > _free_bytes():
            print(f"[{SUITE}] skip {case}: the cache ({cache_bytes / 2**30:.1f} GiB) does not fit")
            continue
        nblk = B * -(-L // bs)
        k_cache = torch.empty(nblk, bs, Hkv, D, device=dev, dtype=dtype).normal_()
        v_cache = torch.empty_like(k_cache).normal_()
        table = torch.randperm(nblk, device=dev).view(B, -1).to(torch.int32)  # fragmented pool
        seq_lens = torch.full((B,), L, device=dev, dtype=torch.int32)
        q = torch.randn(B, H, D, device=dev, dtype=dtype)
        paged = (q, k_cache, v_cache, table, seq_lens)
        eager_fits = 1.2 * cache_bytes < _free_bytes()
        rows += _timed_or_oom(case, "fused", paged_decode_attention_triton, paged, quick, bytes_)
        if eager_fits:
            rows += _timed_or_oom(case, "eager", paged_decode_attention_reference, paged, quick, bytes_)
        fits_dense = 1.2 * cache_bytes < _free_bytes() + cache_bytes  # the dense cache replaces the paged one
        del k_cache, v_cache, paged
        if fits_dense:
            kd = torch.empty(B, Hkv, L, D, device=dev, dtype=dtype).normal_()
            dense = (q[:, :, None, :], kd, torch.empty_like(kd).normal_())
            sdpa = partial(F.scaled_dot_product_attention, enable_gqa=True if H != Hkv else False)
            rows += _timed_or_oom(case, "sdpa_dense", sdpa, dense, quick, bytes_)
            del kd, dense
        if harness.on_gpu():
            torch.cuda.empty_cache()
    return rows


def _engine_rows(quick):
    from model.engine import Engine
    from model.gpt import GPT, GPTConfig
    gpu = harness.on_gpu()
    dev = "cuda" if gpu else "cpu"
    if gpu:
        cfg = GPTConfig.from_depth(12, sequence_len=2048)
        prompt_len, steps, batches, dtype = 256, (32 if quick else 128), (1, 64), torch.bfloat16
    else:
        cfg = GPTConfig(sequence_len=64, vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
        prompt_len, steps, batches, dtype = 16, 3, (1, 4), torch.float32
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)  # zero-initialised projections: give the logits some shape
    model = model.to(dtype).eval()
    rows, prev = [], kernels.get_mode()
    try:
        for mode in ("eager", "fused"):
            kernels.set_mode(mode)
            for B in batches:
                # one prefill batch for all B prompts (the default 8192-token budget would split B = 64 x 256 in two
                # and put the second prefill inside the timed decode steps)
                engine = Engine(model, _TOKENIZER, block_size=16,
                                num_blocks=B * ((prompt_len + steps) // 16 + 2), max_prefill_tokens=B * prompt_len)
                engine.stop_ids = set()  # a random model must not stop early: every step decodes B tokens
                prompts = [torch.randint(20, cfg.vocab_size, (prompt_len,)).tolist() for _ in range(B)]
                for _ in range(2 if gpu else 1):  # on GPU the first pass compiles every kernel variant
                    reqs = [engine.submit(p, max_tokens=steps + 2, temperature=0) for p in prompts]
                    harness._sync()
                    t0 = time.perf_counter()
                    engine.step()  # admission: prefill + the first decode step
                    harness._sync()
                    t1 = time.perf_counter()
                    for _ in range(steps):
                        engine.step()
                    harness._sync()
                    ms_per_step = (time.perf_counter() - t1) / steps * 1e3
                    while engine.has_work():
                        engine.step()
                    assert all(len(r.completions[0]) == steps + 2 for r in reqs)
                case = dict(model=f"d{cfg.n_layer}", batch=B, prompt=prompt_len, steps=steps,
                            dtype=str(dtype).replace("torch.", ""))
                rows.append(harness.row(SUITE + "_engine", case, mode, "decode", ms_per_step,
                                        tokens_per_s=B / (ms_per_step * 1e-3),
                                        prefill_and_first_step_ms=(t1 - t0) * 1e3))
    finally:
        kernels.set_mode(prev)
    return rows


def run(quick):
    rows = harness.add_ratios(_kernel_rows(quick), "eager")
    return rows + harness.add_ratios(_engine_rows(quick), "eager")


if __name__ == "__main__":
    harness.main(SUITE, run)
