"""The whole pipeline in one command: tokenizer -> base -> mid -> SFT -> RL -> evals -> report card.

    python -m train.speedrun --preset tiny              # `make run`: CPU, embedded corpus and tasks, a few minutes
    torchrun --standalone --nproc_per_node=8 -m train.speedrun -- --preset d20  # `make speedrun`: nanochat's d20
    python -m train.speedrun --preset tiny --num-iterations 2 --run ci          # smoke test: 2 steps per stage

Every stage runs in this process (every rank under torchrun) on one process group, through `train.<stage>.run(argv)`
with the preset's flags, the shared ones (--kernels, --compile, ...), then `--<stage>-args "..."`. Resumable: run R's
state is $TRITONCHAT_HOME/reports/speedrun_R.json; finished stages are skipped, an interrupted one continues from its
newest checkpoint, `--fresh` starts over. At the end: the report card ($TRITONCHAT_HOME/reports/report.md) and one
chat answer of the final model. Benchmarks (train/evaluate.py): the base model's "CORE" on the DCLM eval bundle when
one is found ($TRITONCHAT_HOME/eval_bundle or nanochat's), else "CORE-10" on ten of CORE's raw datasets
(`--eval-data DIR`, or the embedded sample: always for tiny); the chat models on ARC-Easy/Challenge, MMLU, GSM8K and
HumanEval (tiny: the embedded sample; d20: the full test sets).
"""
import argparse
import json
import os
import shlex
import shutil
import sys
import time

import torch

import kernels
from model.checkpoint import checkpoint_dir, find_last_checkpoint, load_model
from model.common import ArgumentParser, UserError, barrier, home_dir, is_rank0, print0, versions
from model.engine import Engine
from model.tokenizer import Tokenizer
from train import base, mid, rl, sft
from train.distributed import cleanup, init_distributed
from train.evaluate import REAL_CHAT_TASKS, TASK_TITLES, describe_core, evaluate_checkpoint
from train.loop import add_compile_args
from train.tasks import TaskError
from train.tasks.realdata import SAMPLE_DIR
from train.tokenizer import train_tokenizer

STAGES = ("tokenizer", "base", "mid", "sft", "rl", "eval")
STAGE_MODULES = {"base": base, "mid": mid, "sft": sft, "rl": rl}  # the training stages

# Flags of every stage per preset (each stage's own --preset supplies the rest).
PRESETS = {
    "tiny": {
        "tokenizer": dict(vocab_size=2048, max_chars=2_000_000),
        # ~3.5 min on 2 idle cores: the SFT model solves ~40 % of the arithmetic tool-use problems (RL needs reward)
        "base": "--preset tiny --num-iterations 300 --total-batch-size 8192 --eval-every 0 --eval-tokens 16384",
        "mid": "--preset tiny --num-iterations 200",
        "sft": "--preset tiny --num-iterations 150",
        "rl": "--preset tiny --num-iterations 30",
        # Real benchmarks on the embedded sample, ~20 s on 2 idle cores: CORE-10 with 32 items a task, prompts cropped
        # to the 256 tokens the model was trained on; 32 examples of each real chat task.
        "eval": dict(max_examples=24, max_tokens=48, val_batches=4, core="sample", core_max_per_task=32,
                     core_max_seq_len="trained", real_chat=",".join(REAL_CHAT_TASKS), real_data=SAMPLE_DIR,
                     real_examples=32),
    },
    "d20": {
        "tokenizer": dict(vocab_size=65536, max_chars=None),  # base trains it on FineWeb-Edu when missing (None)
        "base": "--preset d20 --save-every 1000",
        "mid": "--preset d20 --save-every 500",
        "sft": "--preset d20 --save-every 500",
        "rl": "--preset d20 --save-every 60",
        # CORE on the eval bundle when present (all items, nanochat's prompts uncropped), else CORE-10
        "eval": dict(max_examples=None, max_tokens=512, val_batches=20, core="auto", core_max_per_task=None,
                     core_max_seq_len=None, chat_tasks="arc_easy,arc_challenge,mmlu,gsm8k,humaneval,spelling,identity",
                     base_tasks="arc_easy,arc_challenge,mmlu,number_mc,arithmetic"),
    },
}
CHAT_PROMPT = "Tom has 12 apples and buys 3 packs of 4 apples each. How many apples does Tom have now?"

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="tiny")
    p.add_argument("--run", default="speedrun", help="run name of every stage's checkpoints")
    kernels.add_argument(p)
    add_compile_args(p)
    p.add_argument("--num-iterations", type=int, help="override the steps of every training stage")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--fresh", action="store_true", help="forget finished stages and delete this run's checkpoints")
    p.add_argument("--data-url", help="base URL of the task datasets ($TRITONCHAT_DATA_URL)")
    p.add_argument("--eval-examples", type=int, help="examples per evaluated task")
    p.add_argument("--eval-max-tokens", type=int, help="generation budget in the chat evals")
    p.add_argument("--eval-data", help="local real eval data: an eval bundle (-> CORE) or raw CORE files (-> CORE-10), "
                   "here or in core/; ARC/MMLU/GSM8K/HumanEval files, here or in chat/")
    p.add_argument("--core-max-per-task", type=int, help="items per CORE task (default: the preset's)")
    p.add_argument("--real-examples", type=int, help="examples per real chat task (tiny's sample)")
    for s in STAGE_MODULES:
        p.add_argument(f"--{s}-args", default="", help=f"extra flags for train.{s} (quoted)")
    args = p.parse_args(argv)
    if unknown := set(args.stages.split(",")) - set(STAGES):
        p.error(f"unknown stage(s) {', '.join(sorted(unknown))}: choose from {', '.join(STAGES)}")
    return args

