"""Benchmark: paged decode attention (flash-decoding) vs SDPA, and engine decode tokens/s eager vs fused.

    python -m bench.paged_decode [--quick]

Kernel rows (GPU, bf16, D = 128, H = 16, Hkv in {16, 4}, block_size in {16, 64}, batch in {1, 8, 64, 256},
context in {1k, 4k, 16k, 32k}; every sequence at the full context, pages shuffled in the pool):
  fused       paged_decode_attention_triton (split-KV, one page read per GQA group)
  eager       paged_decode_attention_reference: gather the pages to a dense (B, L, Hkv, D) copy, then SDPA with a
              length mask
  sdpa_dense  a plain dense-cache decode: SDPA on a contiguous (B, Hkv, L, D) cache (no paging at all)
GB/s counts the bytes a decode step must move: K + V of every valid token, plus q and the output; the harness adds
the fraction of the device copy bandwidth measured in the same run (pct_peak_copy). Cases whose cache does not fit
in free GPU memory are skipped (per provider: eager needs a second, gathered copy; sdpa_dense its own dense cache).
--quick (the GPU check): block 16 and 64 at batch {8, 64} x context {4k, 16k}, Hkv in {16, 4}.
Engine rows: decode tokens/s of model.engine.Engine at batch 1 and 64, eager vs fused (GPU: a random d12 model in
bf16, 256-token prompts; tokens/s = B / time of one decode step, measured over N steps after the prefill).
CPU: tiny fp32 shapes, eager / sdpa_dense / fused under the Triton interpreter: a smoke test of the code path; those
timings measure the interpreter, not the kernel.
"""
import time

import torch
import torch.nn.functional as F

import kernels
from bench import harness
from kernels.paged_decode import paged_decode_attention_reference, paged_decode_attention_triton
from model.tokenizer import SPECIAL_TOKENS

SUITE = "paged_decode"


def _cases(quick):
    if not harness.on_gpu():
        return [dict(B=B, L=L, H=4, Hkv=2, D=64, block_size=16) for B, L in ((1, 100), (3, 64))], torch.float32
    if quick:
        grid = [(bs, B, L, hkv) for bs in (16, 64) for B in (8, 64) for L in (4096, 16384) for hkv in (16, 4)]
    else:
        grid = [(bs, B, L, hkv) for bs in (16, 64) for B in (1, 8, 64, 256) for L in (1024, 4096, 16384, 32768)
                for hkv in (16, 4)]
    return [dict(B=B, L=L, H=16, Hkv=hkv, D=128, block_size=bs) for bs, B, L, hkv in grid], torch.bfloat16


def _free_bytes():
    return torch.cuda.mem_get_info()[0] if harness.on_gpu() else 1 << 62


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
        nblk = B * (L // bs) if L % bs == 0 else B * (L // bs + 1)
        k_cache = torch.empty(nblk, bs, Hkv, D, device=dev, dtype=dtype).normal_()
        v_cache = torch.empty_like(k_cache).normal_()
        table = torch.randperm(nblk, device=dev).view(B, -1).to(torch.int32)  # fragmented pool
        seq_lens = torch.full((B,), L, device=dev, dtype=torch.int32)
        q = torch.randn(B, H, D, device=dev, dtype=dtype)
        provs = {"fused": lambda: paged_decode_attention_triton(q, k_cache, v_cache, table, seq_lens)}
        if 1.2 * cache_bytes < _free_bytes():
            provs["eager"] = lambda: paged_decode_attention_reference(q, k_cache, v_cache, table, seq_lens)
        for name, fn in provs.items():
            try:
                t = harness.bench(fn, quick=quick)
            except torch.OutOfMemoryError:
                print(f"[{SUITE}] skip {name} {case}: out of memory")
                continue
            rows.append(harness.row(SUITE, case, name, "decode", t["ms"], bytes_=bytes_,
                                    ms_p20=t["ms_p20"], ms_p80=t["ms_p80"]))
        if 1.2 * cache_bytes < _free_bytes() + cache_bytes:  # the dense cache replaces the paged one
            del k_cache, v_cache
            kd = torch.empty(B, Hkv, L, D, device=dev, dtype=dtype).normal_()
            vd = torch.empty_like(kd).normal_()
            qd = q[:, :, None, :]
            fn = lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=H != Hkv)
            try:
                t = harness.bench(fn, quick=quick)
                rows.append(harness.row(SUITE, case, "sdpa_dense", "decode", t["ms"], bytes_=bytes_,
                                        ms_p20=t["ms_p20"], ms_p80=t["ms_p80"]))
            except torch.OutOfMemoryError:
                print(f"[{SUITE}] skip sdpa_dense {case}: out of memory")
            del kd, vd
        else:
            del k_cache, v_cache
        if harness.on_gpu():
            torch.cuda.empty_cache()
    return rows


class _StandInTokenizer:
    """The engine only needs the special-token ids here (no tool calls, no stop)."""
    bos_token_id = 0

    def encode_special(self, name):
        return SPECIAL_TOKENS.index(name)

    def encode(self, text, prepend=None, append=None):
        return [10 + b for b in text.encode()]

    def decode(self, ids):
        return ""


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
                engine = Engine(model, _StandInTokenizer(), block_size=16,
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
