"""The one benchmark harness every suite uses: a suite `bench/<kernel>.py` has `run(quick) -> rows` (built with
`row()` / `timed_row()`) and ends in `harness.main("<suite>", run)`. Timing: triton.testing.do_bench on CUDA, a
perf_counter loop on CPU; TFLOP/s and GB/s come from explicit FLOP / byte counts, ratio = the baseline's ms / the row's.
The table is printed and written to bench/results/<suite>-<device>-<date>.json (+ a PNG) with the device, driver, CUDA,
torch, triton, git commit and date. On CPU the suites run tiny fp32 smoke shapes without torch.compile providers, the
fused ones under the Triton interpreter (the timings measure the interpreter): the JSON says "cpu".
"""
import json
import os
import re
import statistics
import time
import timeit

import torch
import triton.testing

from model.common import ArgumentParser, versions, writable_dir

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

def on_gpu():
    return torch.cuda.is_available()

def sync():
    if on_gpu():
        torch.cuda.synchronize()

def now():
    """time.perf_counter() once the device's queued work is done."""
    sync()
    return time.perf_counter()

def bench(fn, quick=False, rep=None):
    """Time fn() in milliseconds -> {"ms": median, "ms_p20", "ms_p80"}."""
    if on_gpu():
        q = triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=rep or (20 if quick else 100),
                                    quantiles=[0.5, 0.2, 0.8])
        return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2]}
    fn()  # warm-up (and compilation / interpreter caches)
    times = sorted(1e3 * t for t in timeit.repeat(fn, number=1, repeat=rep or (2 if quick else 5)))
    return {"ms": statistics.median(times), "ms_p20": times[len(times) // 5], "ms_p80": times[(4 * len(times)) // 5]}

def peak_memory_mb(fn):
    """Run fn() -> the peak CUDA memory allocated meanwhile, in MB above what was allocated before (None on CPU)."""
    if not on_gpu():
        fn()
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20

def row(suite, case, provider, pass_, ms, flops=None, bytes_=None, peak_mb=None, **extra):
    """One result row. flops / bytes_ are the explicit counts of the work; rates are derived from them."""
    return {"suite": suite, "case": dict(case), "provider": provider, "pass": pass_, "ms": ms,
            "tflops": flops / (ms * 1e-3) / 1e12 if flops and ms else None,
            "gbps": bytes_ / (ms * 1e-3) / 1e9 if bytes_ and ms else None, "peak_mb": peak_mb, **extra}

def timed_row(suite, case, provider, pass_, fn, quick, peak=False, rep=None, **extra):
    """bench(fn) as a row: median ms, the p20/p80 spread, peak memory when `peak`; extra: flops=, bytes_=, ..."""
    t = bench(fn, quick=quick, rep=rep)
    return row(suite, case, provider, pass_, t["ms"], peak_mb=peak_memory_mb(fn) if peak and on_gpu() else None,
               ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], **extra)

def fwd_bwd_rows(suite, case, provider, fn, inputs, grad_inputs, dy, flops, bwd_factor, quick, **extra):
    """Rows of fn(*inputs) for passes fwd, bwd (on a retained graph) and fwd+bwd, gradients w.r.t. grad_inputs; the
    backward counts bwd_factor x the forward's flops; peak memory for fwd and fwd+bwd."""
    fwd = lambda: fn(*inputs)
    y = fwd()
    passes = (("fwd", fwd, flops),
              ("bwd", lambda: torch.autograd.grad(y, grad_inputs, dy, retain_graph=True), bwd_factor * flops),
              ("fwd+bwd", lambda: torch.autograd.grad(fwd(), grad_inputs, dy), (1 + bwd_factor) * flops))
    return [timed_row(suite, case, provider, p, f, quick, peak=p != "bwd", flops=fl, **extra) for p, f, fl in passes]

def case_key(r):
    return json.dumps(r["case"], sort_keys=True), r["pass"]

def add_ratios(rows, baseline, key="ms", name="ratio"):
    """r[name] = the baseline's r[key] / this row's for the same case and pass (> 1: faster than the baseline)."""
    base = {case_key(r): r.get(key) for r in rows if r["provider"] == baseline}
    for r in rows:
        b = base.get(case_key(r))
        r[name] = b / r[key] if b and r.get(key) else None
    return rows

def measure_peaks(quick=False):
    """The device's reachable peaks measured in this run: a bf16 matmul (TFLOP/s) and a device copy (GB/s)."""
    gpu = on_gpu()
    n, dtype, dev = ((4096 if quick else 8192), torch.bfloat16, "cuda") if gpu else (512, torch.float32, "cpu")
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    mm = bench(lambda: a @ b, quick=quick)["ms"]
    src, dst = (torch.empty(1 << 28 if gpu else 1 << 22, device=dev, dtype=torch.float32) for _ in range(2))
    cp = bench(lambda: dst.copy_(src), quick=quick)["ms"]
    return {"matmul_tflops": 2 * n**3 / (mm * 1e-3) / 1e12, "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_gbps": 2 * src.numel() * 4 / (cp * 1e-3) / 1e9}

def device_info():
    """model.common.versions() (device, versions, commit, date), plus a note on CPU that the timings are smoke runs."""
    info = versions()
    if info["kind"] == "cpu":
        info["note"] = "CPU smoke run: tiny shapes, not GPU performance"
    return info

def header(suite, extra=""):
    """Print the run's device, versions and commit; -> device_info()."""
    info = device_info()
    print(f"[{suite}] {info['device']}  torch {info['torch']}  triton {info['triton']}  commit {info['git_commit']}"
          + extra, flush=True)
    return info

def fmt_case(case):
    return ",".join(f"{k}={v}" for k, v in case.items())

def print_table(rows):
    cols = ["case", "provider", "pass", "ms", "tflops", "gbps", "ratio", "peak_mb"]
    fmt = lambda v: ("-" if v is None else f"{v:.3g}" if isinstance(v, float) else
                     fmt_case(v) if isinstance(v, dict) else str(v))
    table = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(map(len, col)) for col in zip(cols, *table)]
    for t in [cols] + table:
        print("  ".join(x.ljust(w) for x, w in zip(t, widths)))