def state_path(run):
    return os.path.join(home_dir(), "reports", f"speedrun_{run}.json")

def stage_argv(args, stage):
    """The flags train.<stage> runs with: the preset's, the shared ones, then --<stage>-args."""
    argv = shlex.split(PRESETS[args.preset][stage]) + ["--run", args.run, "--kernels", args.kernels, "--compile",
                                                       args.compile, "--compile-backend", args.compile_backend]
    if stage != "base":
        argv += ["--source-run", args.run]
        if args.data_url:
            argv += ["--data-url", args.data_url]
    if args.num_iterations is not None:
        argv += ["--num-iterations", str(args.num_iterations)]
    if find_last_checkpoint(stage, args.run) is not None:  # interrupted earlier: continue where it stopped
        argv += ["--resume"]
    return argv + shlex.split(getattr(args, f"{stage}_args"))

def run_tokenizer(args):
    tok_dir = os.path.join(home_dir(), "tokenizer")
    cfg = PRESETS[args.preset]["tokenizer"]
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        tok = Tokenizer.load(tok_dir)
        if tok.vocab_size != cfg["vocab_size"]:
            print0(f"warning: reusing {tok_dir} with vocab {tok.vocab_size} (preset {args.preset} wants "
                   f"{cfg['vocab_size']}); point $TRITONCHAT_HOME elsewhere for a clean run")
        return {"vocab_size": tok.vocab_size, "dir": tok_dir, "note": "existing tokenizer reused"}
    if cfg["max_chars"] is None:
        return {"note": "trained by train.base on its corpus"}
    stats = train_tokenizer(cfg["vocab_size"], cfg["max_chars"], out_dir=tok_dir)[1] if is_rank0() else {}
    barrier()
    return stats

def eval_config(args):
    """The preset's eval settings with the command line's overrides. --eval-data feeds the d20 run's CORE and chat
    evals; the tiny run's real rows stay on the embedded sample."""
    cfg = dict(PRESETS[args.preset]["eval"])
    for key, value in (("max_examples", args.eval_examples), ("max_tokens", args.eval_max_tokens),
                       ("core_max_per_task", args.core_max_per_task), ("real_examples", args.real_examples)):
        if value is not None:
            cfg[key] = value
    if args.eval_data and cfg.get("core") != "sample":
        cfg["core"], cfg["chat_data"] = args.eval_data, args.eval_data
    return cfg

def run_evals(args):
    cfg, device = eval_config(args), init_distributed().device
    split = lambda key: cfg[key].split(",") if cfg.get(key) else None  # None: embedded + cached real tasks
    out = {"base": evaluate_checkpoint(
        "base", "base", args.run, tasks=split("base_tasks"), device=device, max_examples=cfg["max_examples"],
        val_batches=cfg["val_batches"], stage="eval base", core=cfg.get("core"),
        max_per_task=cfg.get("core_max_per_task"), core_max_seq_len=cfg.get("core_max_seq_len"))}
    for src in ("sft", "rl"):
        chat = dict(max_tokens=cfg["max_tokens"], device=device)
        out[src] = evaluate_checkpoint("chat", src, args.run, tasks=split("chat_tasks"), stage=f"eval {src}",
                                       max_examples=cfg["max_examples"], data_dir=cfg.get("chat_data"), **chat)
        if cfg.get("real_chat"):
            out[f"{src}_real"] = evaluate_checkpoint("chat", src, args.run, tasks=split("real_chat"), **chat,
                                                     max_examples=cfg["real_examples"], stage=f"eval {src} real",
                                                     data_dir=cfg["real_data"])
    return out

