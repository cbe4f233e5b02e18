"""Conversation loaders (SFT masks, padding never contributes, packed mid rows, exact resume) and every
post-training stage (mid, SFT, RL) for 2 steps under `torchrun --nproc_per_node=2` (gloo), then resumed to 3."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from model.common import UserError
from model.gpt import GPT, GPTConfig
from model.tokenizer import Tokenizer
from train import sft
from train.data import PackedLoader, SFTLoader
from train.tasks import TaskError, build_mixture, get_task
from train.tasks.common import Task, TaskMixture

torch.manual_seed(0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def tiny_tokenizer():
    texts = [c["messages"][0]["content"] for c in get_task("arithmetic", n=40)] + ["Spell the word letter by"] * 5
    return Tokenizer.train(texts, vocab_size=300)

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()

def test_sft_batch_masks_and_padding(tok):
    task = build_mixture("arithmetic,identity,spelling", n=6)
    B, T = 3, 96
    loader = SFTLoader(task, tok, B, T)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (B, T)
    for row in range(B):
        ids, mask = tok.render_conversation(task[row], max_tokens=T + 1)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        expect = [t if m == 1 else -1 for t, m in zip(ids[1:], mask[1:])]
        assert y[row, :n].tolist() == expect  # loss exactly on the mask == 1 targets
        assert (y[row, n:] == -1).all()       # padding is never a target
        assert (x[row, n:] == tok.bos_token_id).all()
    # the tool output (mask 0) is never a target, the python call and <|assistant_end|> are
    out_start, py_start, end = (tok.encode_special(s) for s in ("<|output_start|>", "<|python_start|>",
                                                                  "<|assistant_end|>"))
    targets = set(y[y >= 0].tolist())
    assert out_start not in targets and end in targets

def test_padding_never_contributes_to_the_loss(tok):
    model = GPT(GPTConfig(sequence_len=96, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # zero-init lm_head would make every loss ln(V)
    x, y = SFTLoader(build_mixture("arithmetic,identity", n=4), tok, 2, 96).next_batch()
    loss = model(x, y)
    pad = y == -1
    # only inputs in the padding tail are scrambled: earlier inputs still condition later targets
    lengths = [(row >= 0).nonzero().max().item() + 1 for row in y]
    x3 = x.clone()
    for r, n in enumerate(lengths):
        x3[r, n:] = torch.randint(0, tok.vocab_size, (96 - n,))
    assert model(x3, y).item() == pytest.approx(loss.item(), abs=1e-6)
    per_tok = model(x, y, loss_reduction="none")
    assert (per_tok[pad] == 0).all()
    assert loss.item() == pytest.approx(per_tok[~pad].mean().item(), rel=1e-5)

def test_packed_loader_rows_and_exact_resume(tok):
    task = build_mixture("arithmetic,spelling", n=20)
    a = PackedLoader(task, tok, 2, 32)
    x, y = a.next_batch()
    assert (x[:, 1:] == y[:, :-1]).all() and (y >= 0).all()  # packed: every token is a target
    state = json.loads(json.dumps(a.state_dict()))           # JSON round trip, as in meta.json
    want = [a.next_batch() for _ in range(3)]
    b = PackedLoader(task, tok, 2, 32)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(want, [b.next_batch() for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    masked = PackedLoader(task, tok, 2, 256, mask_loss=True).next_batch()[1]
    assert (masked == -1).any() and (masked >= 0).any()
    # ranks see disjoint conversations
    r0, r1 = SFTLoader(task, tok, 1, 64, rank=0, world_size=2), SFTLoader(task, tok, 1, 64, rank=1, world_size=2)
    assert not torch.equal(r0.next_batch()[0], r1.next_batch()[0])

WORKER = textwrap.dedent('''
    import dataclasses, json, os, sys
    sys.path.insert(0, {root!r})
    import torch
    from model.gpt import GPTConfig
    from model.tokenizer import Tokenizer
    from model.checkpoint import save_checkpoint, step_dir
    from train.distributed import build_model, cleanup, init_distributed
    from train import mid, rl, sft
    info = init_distributed()  # every stage's run() reuses this one process group
    tok_dir = os.path.join(os.environ["TRITONCHAT_HOME"], "tokenizer")
    tok = Tokenizer.load(tok_dir)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    model = build_model(cfg, info)
    save_checkpoint(step_dir("base", "t", 1), 1, model, model.setup_optimizers(),
                    dict(config=dataclasses.asdict(cfg), stage="base", tokenizer_dir=tok_dir))
    common = ["--run", "t", "--source-run", "t", "--kernels", "eager", "--device-batch-size", "2", "--val-batches", "1"]
    out = {{}}
    for name, stage in (("mid", mid), ("sft", sft)):
        a = stage.run(common + ["--num-iterations", "2"])
        b = stage.run(common + ["--num-iterations", "3", "--resume"])
        out[name] = [a["steps_this_run"], b["steps_this_run"], b["final_train_loss"]]
    rl_args = ["--run", "t", "--source-run", "t", "--kernels", "eager", "--prompts-per-step", "2", "--num-samples", "2",
               "--max-new-tokens", "6", "--eval-examples", "2", "--eval-k", "2", "--device-batch-size", "4"]
    a = rl.run(rl_args + ["--num-iterations", "2"])
    b = rl.run(rl_args + ["--num-iterations", "3", "--resume"])
    out["rl"] = [a["steps_this_run"], b["steps_this_run"], b["final_reward"]]
    if info.rank == 0:
        print("RESULT " + json.dumps(out))
    cleanup()
''')

def test_stages_under_torchrun_two_ranks_and_resume(tmp_path, tok):
    home = tmp_path / "home"
    tok.save(str(home / "tokenizer"))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=ROOT))
    env = dict(os.environ, TRITONCHAT_HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", str(worker)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and both workers
        stdout, stderr = p.communicate()
        pytest.fail("timed out:\n" + stdout[-3000:] + stderr[-3000:])
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    out = json.loads(stdout.split("RESULT ")[1].splitlines()[0])
    for stage in ("mid", "sft", "rl"):
        assert out[stage][:2] == [2, 1], (stage, out)  # 2 steps, then resumed for the third only
        assert os.path.isdir(home / "checkpoints" / stage / "t" / "step_000003")
        assert "resumed from" in stdout
    meta = json.load(open(home / "checkpoints" / "rl" / "t" / "step_000003" / "meta.json"))
    assert meta["world_size"] == 2 and meta["stage"] == "rl" and meta["step"] == 3

def test_missing_previous_checkpoint_names_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONCHAT_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"\[sft\] no mid checkpoint found in .*checkpoints/mid"):
        sft.run(["--kernels", "eager", "--num-iterations", "1"])

# ------------------------------------------------------------------------------------------------ loops that skip
def within(seconds, fn):
    """fn() -> its result; a TimeoutError after `seconds` (an endless loop fails the test instead of hanging it)."""
    def alarm(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)

class Conversations(Task):
    name = "long_questions"

    def __init__(self, convs):
        super().__init__()
        self.convs = convs

    def num_examples(self):
        return len(self.convs)

    def get_example(self, index):
        return self.convs[index]

LONG = {"messages": [{"role": "user", "content": "what is two plus two? " * 40},
                     {"role": "assistant", "content": "four"}]}
SHORT = {"messages": [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]}
QUESTION = {"messages": [{"role": "user", "content": "two plus two?"}]}

def test_sft_loader_ends_when_a_whole_pass_is_skipped(tok):
    """Every assistant token beyond sequence_len + 1: a TaskError naming the task, not an endless loop."""
    with pytest.raises(TaskError, match=r"SFTLoader: none of the 3 conversations of long_questions that rank 0 of 1 "
                                        r"reads has an assistant token within its first 33 tokens \(sequence_len 32\)"):
        within(20, lambda: SFTLoader(Conversations([LONG] * 3), tok, 2, 32).next_batch())
    x, y = within(20, lambda: SFTLoader(Conversations([LONG, SHORT, LONG]), tok, 2, 32).next_batch())
    assert (y >= 0).any(1).all()  # the usable conversation fills every row
    four = Conversations([LONG, SHORT, LONG, SHORT])  # rank 0 of 2 reads 0 and 2 only, rank 1 reads 1 and 3
    with pytest.raises(TaskError, match="none of the 2 conversations of long_questions that rank 0 of 2"):
        within(20, lambda: SFTLoader(four, tok, 1, 32, rank=0, world_size=2).next_batch())
    assert (within(20, lambda: SFTLoader(four, tok, 1, 32, rank=1, world_size=2).next_batch())[1] >= 0).any()
    mix = TaskMixture([Conversations([LONG]), build_mixture("identity", n=2).tasks[0]], weights=[1, 0])
    with pytest.raises(TaskError, match="of mixture of long_questions, identity"):
        within(20, lambda: SFTLoader(mix, tok, 1, 32).next_batch())

def test_packed_loader_with_mask_loss_ends_without_targets(tok):
    """mask_loss over conversations with no assistant turn would give all -1 targets (a NaN loss): TaskError."""
    with pytest.raises(TaskError, match="PackedLoader: none of the 2 conversations of long_questions .* a token to "
                                        "learn"):
        within(20, lambda: PackedLoader(Conversations([QUESTION] * 2), tok, 2, 32, mask_loss=True).next_batch())
    x, y = PackedLoader(Conversations([QUESTION] * 2), tok, 2, 32).next_batch()  # without mask_loss: all targets
    assert (y >= 0).all()

def test_empty_mixture_is_a_user_error(tok):
    with pytest.raises(UserError, match="mixture of arithmetic has no examples"):
        SFTLoader(build_mixture("arithmetic:0"), tok, 2, 32)

def test_conversation_loaders_resume_on_another_number_of_ranks(tok):
    """Saved by 2 ranks, resumed on 1 or 3: the ranks continue from the first conversation a saved rank had not
    delivered (for packed rows: the oldest conversation still in its buffer), so nothing is skipped."""
    task = build_mixture("arithmetic,spelling", n=20)
    for cls in (SFTLoader, PackedLoader):
        old = [cls(task, tok, 2, 64, rank=r, world_size=2) for r in range(2)]
        for r, loader in enumerate(old):
            for _ in range(2 + r):
                loader.next_batch()
        states = [json.loads(json.dumps(loader.state_dict())) for loader in old]
        first = []  # per saved rank: position of its first undelivered conversation
        for loader, st in zip(old, states):
            pos = st["epoch"] * len(task) + st["index"]
            if cls is PackedLoader and st["buf_lens"]:
                pos -= 2 * len(st["buf_lens"])
                ids, _ = tok.render_conversation(task[pos % len(task)], max_tokens=65)
                assert st["buf_ids"][:st["buf_lens"][0]] == ids[len(ids) - st["buf_lens"][0]:]  # its unread tail
            first.append(pos)
        for world in (1, 3):
            for r in range(world):
                new = cls(task, tok, 2, 64, rank=r, world_size=world)
                assert new.load_state_dicts(states) is False
                assert new.epoch * len(task) + new.index == min(first) + r
        same = cls(task, tok, 2, 64, rank=0, world_size=2)
        assert same.load_state_dicts(states) is True
        assert all(torch.equal(a, b) for a, b in zip(same.next_batch(), old[0].next_batch()))

@pytest.mark.parametrize("flag", ["--val-batches", "--device-batch-size"])
def test_zero_batches_are_refused_before_training(tmp_path, monkeypatch, flag):
    """--val-batches 0 would divide by zero at the first evaluation, --device-batch-size 0 in the loop: UserError."""
    monkeypatch.setenv("TRITONCHAT_HOME", str(tmp_path))
    with pytest.raises(UserError, match=rf"\[sft\] {flag} must be an integer >= 1, got 0"):
        sft.run(["--kernels", "eager", flag, "0"])

def test_mid_d20_batch_follows_the_kernels_as_base():
    """mid's d20 preset takes base's sequences per GPU by kernel mode (32 fused, 16 eager) unless given."""
    from train import base, mid
    from train.stage import D20_DEVICE_BATCH
    batch = lambda mod, *a: mod.parse_args(["--preset", "d20", *a]).device_batch_size
    for kernels in ("fused", "eager"):
        assert batch(mid, "--kernels", kernels) == batch(base, "--kernels", kernels) == D20_DEVICE_BATCH[kernels]
    assert batch(mid) == batch(base) and batch(mid, "--device-batch-size", "8") == 8
    assert mid.parse_args(["--preset", "tiny"]).device_batch_size == 8
