"""Benchmark: the inference Engine end to end, side by side with nanochat's Engine on the same random-weight model.

    python -m bench.engine --peer /tmp/nanochat          # ours vs nanochat (a local checkout; nothing of it is shipped)
    python -m bench.engine                                # ours only

Cases (a 64-token prompt, 128 new greedy tokens, all made: the stop tokens lie outside the vocabulary): samples=N,
one prompt with N samples decoding together; prompts=N, N different prompts at once (nanochat's Engine takes one per
call). Providers: ours-eager, ours-fused and ours-fused-graphs (+ the decode step replayed from CUDA graphs), both
CUDA only; nanochat (Engine.generate, eager). ms = decode time (first token to last) for samples cases, wall time for
prompts cases (ratio = nanochat ms / ours); cpu_ms / cpu_ratio the same in process CPU time (steadier on a shared
machine: pass --threads 1); decode_tok_s, tok_s (end to end), ttft_ms (submit to first token, mean), itl_ms (median
gap between tokens); kv_mb = KV bytes at the peak (ours: pages in use + the eager path's dense rows; nanochat: its
dense cache); peak_mb = CUDA allocator peak; agree = share of the first sample's greedy tokens equal to nanochat's,
up to the first difference. The model: depth 4, width 256, 4 heads of 64, full attention, matrices N(0, 1/fan_in).
nanochat's GPT (commit 92d63d4) is configured as this plain architecture (window pattern "L", no value embeddings,
resid_lambdas 1, x0/smear/backout lambdas 0, our rotary tables, q / 1.44 against its 1.2 x 1.2 q/k scale) and given
our weights, so both compute the same function (`agree` checks it). Reps interleave every case x provider; medians.
"""
import os
import queue
import statistics
import sys
import time
from types import SimpleNamespace

import torch

import kernels
from bench import harness
from model.common import int_at_least
from model.engine import Engine
from model.gpt import GPT, GPTConfig
from model.tokenizer import SPECIAL_TOKENS

SUITE = "engine"

def _tokenizer(vocab_size):
    """The surface both engines read. Special ids start at the model's vocab size: no model can sample them."""
    special = {name: vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}
    bos = special["<|bos|>"]
    return SimpleNamespace(bos_token_id=bos, get_bos_token_id=lambda: bos, encode_special=special.__getitem__,
                           encode=lambda text, *args, **kwargs: [b % 256 for b in text.encode()],
                           decode=lambda ids: bytes(i % 256 for i in ids).decode(errors="replace"))

def build_model(depth, head_dim, vocab, seq_len, device, dtype):
    """Our GPT with random weights: the init, then every zero-initialised matrix drawn N(0, 1/fan_in)."""
    torch.manual_seed(0)
    n_head = 64 * depth // head_dim
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_embd=64 * depth, n_head=n_head,
                    n_kv_head=n_head)
    model = GPT(cfg).to(device)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model.to(dtype).eval()

def peer_engine(path, ours, tok):
    """nanochat's Engine (imported from a local checkout at `path`) over its GPT configured as the plain architecture
    holding our weights (module docstring)."""
    path = os.path.abspath(path)
    sys.path.insert(0, path)
    import nanochat.common
    import nanochat.engine
    import nanochat.flash_attention as fa
    import nanochat.gpt as gpt
    c, dtype = ours.config, nanochat.common.COMPUTE_DTYPE
    with torch.device(ours.lm_head.weight.device):
        model = gpt.GPT(gpt.GPTConfig(sequence_len=c.sequence_len, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                      n_head=c.n_head, n_kv_head=c.n_kv_head, n_embd=c.n_embd, window_pattern="L"))
    model.init_weights()
    with torch.no_grad():
        model.value_embeds = torch.nn.ModuleDict()  # no value embeddings: its forward then passes ve=None
        for blk in model.transformer.h:
            blk.attn.ve_gate = None
        for lam, v in ((model.resid_lambdas, 1.0), (model.x0_lambdas, 0.0), (model.smear_lambda, 0.0),
                       (model.backout_lambda, 0.0)):
            lam.fill_(v)
        model.transformer.wte.weight.zero_()[:c.vocab_size].copy_(ours.transformer.wte.weight)
        model.lm_head.weight.zero_()[:c.vocab_size].copy_(ours.lm_head.weight)
        for mine, theirs in zip(ours.transformer.h, model.transformer.h):
            for name in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                theirs.get_submodule(name).weight.copy_(mine.get_submodule(name).weight)
        model.cos, model.sin = ours.cos[None, :, None, :].to(dtype), ours.sin[None, :, None, :].to(dtype)
        model.to(dtype)  # its Linear casts weights to the activation dtype each call: store them in it already
    if not getattr(fa.flash_attn, "_plain_scale", False):
        # q and k are both scaled by 1.2 after the QK norm: divide q by 1.44 so the logits are q.k / sqrt(D), ours.
        kv, func = fa.flash_attn.flash_attn_with_kvcache, fa.flash_attn.flash_attn_func
        fa.flash_attn.flash_attn_with_kvcache = lambda q, *a, **k: kv(q / 1.44, *a, **k)
        fa.flash_attn.flash_attn_func = lambda q, *a, **k: func(q / 1.44, *a, **k)
        fa.flash_attn._plain_scale = True
    return nanochat.engine.Engine(model.eval(), tok)

