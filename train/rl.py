"""GRPO reinforcement learning on a task with a verifiable reward (the embedded arithmetic, or GSM8K).

    python -m train.rl --task arithmetic --num-steps 50                 # single process (CPU or one GPU)
    torchrun --nproc_per_node=8 -m train.rl --task gsm8k                 # nanochat's RL stage (from the SFT model)
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m train.rl --preset tiny ...   # CPU, gloo

Each step, every rank takes `--prompts-per-step / world` prompts and samples `--num-samples` completions of each
from the Engine (paged KV cache; python tool calls run live in the sandbox and their output is forced in). Each
completion gets the task's reward; a completion whose tool call crashed scores 0 and training goes on.

Objective (per sampled token t of completion i in group g; forced tool-output tokens and the prompt are masked):
    A_i   = r_i - mean_g(r)                          group-relative advantage (--std-scale: / (std_g(r) + 1e-6),
                                                     population std)
    ratio = exp(logp_t - logp_old_t)                 logp_old = the policy that sampled (detached)
    L_t   = -A_i * ratio                             on-policy: gradient = -A_i * grad logp_t (REINFORCE)
          = -min(A_i * ratio, A_i * clip(ratio, 1 - eps, 1 + eps))       with --clip-eps eps (PPO)
          + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)          with --kl-coef beta (k3 estimator vs
                                                                         a frozen copy of the starting model)
    loss  = sum_t L_t / (number of sampled tokens in the step)           token-level mean (--reduction token), or
            mean over completions of their per-token mean                (--reduction sequence)
Defaults (nanochat's first release): no std scaling, no KL, no ratio clipping, one inner step (on-policy),
token-level mean. --inner-steps K > 1 re-uses the same rollouts for K optimizer steps (then clipping matters).
Logs mean reward, pass@k on held-out prompts, completion lengths; checkpoints and resumes via train/checkpoint.py.
"""
import argparse
import math
import os
import time

import torch

# ------------------------------------------------------------------------------------------------ the GRPO maths


def group_advantages(rewards, num_samples, std_scale=False, eps=1e-6):
    """rewards (P * G,) in prompt-major order (G = num_samples per prompt) -> advantages (P * G,):
    reward minus its group's mean, optionally divided by the group's population std (+ eps)."""
    r = rewards.float().view(-1, num_samples)
    adv = r - r.mean(dim=1, keepdim=True)
    if std_scale:
        adv = adv / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)


def policy_loss(logp, mask, advantages, old_logp=None, ref_logp=None, clip_eps=None, kl_coef=0.0,
                reduction="token", normalizer=None):
    """GRPO loss of one micro-batch and its stats.

    logp (N, T) log-probabilities of the taken tokens under the current policy (with grad); mask (N, T) 1 where the
    token was sampled by the policy; advantages (N,); old_logp (N, T) of the sampling policy (None: on-policy, the
    detached logp); ref_logp (N, T) of the frozen reference (needed when kl_coef > 0); clip_eps None = no clipping.
    reduction "token": sum over all sampled tokens / normalizer (default: this batch's token count; pass the
    whole step's count when accumulating micro-batches). "sequence": each row's token mean, summed over rows and
    divided by normalizer (default: this batch's row count). Returns (loss, stats dict of floats)."""
    mask = mask.float()
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    adv = advantages.float().view(-1, 1)
    surrogate = ratio * adv
    stats = {}
    if clip_eps is not None:
        clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
        surrogate = torch.minimum(surrogate, clipped)
        stats["clip_frac"] = ((((ratio - 1).abs() > clip_eps).float() * mask).sum() / mask.sum().clamp(min=1)).item()
    per_tok = -surrogate
    if kl_coef:
        if ref_logp is None:
            raise ValueError("policy_loss: kl_coef > 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + kl_coef * kl
        stats["kl"] = ((kl.detach() * mask).sum() / mask.sum().clamp(min=1)).item()
    if reduction == "token":
        loss = (per_tok * mask).sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1))
    elif reduction == "sequence":
        per_seq = (per_tok * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_seq.sum() / (normalizer if normalizer is not None else per_seq.numel())
    else:
        raise ValueError(f"policy_loss: reduction must be 'token' or 'sequence', got {reduction!r}")
    return loss, stats


def pass_at_k(correct, k):
    """correct: list of 0/1 per sample of one prompt (n >= k) -> unbiased pass@k = 1 - C(n - c, k) / C(n, k)."""
    n, c = len(correct), sum(correct)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