def _fmt(v, nd=4):
    return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)

def _stage_row(name, rec):
    s, t = rec.get("summary") or {}, rec.get("wall_s")
    if name == "rl":
        loss = f"reward {_fmt(s.get('first_reward'), 3)} -> {_fmt(s.get('final_reward'), 3)}"
    else:
        loss = "-" if s.get("first_train_loss") is None else \
            f"{_fmt(s.get('first_train_loss'), 3)} -> {_fmt(s.get('final_train_loss'), 3)}"
    if name == "eval":
        metrics = ", ".join(f"ChatCORE {src} {_fmt(s.get(src, {}).get('chatcore'))}" for src in ("sft", "rl"))
        metrics += f", CORE-style base {_fmt(s.get('base', {}).get('core'))}"
    elif name == "tokenizer":
        metrics = ", ".join(f"{k} {v}" for k, v in s.items() if k in ("vocab_size", "val_bytes_per_token", "note"))
    else:
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in (s.get("val") or {}).items() if isinstance(v, (int, float)))
    tokens = f"{int(s['tokens']):,}" if s.get("tokens") else "-"
    return f"| {name} | {_fmt(t, 1)} s | {s.get('steps', '-')} | {tokens} | {loss} | {metrics or '-'} |"

def report_card(state, args, total_s):
    v = versions()
    gpu = f"GPU: {v['gpus']} x {v['device']}" if v["kind"] == "cuda" else "no GPU"
    lines = ["# tritonchat report card", "",
             f"preset **{args.preset}** · run `{state['run']}` · kernels **{kernels.get_mode()}** · "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} · git {v['git_commit'] or 'unknown'}", "",
             "## Hardware and versions", "", f"- CPU: {v['cpu']} ({v['cpu_cores']} cores); {gpu}",
             f"- python {v['python']}, torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda'] or 'none'}", "",
             "## Stages", "", "| stage | time | steps | tokens | loss | metrics |", "|---|---|---|---|---|---|"]
    lines += [_stage_row(name, state["stages"][name]) for name in STAGES if name in state["stages"]]
    ev = (state["stages"].get("eval") or {}).get("summary")
    if ev:
        base, cfg = ev.get("base", {}), PRESETS[args.preset]["eval"]
        lines += ["", "## Base model", "", f"- val bpb: {_fmt(base.get('val_bpb'))} (first {cfg['val_batches']} "
                  "batches of 4 rows of the held-out text; the base row above used its own eval length)",
                  f"- CORE-style (centred mean): {_fmt(base.get('core'))}"]
        lines += [f"  - {k[5:]}: accuracy {_fmt(val)}" for k, val in base.items() if k.startswith("core_")]
        if core := base.get("dclm_core"):  # which CORE ran (name, data, tasks), its score and a per-task table
            lines += [f"- {core['name']} (mean centred accuracy, 0 = chance): {_fmt(core['score'])}",
                      f"  - {describe_core(core)} ({core['seconds']:.1f} s)",
                      "", "| CORE task | shots | accuracy | chance | centred | items |", "|---|---|---|---|---|---|"]
            lines += [f"| {name} | {t['num_fewshot']} | {_fmt(t['accuracy'])} | {_fmt(t['baseline'], 2)} | "
                      f"{t['centered']:+.4f} | {t['n']} |" for name, t in core["tasks"].items()]
        sft, rl = ev.get("sft", {}), ev.get("rl", {})
        tasks = [k for k, v in sft.items() if k not in ("chatcore", "eval_seconds") and isinstance(v, (int, float))]
        lines += ["", "## Chat model", "", "| task | SFT | RL |", "|---|---|---|"]
        lines += [f"| {t} | {_fmt(sft.get(t))} | {_fmt(rl.get(t))} |" for t in tasks]
        lines.append(f"| **ChatCORE** | {_fmt(sft.get('chatcore'))} | {_fmt(rl.get('chatcore'))} |")
        sft, rl = ev.get("sft_real") or {}, ev.get("rl_real") or {}
        if sft or rl:  # the real chat benchmarks on the embedded sample, each with its chance
            det = (sft or rl).get("details", {})
            n = max((d["n"] for d in det.values()), default=0)
            lines += ["", f"## Real benchmarks (embedded sample: the first {n} of each task's seeded rows)", "",
                      "Chance is the score of guessing (a letter for ARC and MMLU; nothing right for GSM8K and "
                      f"HumanEval); near-chance numbers are the honest result for a tiny CPU model, and with {n} "
                      f"examples one standard error is up to {50 / max(n, 1) ** 0.5:.0f} points. Generation budget "
                      f"{cfg.get('max_tokens')} tokens; GSM8K with the python tool live, HumanEval's tests in the "
                      "sandbox.", "", "| task | chance | SFT | RL | items |", "|---|---|---|---|---|"]
            lines += [f"| {TASK_TITLES.get(k, k)} | {d['chance']:.2f} | {_fmt(sft.get(k))} | {_fmt(rl.get(k))} | "
                      f"{d['n']} |" for k, d in det.items()]
            lines.append(f"| **ChatCORE ({len(det)} real tasks)** | 0 | {_fmt(sft.get('chatcore'))} | "
                         f"{_fmt(rl.get('chatcore'))} | |")
    stage_s = sum(r.get("wall_s") or 0 for r in state["stages"].values())
    lines += ["", f"Total stage time: {stage_s:.1f} s; this invocation: {total_s:.1f} s "
                  "(stages finished earlier are skipped)", ""]
    return "\n".join(lines)

