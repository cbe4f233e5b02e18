"""Run the kernel benchmark suites side by side: `python -m bench.kernels --suite all|<name>[,<name>] [--quick]`.
Each suite is bench/<name>.py with run(quick) -> rows (see bench/harness.py)."""
import importlib
import sys

from bench import harness

SUITES = ["attention", "relu2_mlp", "newton_schulz", "paged_decode", "linear_cross_entropy", "tokenizer"]

def main(argv=None):
    ap = harness.parser(__doc__.splitlines()[0], quick="fewer shapes and repetitions")
    ap.add_argument("--suite", default="all", help=f"all, or a comma list of: {', '.join(SUITES)}")
    args = ap.parse_args(argv)
    names = SUITES if args.suite == "all" else [s.strip() for s in args.suite.split(",")]
    if unknown := [s for s in names if s not in SUITES]:
        ap.error(f"unknown suite(s) {', '.join(unknown)}; choose from all, {', '.join(SUITES)}")
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
