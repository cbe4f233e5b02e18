"""Run the kernel benchmark suites side by side: `python -m bench.kernels --suite all|<name>[,<name>] [--quick]`.

Each suite is bench/<name>.py with run(quick) -> rows (see bench/harness.py), built with the helpers below. On a CUDA
GPU the suites sweep the shapes their issues name; on CPU they run tiny smoke shapes so the code path stays tested,
and the JSON says "cpu".
"""
import argparse
import importlib
import sys

import torch

from bench import harness

SUITES = ["attention", "relu2_mlp", "newton_schulz", "paged_decode", "linear_cross_entropy", "tokenizer"]


def timed_row(suite, case, provider, pass_, fn, quick, peak=False, rep=None, **extra):
    """harness.bench(fn) as a harness.row: median ms, the p20/p80 spread, peak memory when `peak`; extra: flops=,
    bytes_= or more row fields."""
    t = harness.bench(fn, quick=quick, rep=rep)
    peak_mb = harness.peak_memory_mb(fn) if peak else None
    return harness.row(suite, case, provider, pass_, t["ms"], peak_mb=peak_mb, ms_p20=t["ms_p20"], ms_p80=t["ms_p80"],
                       **extra)


def fwd_bwd_rows(suite, case, provider, fn, inputs, grad_inputs, dy, flops, bwd_factor, quick, **extra):
    """Rows of fn(*inputs) for passes fwd, bwd (on a retained graph) and fwd+bwd, gradients w.r.t. grad_inputs; the
    backward counts bwd_factor x the forward's flops; peak memory for fwd and fwd+bwd."""
    fwd = lambda: fn(*inputs)
    y = fwd()
    passes = (("fwd", fwd, flops),
              ("bwd", lambda: torch.autograd.grad(y, grad_inputs, dy, retain_graph=True), bwd_factor * flops),
              ("fwd+bwd", lambda: torch.autograd.grad(fwd(), grad_inputs, dy), (1 + bwd_factor) * flops))
    return [timed_row(suite, case, provider, p, f, quick, peak=p != "bwd", flops=fl, **extra) for p, f, fl in passes]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="all", help=f"all, or a comma list of: {', '.join(SUITES)}")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results)")
    ap.add_argument("--no-png", action="store_true")
    args = ap.parse_args(argv)
    names = SUITES if args.suite == "all" else [s.strip() for s in args.suite.split(",")]
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        sys.exit(f"bench.kernels: unknown suite(s) {', '.join(unknown)}; choose from all, {', '.join(SUITES)}")
    paths, failed = [], []
    for name in names:
        try:
            mod = importlib.import_module(f"bench.{name}")
            paths.append(harness.run_suite(name, mod.run, quick=args.quick, out_dir=args.out, png=not args.no_png))
        except Exception as e:  # one broken suite must not hide the others' numbers
            print(f"[{name}] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(name)
    print("results:", *paths, sep="\n  ")
    if failed:
        sys.exit(f"bench.kernels: suite(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
