"""Evaluation scoring on a hand-built bigram "model" and a character tokenizer, so every number is predictable:
bits per byte, CORE-style multiple choice / LM scoring, categorical chat scoring, generative scoring, ChatCORE."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from train import evaluate as ev
from train.tasks import get_task
from stand_ins import ByteTokenizer

torch.manual_seed(0)


class CharTok(ByteTokenizer):
    """Byte-level tokenizer with a minimal chat template."""

    def render_for_completion(self, conv):
        user = conv["messages"][0]["content"]
        return [256, 257] + self.encode(user) + [258, 259]


class Bigram(nn.Module):
    """logits[t] = table[idx[t]]: the next token depends only on the current one."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.table[idx]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss


def test_centred_and_chatcore():
    assert ev.centred(0.25, 0.25) == 0 and ev.centred(1.0, 0.25) == 1 and ev.centred(0.5, 0.0) == 0.5
    assert ev.chatcore({"a": 0.625, "b": 0.1}, {"a": 0.25, "b": 0.0}) == pytest.approx((0.5 + 0.1) / 2)


def test_bits_per_byte_hand_computed():
    tok = CharTok()
    tb = ev.token_bytes(tok)
    assert tb[65] == 1 and tb[256] == 0  # 'A' is one byte; special tokens count zero
    assert tb[200] == 3  # as nanochat: bytes of the decoded text (a lone byte >= 128 decodes to U+FFFD)
    V = tok.vocab_size
    model = Bigram(torch.zeros(V, V))  # uniform: loss = ln V per token
    x = torch.tensor([[256, 65, 66, 67]])
    y = torch.tensor([[65, 66, 67, 256]])  # the special target counts 0 bytes and is skipped
    bpb = ev.evaluate_bpb(model, [(x, y)], torch.ones(V, dtype=torch.long).index_fill_(0, torch.arange(256, V), 0))
    assert bpb == pytest.approx(3 * math.log(V) / (math.log(2) * 3))
    y2 = torch.tensor([[65, 66, -1, -1]])
    bpb2 = ev.evaluate_bpb(model, [(x, y2)], torch.ones(V, dtype=torch.long) * 2)
    assert bpb2 == pytest.approx(2 * math.log(V) / (math.log(2) * 4))


def test_continuation_losses_and_exact_match():
    V = CharTok.vocab_size
    table = torch.zeros(V, V)
    table[ord("a"), ord("b")] = 5.0  # after 'a' the model strongly predicts 'b'
    table[ord("b"), ord("c")] = 5.0
    model = Bigram(table)
    a, b, c, d = (ord(ch) for ch in "abcd")
    losses, exact = ev.continuation_losses(model, [[a], [a], [a, b]], [[b, c], [d], [c]])
    assert exact == [True, False, True]
    lp_good = -F.log_softmax(table[a], -1)[b].item()
    assert losses[0] == pytest.approx((lp_good + -F.log_softmax(table[b], -1)[c].item()) / 2, rel=1e-5)
    assert losses[1] == pytest.approx(-F.log_softmax(table[a], -1)[d].item(), rel=1e-5)


def test_core_mc_picks_lowest_loss_choice():
    tok = CharTok()
    task = get_task("number_mc", split="test", n=12)
    V = tok.vocab_size
    # a model that loves the digit '9' after a space: picks any choice starting with 9, else essentially random
    table = torch.zeros(V, V)
    table[ord(" "), ord("9")] = 8.0
    acc = ev.core_task_score(Bigram(table), tok, task, "mc", num_shots=1, max_examples=12)
    # every example whose largest number starts with 9 and is the only 9x choice is solved
    solved_by_nine = sum(1 for i in range(12) if [c.startswith("9") for c in task[i]["choices"]].count(True) == 1
                         and task[i]["choices"][task[i]["answer"]].startswith("9"))
    assert acc >= solved_by_nine / 12


def test_categorical_accuracy_uses_letter_logits():
    tok = CharTok()
    task = get_task("number_mc", split="test", n=20)
    V = tok.vocab_size
    table = torch.zeros(V, V)
    table[259, ord("B")] = 3.0  # after <|assistant_start|> always prefers "B"
    table[259, ord("Z")] = 9.0  # not a choice letter: must be ignored
    acc = ev.categorical_accuracy(Bigram(table), tok, task, batch_size=3)
    expect = sum(task[i]["messages"][1]["content"] == "B" for i in range(20)) / 20
    assert acc == pytest.approx(expect)


class FakeEngine:
    def __init__(self, tok, answer_fn):
        self.tok, self.answer_fn, self.calls = tok, answer_fn, 0

    def generate_batch(self, prompt, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        self.calls += 1
        text = self.answer_fn(self.tok.decode(prompt))
        seqs = [prompt + self.tok.encode(text) + [260]] * num_samples
        return seqs, [[0] * len(prompt) + [1] * (len(text) + 1)] * num_samples

    def generate_many(self, prompts, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        return [self.generate_batch(p, num_samples, max_tokens, temperature, top_k, seed + i)
                for i, p in enumerate(prompts)]


def test_generative_accuracy_and_bad_reward():
    tok = CharTok()
    task = get_task("arithmetic", split="test", n=10)
    answers = {task[i]["messages"][0]["content"]: task[i]["messages"][1]["content"][-1]["text"] for i in range(10)}
    right = FakeEngine(tok, lambda p: next(a for q, a in answers.items() if q in p))
    assert ev.generative_accuracy(right, tok, task) == 1.0
    wrong = FakeEngine(tok, lambda p: "#### -1")
    assert ev.generative_accuracy(wrong, tok, task) == 0.0

    class Boom:
        name, eval_type = "boom", "generative"

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return task[0]

        def evaluate(self, conv, text):
            raise KeyError("no answer")

    from train.tasks import TaskError
    with pytest.raises(TaskError, match=r"\[sft\] scoring function of task boom raised"):
        ev.generative_accuracy(wrong, tok, Boom(), stage="sft")