def main(argv=None):
    args = parse_args(argv)
    kernels.set_mode(args.kernels)
    if args.data_url:
        os.environ["TRITONCHAT_DATA_URL"] = args.data_url
    t_start = time.time()
    init_distributed()
    state = {"run": args.run, "stages": {}}
    if args.fresh:
        if is_rank0():
            for s in STAGE_MODULES:
                shutil.rmtree(checkpoint_dir(s, args.run), ignore_errors=True)
        barrier()
    elif os.path.exists(state_path(args.run)):
        with open(state_path(args.run)) as f:
            state = json.load(f)
    state["preset"] = args.preset
    run_stages(args, state, args.stages.split(","))  # every stage on this one process group
    rank0 = is_rank0()
    cleanup()  # the rest is rank 0 alone: no collectives (load_model is single-process without a group)
    card = report_card(state, args, time.time() - t_start)
    if rank0:
        path = os.path.join(home_dir(), "reports", "report.md")
        with open(path, "w") as f:
            f.write(card)
        print("\n" + card)
        print(f"(report card written to {path})")
        if "sft" in state["stages"] or "rl" in state["stages"]:  # a greedy answer of the newest chat model, tools live
            src = "rl" if find_last_checkpoint("rl", args.run) else "sft"
            model, tok, _ = load_model(src, device="cuda" if torch.cuda.is_available() else "cpu", run=args.run)
            ids = tok.render_for_completion({"messages": [{"role": "user", "content": CHAT_PROMPT}]})
            seqs, _ = Engine(model, tok).generate_batch(ids, max_tokens=64, temperature=0.0)
            print(f"\nchat ({src} model) > {CHAT_PROMPT}\n{tok.decode(seqs[0][len(ids):])}\n", flush=True)
    return state

def run_stages(args, state, wanted):
    """Each wanted stage not finished yet, in order; the state file is updated after every stage."""
    for stage in [s for s in STAGES if s in wanted]:
        if state["stages"].get(stage, {}).get("done"):
            print0(f"=== {stage}: finished earlier, skipped (use --fresh to redo)")
            continue
        t0 = time.time()
        try:
            if stage == "tokenizer":
                summary = run_tokenizer(args)
            elif stage == "eval":
                summary = run_evals(args)
            else:  # in this process, on the process group every stage shares
                argv = stage_argv(args, stage)
                print0(f"\n=== {stage}: python -m train.{stage} {' '.join(argv)}")
                summary = STAGE_MODULES[stage].run(argv)
        except (UserError, TaskError) as e:
            print0(f"error: [speedrun: {stage}] {e}")
            sys.exit(2)
        except SystemExit as e:
            if e.code not in (0, None):
                print0(f"error: [speedrun: {stage}] stage exited with status {e.code}")
            raise
        if isinstance(summary, dict):  # keep the report light: no per-step histories
            summary = {k: v for k, v in summary.items() if k not in ("losses", "history")}
        state["stages"][stage] = {"done": True, "wall_s": time.time() - t0, "summary": summary}
        if is_rank0():
            path = state_path(state["run"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(state, f, indent=1, default=str)
            os.replace(path + ".tmp", path)
        print0(f"=== {stage}: done in {time.time() - t0:.1f} s")

if __name__ == "__main__":
    main()
