"""GRPO: advantages and loss against hand-computed values on a fixed toy batch; a reward that prefers one token makes
a tiny model's mean reward rise."""
import math

import pytest
import torch

from model.tokenizer import SPECIAL_TOKENS
from train.rl import group_advantages, pass_at_k, policy_loss

torch.manual_seed(0)

def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # 2 prompts x 4 samples
    adv = group_advantages(r, 4)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    adv = group_advantages(r, 4, std_scale=True)  # std of [1,0,0,1] = 0.5 (population); all-equal group -> 0
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -1.0, 1.0, 0, 0, 0, 0]), atol=1e-5)
    r3 = torch.tensor([3.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(r3, 3), torch.tensor([2.0, -1.0, -1.0]))

# toy batch: 2 sequences x 3 positions; row 0 has 2 sampled tokens, row 1 has 3
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([0.5, -1.0])

def test_on_policy_loss_and_gradient():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, MASK, ADV)
    # ratio == 1: loss = -(0.5 * 2 + -1.0 * 3) / 5 = 2/5
    assert loss.item() == pytest.approx(0.4)
    loss.backward()
    # d loss / d logp = -A * mask / 5
    expect = torch.tensor([[-0.1, -0.1, 0.0], [0.2, 0.2, 0.2]])
    assert torch.allclose(logp.grad, expect)

def test_sequence_reduction_and_normalizer():
    loss, _ = policy_loss(LOGP, MASK, ADV, reduction="sequence")
    assert loss.item() == pytest.approx((-0.5 + 1.0) / 2)
    loss, _ = policy_loss(LOGP, MASK, ADV, normalizer=10)  # a micro-batch of a 10-token step
    assert loss.item() == pytest.approx(2 / 10)

def test_clipped_ratio_loss_hand_computed():
    old = LOGP - torch.tensor([[0.5, -0.5, 0.0], [0.05, 0.0, -0.5]])  # logp - old = the log ratios
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = policy_loss(logp, MASK, ADV, old_logp=old, clip_eps=0.2)
    r = torch.exp(torch.tensor([[0.5, -0.5, 0.0], [0.05, 0.0, -0.5]]))
    # row 0 (A=+0.5): min(r*A, clip(r)*A): r=1.6487 -> 1.2*0.5; r=0.6065 -> 0.6065*0.5
    # row 1 (A=-1):   r=1.0513 -> -1.0513 (in range); r=1 -> -1; r=0.6065 -> min(-0.6065, -0.8) = -0.8
    s = 1.2 * 0.5 + r[0, 1].item() * 0.5 - r[1, 0].item() - 1.0 - 0.8
    assert loss.item() == pytest.approx(-s / 5, rel=1e-5)
    assert stats["clip_frac"] == pytest.approx(3 / 5)  # |r-1| > 0.2 at (0,0), (0,1), (1,2)
    loss.backward()
    # clipped terms have zero gradient: (0,0) and (1,2); unclipped: -A * r / 5
    assert logp.grad[0, 0] == 0 and logp.grad[1, 2] == 0
    assert logp.grad[0, 1].item() == pytest.approx(-0.5 * r[0, 1].item() / 5, rel=1e-5)
    assert logp.grad[1, 0].item() == pytest.approx(1.0 * r[1, 0].item() / 5, rel=1e-5)

