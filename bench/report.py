"""All JSON results -> one markdown table (what the README shows): per (suite, device) the newest full run (a quick
smoke run only where no full run exists). `python -m bench.report [--results bench/results] [--out FILE.md]`"""
import glob
import json
import os

from bench.harness import RESULTS_DIR, fmt_case
from model.common import ArgumentParser

def load_newest(results_dir):
    newest, rank = {}, lambda d: (not d.get("quick", False), d["info"]["date"])
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        try:
            with open(path) as f:
                data = json.load(f)
            key = (data["suite"], data["info"]["device"])
        except (OSError, ValueError, KeyError):
            continue  # not a harness result file
        if key not in newest or rank(data) > rank(newest[key]):
            newest[key] = data
    return [newest[k] for k in sorted(newest)]

def to_markdown(results):
    lines, f = [], lambda v, spec=".3g": "-" if v is None else format(v, spec)
    for data in results:
        info = data["info"]
        lines += [f"### {data['suite']} — {info['device']}" + (" (quick)" if data.get("quick") else ""), "",
                  f"torch {info.get('torch')}, triton {info.get('triton')}, CUDA {info.get('cuda')}, "
                  f"driver {info.get('driver')}, commit {info.get('git_commit')}, {info.get('date')}"
                  + (f" — {info['note']}" if info.get("note") else ""), "",
                  "| case | pass | provider | ms | TFLOP/s | GB/s | ratio |", "|---|---|---|---|---|---|---|"]
        for r in data["rows"]:
            lines.append(f"| {fmt_case(r['case'])} | {r['pass']} | {r['provider']} | {f(r.get('ms'))} | "
                         f"{f(r.get('tflops'))} | {f(r.get('gbps'))} | {f(r.get('ratio'), '.2f')} |")
        lines.append("")
    return "\n".join(lines)

def main(argv=None):
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=RESULTS_DIR)
    ap.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    args = ap.parse_args(argv)
    md = to_markdown(load_newest(args.results))
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    else:
        print(md)

if __name__ == "__main__":
    main()