class _StampedQueue(queue.Queue):
    """A request's event queue that records when each token column was produced (wall and process time)."""

    def __init__(self):
        super().__init__()
        self.stamps, self.cpu_stamps = [], []

    def put(self, item, *args, **kwargs):
        if item is not None:
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())
        super().put(item, *args, **kwargs)

def _clocks():
    return harness.now(), time.process_time()

def _union(intervals):
    """Total length covered by a list of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        total += max(0.0, b - max(a, end))
        end = max(end, b)
    return total

def _summary(start, end, streams, num_samples, kv_bytes):
    """start, end: (wall, process) clocks; streams: per request (submit time, [column times], [column process times],
    first sample's tokens) -> the row's metrics. Process (CPU) times are what a loaded machine disturbs least."""
    (t0, cpu0), (t_end, cpu_end), (submits, times, cpus, tokens) = start, end, zip(*streams)
    decode_s = _union([(t[0], t[-1]) for t in times])  # requests may overlap (batched)
    decode_tok = sum(len(t) - 1 for t in times) * num_samples
    gaps = [b - a for t in times for a, b in zip(t, t[1:])]
    return dict(wall_s=t_end - t0, decode_s=decode_s, tok_s=sum(map(len, times)) * num_samples / (t_end - t0),
                cpu_s=cpu_end - cpu0, decode_cpu_s=_union([(c[0], c[-1]) for c in cpus]),
                decode_tok_s=decode_tok / decode_s if decode_s > 0 else None,
                ttft_ms=1e3 * statistics.mean(t[0] - ts for ts, t in zip(submits, times)),
                itl_ms=1e3 * statistics.median(gaps) if gaps else None, kv_mb=kv_bytes / 2**20, tokens=list(tokens))

def run_ours(engine, prompts, num_samples, max_tokens):
    """All prompts submitted at once and stepped until done (continuous batching)."""
    cache, start, reqs = engine.cache, _clocks(), []
    for i, p in enumerate(prompts):
        r = engine.submit(p, num_samples=num_samples, max_tokens=max_tokens, temperature=0.0, seed=i)
        r.events = _StampedQueue()
        reqs.append((time.perf_counter(), r))
    bytes_per_block, peak = 2 * cache.k[:, 0].numel() * cache.k.element_size(), 0
    while engine.has_work():
        engine.step()
        # pages in use, plus the dense rows of the eager path (each row as long as the longest one)
        rows = 0 if cache.row_k is None else 2 * len(cache.rows) * cache.row_k[:, 0].numel() * cache.k.element_size()
        peak = max(peak, (cache.num_blocks - cache.num_free()) * bytes_per_block + rows)
    streams = [(ts, r.events.stamps, r.events.cpu_stamps, r.completions[0]) for ts, r in reqs]
    return _summary(start, _clocks(), streams, num_samples, peak)

def run_peer(engine, prompts, num_samples, max_tokens):
    """nanochat's Engine.generate, one prompt after another (it takes one prompt per call)."""
    c, start, streams = engine.model.config, _clocks(), []
    for i, p in enumerate(prompts):
        stamps = []  # (wall, process, token) per column; all prompts arrive at start: later ones wait
        for col, _ in engine.generate(p, num_samples=num_samples, max_tokens=max_tokens, temperature=0.0, seed=i):
            stamps.append((time.perf_counter(), time.process_time(), col[0]))
            if len(stamps) == max_tokens:  # stop here: its loop would run one more forward before it notices
                break
        streams.append((start[0], *zip(*stamps)))
    end = _clocks()
    per_token = 2 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * engine.model.cos.element_size()
    kv_bytes = per_token * (num_samples * (len(prompts[-1]) + max_tokens) + len(prompts[-1]))
    return _summary(start, end, streams, num_samples, kv_bytes)

def run(args):
    """main's flags -> harness rows (see the module docstring)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = (torch.device("cuda"), torch.bfloat16) if harness.on_gpu() else (torch.device("cpu"), torch.float32)
    vocab, prompt_len, max_tokens = args.vocab, args.prompt_len, args.max_tokens
    reps = min(args.reps, 2) if args.quick else args.reps
    model, tok = build_model(args.depth, args.head_dim, vocab, 256, device, dtype), _tokenizer(vocab)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    many = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    cases = [(dict(samples=n), [prompt], n) for n in args.samples]
    cases.append((dict(prompts=args.prompts), many, 1))

    # name -> (kernel mode, runner, engine); every run prefills its prompt, as nanochat's
    ours = Engine(model, tok, prefix_caching=False)
    providers = {"ours-eager": ("eager", run_ours, ours)}
    if device.type == "cuda":
        providers["ours-fused"] = ("fused", run_ours, ours)
        providers["ours-fused-graphs"] = ("fused", run_ours, Engine(model, tok, prefix_caching=False, cuda_graphs=True))
    if args.peer:
        providers["nanochat"] = ("eager", run_peer, peer_engine(args.peer, model, tok))

    results = {}  # (case index, provider) -> list of runs
    old_mode = kernels.get_mode()
    try:
        for rep in range(reps + 1):  # rep 0 warms up (allocations, kernel compiles) and is dropped
            for ci, (case, ps, n) in enumerate(cases):
                for name, (mode, runner, engine) in providers.items():
                    kernels.set_mode(mode)
                    out = {}
                    with torch.inference_mode():
                        out["peak_mb"] = harness.peak_memory_mb(lambda: out.update(runner(engine, ps, n, max_tokens)))
                    if rep:
                        results.setdefault((ci, name), []).append(out)
                    print(f"[{SUITE}] rep {rep} {harness.fmt_case(case)} {name}: "
                          f"decode {out['decode_tok_s'] or 0:.0f} tok/s, ttft {out['ttft_ms']:.1f} ms", flush=True)
    finally:
        kernels.set_mode(old_mode)

    rows = []
    for ci, (case, ps, n) in enumerate(cases):
        ref = results.get((ci, "nanochat"))
        wall, cpu = ("decode_s", "decode_cpu_s") if "samples" in case else ("wall_s", "cpu_s")
        for name in providers:
            runs = results[(ci, name)]
            med = lambda key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None
            extra = dict(cpu_ms=1e3 * med(cpu), reps=len(runs), ms_all=[round(1e3 * r[wall], 2) for r in runs],
                         **{k: med(k) for k in ("decode_tok_s", "tok_s", "ttft_ms", "itl_ms", "kv_mb")})
            if ref and name != "nanochat":  # the share of the first sample's tokens before the first difference
                a, b = runs[-1]["tokens"][0], ref[-1]["tokens"][0]
                same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                extra["agree"] = same / max(len(a), 1)
            rows.append(harness.row(SUITE, dict(case, prompt_len=prompt_len, new=max_tokens), name, "decode",
                                    1e3 * med(wall), peak_mb=med("peak_mb"), **extra))
    if device.type != "cuda":
        rows += [harness.row(SUITE, dict(note="fused decode step, CUDA graphs"), name, "decode", None,
                             status="not measured on GPU") for name in ("ours-fused", "ours-fused-graphs")]
    if args.peer:
        harness.add_ratios(rows, "nanochat", "cpu_ms", "cpu_ratio")
        harness.add_ratios(rows, "nanochat")
    return rows

def main(argv=None):
    ap = harness.parser(__doc__.splitlines()[0], quick="at most 2 reps")
    ap.add_argument("--peer", default=None, help="a nanochat checkout to run side by side (imported at run time)")
    ap.add_argument("--reps", type=int_at_least(1), default=5, help="interleaved repetitions (medians are reported)")
    ap.add_argument("--samples", type=lambda s: [int_at_least(1)(n) for n in s.split(",")], default="1,8,32",
                    help="comma list of num_samples for the one-prompt cases")
    ap.add_argument("--prompts", type=int_at_least(1), default=8, help="different prompts for the batching case")
    for flag, default in (("--prompt-len", 64), ("--max-tokens", 128), ("--depth", 4), ("--head-dim", 64)):
        ap.add_argument(flag, type=int_at_least(1), default=default)
    ap.add_argument("--vocab", type=int_at_least(256), default=2048, help="the tiny preset's tokenizer has 2048")
    ap.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.peer and not os.path.isfile(os.path.join(args.peer, "nanochat", "engine.py")):
        ap.error(f"--peer {args.peer} is not a nanochat checkout (no nanochat/engine.py)")
    info = harness.header(SUITE, f"  threads {args.threads or torch.get_num_threads()}  load {os.getloadavg()[0]:.1f}")
    rows = run(args)
    info["load_avg_1min"] = os.getloadavg()[0]
    if args.peer:
        info["peer"] = os.path.abspath(args.peer)
    measured = [r for r in rows if r["ms"] is not None]
    harness.print_table(measured)
    for r in measured:
        print(f"  {harness.fmt_case(r['case'])} {r['provider']}: decode {r['decode_tok_s']:.0f} tok/s, "
              f"e2e {r['tok_s']:.0f} tok/s, ttft {r['ttft_ms']:.1f} ms, itl {r['itl_ms']:.2f} ms, "
              f"kv {r['kv_mb']:.1f} MB, ratio {r.get('ratio') or float('nan'):.2f} (CPU time "
              f"{r.get('cpu_ratio') or float('nan'):.2f}), agree {r.get('agree')}")
    return harness.write_results(SUITE, rows, info, None, args.out, not args.no_png, args.quick)

if __name__ == "__main__":
    main()
