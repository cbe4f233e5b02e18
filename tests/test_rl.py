"""GRPO: advantages and loss against hand-computed values on a fixed toy batch; a reward that prefers one token makes
a tiny model's mean reward rise."""
import math

import pytest
import torch

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