def test_kl_penalty_hand_computed():
    ref = LOGP + torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    loss, stats = policy_loss(LOGP, MASK, torch.zeros(2), ref_logp=ref, kl_coef=0.1)
    k3 = math.exp(1) - 1 - 1 + math.exp(-1) + 1 - 1  # (0,0): d=1, (1,1): d=-1, others 0
    assert loss.item() == pytest.approx(0.1 * k3 / 5, rel=1e-5)
    assert stats["kl"] == pytest.approx(k3 / 5, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(LOGP, MASK, ADV, kl_coef=0.1)

def test_pass_at_k():
    assert pass_at_k([0, 0, 0, 0], 1) == 0.0
    assert pass_at_k([1, 0, 0, 0], 1) == pytest.approx(0.25)
    assert pass_at_k([1, 0, 0, 0], 4) == 1.0
    assert pass_at_k([1, 1, 0, 0], 2) == pytest.approx(1 - 1 / 6)

# ------------------------------------------------------------------------------------------------ the pipeline
SPECIALS = SPECIAL_TOKENS

class SmallTok:
    """Six letters + the nine special tokens: a uniform policy samples 'a' often enough to learn from."""
    letters = "abcdef"
    vocab_size = 6 + len(SPECIALS)
    bos_token_id = 6

    def encode(self, text, prepend=None, append=None):
        return [self.letters.index(c) for c in text if c in self.letters]

    def encode_special(self, name):
        return 6 + SPECIALS.index(name)

    def decode(self, ids):
        return "".join(self.letters[i] if i < 6 else ("Error: x" if i == 99 else SPECIALS[i - 6]) for i in ids)

    def render_for_completion(self, conv):
        return [6, 7] + self.encode(conv["messages"][0]["content"]) + [8, 9]

class PreferA:
    name = "prefer_a"

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": "abc"[: i % 3 + 1]}]}

    def reward(self, conv, text):
        letters = [c for c in text if c in "abcdef"]
        return letters.count("a") / max(len(letters), 1)

def _args(**kw):
    import argparse
    d = dict(num_samples=8, std_scale=False, device_batch_size=16, clip_eps=None, inner_steps=1, kl_coef=0.0,
             reduction="token", grad_clip=1.0)
    d.update(kw)
    return argparse.Namespace(**d)

def test_batch_masks_prompt_forced_and_padding():
    from train.rl import pad_samples
    samples = [dict(ids=[6, 7, 0, 9, 1, 2, 10], mask=[0, 0, 0, 0, 1, 0, 1]), dict(ids=[6, 9, 3], mask=[0, 0, 1])]
    x, y, m = pad_samples(samples, "cpu", pad_id=6)
    assert x.tolist() == [[6, 7, 0, 9, 1, 2], [6, 9, 6, 6, 6, 6]]
    assert y.tolist() == [[-1, -1, -1, 1, -1, 10], [-1, 3, -1, -1, -1, -1]]
    assert m.sum().item() == 3

class ScriptedEngine:
    """The Engine's submit/step/stop_ids surface replaying fixed completions: script[p] = [(tokens, masks, finish
    reason)] per sample of prompt p (tokens as the engine appends them, the stop token included)."""

    def __init__(self, tok, script):
        self.stop_ids = {tok.encode_special("<|assistant_end|>"), tok.bos_token_id}
        self.script, self.submitted = script, 0

    def submit(self, prompt_ids, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        from model.engine import Request
        req = Request(prompt_ids, num_samples, max_tokens, temperature, top_k, seed)
        rows = self.script[self.submitted]
        self.submitted += 1
        assert len(rows) == num_samples
        for i, (tokens, masks, reason) in enumerate(rows):
            req.completions[i], req.completion_masks[i], req.finish_reasons[i] = list(tokens), list(masks), reason
        req.done = True
        return req

    def step(self):
        raise AssertionError("every scripted request is done at submit")

def test_tool_crash_scores_zero_and_reward_errors_name_the_stage():
    from train.rl import rollout
    from train.tasks import TaskError
    tok = SmallTok()
    end = tok.encode_special("<|assistant_end|>")
    script = [[([0, 0, 0, end], [1, 1, 1, 1], "stop"),  # "aaa" <end>
               ([0, 11, 0, 12, 13, 99, 14, 0, end], [1, 1, 1, 1, 0, 0, 0, 1, 1], "stop")]]  # a crashed tool call

    out = rollout(ScriptedEngine(tok, script), tok, PreferA(), [0], 2, max_tokens=16, temperature=1.0, top_k=None,
                  seed=0)
    assert [o["reward"] for o in out] == [1.0, 0.0] and [o["crashed"] for o in out] == [False, True]
    assert out[0]["ids"][-1] == end and out[0]["mask"][-1] == 1  # the stop token it emitted is learned

    class Bad(PreferA):
        def reward(self, conv, text):
            raise ZeroDivisionError("oops")

    with pytest.raises(TaskError, match=r"\[rl\] reward function of task prefer_a raised: ZeroDivisionError"):
        rollout(ScriptedEngine(tok, script), tok, Bad(), [0], 2, max_tokens=16, temperature=1.0, top_k=None, seed=0)

def test_rollout_trains_exactly_the_emitted_tokens():
    """The end comes from the engine's finish reason: a stop on <|bos|> keeps <|bos|> (never <|assistant_end|>),
    a "length" finish short of max_tokens (the context limit) and a stop string add nothing."""
    from train.rl import rollout
    tok = SmallTok()
    bos, end = tok.bos_token_id, tok.encode_special("<|assistant_end|>")
    script = [[([3, bos], [1, 1], "stop"),         # "d" then <|bos|>: the engine stopped on <|bos|>
               ([3, 0], [1, 1], "length"),         # the context limit after 2 of 16 tokens
               ([0, 1], [1, 1], "stop"),           # a stop string completed by "b"
               ([0, end], [1, 1], "stop")]]
    out = rollout(ScriptedEngine(tok, script), tok, PreferA(), [0], 4, max_tokens=16, temperature=1.0, top_k=None,
                  seed=0)
    prompt = tok.render_for_completion(PreferA()[0])
    assert [o["ids"][len(prompt):] for o in out] == [[3, bos], [3, 0], [0, 1], [0, end]]
    assert [o["mask"] for o in out] == [[0] * len(prompt) + [1, 1]] * 4
    assert [o["finish"] for o in out] == ["stop", "length", "stop", "stop"]
    assert [o["reward"] for o in out] == [0.0, 0.5, 0.5, 1.0]  # scored on the text without the stop token

def test_rollout_logp_at_the_sampled_positions():
    """With a real Engine (greedy, a model that never stops) the context limit ends the sample before max_tokens:
    the update's targets are exactly the emitted tokens and token_logp scores each at the position it was
    sampled from."""
    from model.engine import Engine
    from model.gpt import GPT, GPTConfig
    from train.rl import pad_samples, rollout, token_logp
    torch.manual_seed(0)
    tok = SmallTok()
    model = GPT(GPTConfig(sequence_len=8, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # every hidden state is norm(ones) (c_proj starts at zero): greedy emits "c" forever
        model.transformer.wte.weight.fill_(1.0)
        model.lm_head.weight[2] = 0.1
    engine = Engine(model, tok)

    class Long(PreferA):
        def __getitem__(self, i):
            return {"messages": [{"role": "user", "content": "ab" * ((engine.max_context - 6) // 2)}]}

    out = rollout(engine, tok, Long(), [0], 1, max_tokens=16, temperature=0.0, top_k=None, seed=0)
    prompt = tok.render_for_completion(Long()[0])
    comp = out[0]["ids"][len(prompt):]
    assert out[0]["finish"] == "length" and len(prompt) + len(comp) == engine.max_context and len(comp) < 16
    assert tok.encode_special("<|assistant_end|>") not in comp and out[0]["mask"][len(prompt):] == [1] * len(comp)
    x, y, m = pad_samples(out, "cpu", pad_id=6)
    assert y[0, len(prompt) - 1:].tolist() == comp and int(m.sum()) == len(comp)
    torch.nn.init.normal_(model.lm_head.weight)  # position-dependent log-probs from here on
    for block in model.transformer.h:
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
    with torch.no_grad():
        logp = token_logp(model, x, y)
        ids = torch.tensor(out[0]["ids"])
        for j, t in enumerate(comp):  # the log-prob of token t given everything before it
            pos = len(prompt) + j
            want = torch.log_softmax(model(ids[None, :pos])[0, -1].float(), -1)[t]
            assert torch.allclose(logp[0, pos - 1], want, atol=1e-5)

def test_reward_preferring_one_token_rises():
    from model.engine import Engine
    from model.gpt import GPT, GPTConfig
    from train.rl import grpo_update, rollout
    torch.manual_seed(0)
    tok, task = SmallTok(), PreferA()
    model = GPT(GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, betas=(0.9, 0.95))
    engine = Engine(model, tok)
    args = _args()
    rewards = []
    for step in range(12):
        samples = rollout(engine, tok, task, [step % 4, (step + 1) % 4], args.num_samples, max_tokens=6,
                          temperature=1.0, top_k=None, seed=step)
        model.train()
        grpo_update(model, [opt], samples, args)
        rewards.append(sum(s["reward"] for s in samples) / len(samples))
    first, last = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3  # uniform start: E[reward] = 1/6
    assert first < 0.4 and last > first + 0.3, rewards

def test_grpo_update_with_clipping_inner_steps_and_kl():
    from model.gpt import GPT, GPTConfig
    from train.rl import grpo_update, plain_copy
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=SmallTok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    ref = plain_copy(model)
    samples = [dict(ids=[6, 7, 0, 8, 9] + [i % 6] * 4, mask=[0] * 5 + [1] * 4, reward=float(i % 2)) for i in range(4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.lm_head.weight.detach().clone()
    stats = grpo_update(model, [opt], samples, _args(num_samples=4, clip_eps=0.2, inner_steps=3, kl_coef=0.1,
                                                     device_batch_size=3, std_scale=True), ref_model=ref)
    assert set(stats) >= {"loss", "clip_frac", "kl"} and stats["kl"] > 0  # the 2nd/3rd inner step moved away from ref
    assert not torch.equal(before, model.lm_head.weight)
    assert all(not p.requires_grad for p in ref.parameters())

def test_prompts_that_leave_no_room_fail_at_load():
    from train.rl import check_prompts
    from train.tasks import TaskError
    tok = SmallTok()

    class Prompts(PreferA):
        def __getitem__(self, i):
            return {"messages": [{"role": "user", "content": "ab" * (20 if i == 2 else 1)}]}

    check_prompts(tok, Prompts(), max_context=60)
    check_prompts(tok, Prompts(), max_context=30, count=2)  # only the examples the evaluation reads
    with pytest.raises(TaskError, match=r"\[rl\] prefer_a: example 2: its prompt of 44 tokens leaves no room for a "
                                        r"completion in the context of 44 tokens"):
        check_prompts(tok, Prompts(), max_context=44)

@pytest.mark.parametrize("flag", ["--device-batch-size", "--num-samples", "--prompts-per-step", "--max-new-tokens",
                                  "--eval-k", "--inner-steps"])
def test_zero_counts_are_refused_before_training(flag):
    """A zero batch or count would fail mid-run (a zero range step in the update, an empty group): one line first."""
    from model.common import UserError
    from train.rl import parse_args
    with pytest.raises(UserError, match=rf"\[rl\] {flag} must be an integer >= 1, got 0"):
        parse_args([flag, "0"])
    assert parse_args([flag, "2"]) is not None