def plot(suite, rows, path):
    """One bar group per case: the speed ratio of every provider to the baseline (1.0 = baseline)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure to close
    except ImportError:
        return
    rows = [r for r in rows if r.get("ratio") is not None]
    if not rows:
        return
    label = lambda r: f"{fmt_case(r['case'])} {r['pass']}"
    labels, providers = sorted({label(r) for r in rows}, key=str), sorted({r["provider"] for r in rows})
    fig = Figure(figsize=(max(6, 0.5 * len(labels) * len(providers)), 4), layout="tight")
    ax = fig.subplots()
    w = 0.8 / len(providers)
    for i, p in enumerate(providers):
        vals = {label(r): r["ratio"] for r in rows if r["provider"] == p}
        ax.bar([j + i * w for j in range(len(labels))], [vals.get(x, 0) for x in labels], w, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="speed vs baseline (x)", title=suite)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)

def write_results(suite, rows, info, peaks=None, out_dir=None, png=True, quick=False):
    """Write <out_dir>/<suite>-<device>-<date>[-quick].json (+ .png) and print its path; -> the JSON path. Quick runs
    get their own name, so a smoke run never replaces a full one; a rerun on the same day replaces the file whole."""
    out_dir = out_dir or os.environ.get("OUT") or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", info["device"] if info["kind"] == "cuda" else "cpu").strip("-").lower()
    stem = os.path.join(out_dir, f"{suite}-{device}-{info['date'][:10]}" + ("-quick" if quick else ""))
    with open(stem + ".json.tmp", "w") as f:
        json.dump({"suite": suite, "quick": quick, "info": info, "peaks": peaks, "rows": rows}, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    if png:
        plot(suite, rows, stem + ".png")
    print(f"[{suite}] wrote {stem}.json")
    return stem + ".json"

def parser(description, quick="fewer shapes and repetitions (CPU always runs tiny ones)"):
    """The flags every suite takes: --quick, --out DIR, --no-png."""
    ap = ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--out", type=writable_dir, help="output folder (default $OUT, else bench/results)")
    ap.add_argument("--no-png", action="store_true", help="skip the plot")
    return ap

def main(suite, run, argv=None):
    """`python -m bench.<suite> [--quick] [--out DIR] [--no-png]`."""
    args = parser(f"benchmark suite: {suite}").parse_args(argv)
    return run_suite(suite, run, quick=args.quick, out_dir=args.out, png=not args.no_png)

def run_suite(suite, run, quick=False, out_dir=None, png=True):
    info = header(suite)
    quick = quick or not on_gpu()
    peaks = measure_peaks(quick=quick)
    rows = run(quick)
    for r in rows:
        if r.get("tflops") and on_gpu():
            r["pct_peak_matmul"] = 100 * r["tflops"] / peaks["matmul_tflops"]
        if r.get("gbps"):
            r["pct_peak_copy"] = 100 * r["gbps"] / peaks["copy_gbps"]
    print_table(rows)
    return write_results(suite, rows, info, peaks, out_dir, png, quick)
