"""GRPO reinforcement learning on a task with a verifiable reward (the embedded arithmetic, or GSM8K).

    python -m train.rl --task arithmetic --num-iterations 50            # single process (CPU or one GPU)
    torchrun --nproc_per_node=8 -m train.rl -- --task gsm8k              # nanochat's RL stage (from the SFT model)
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m train.rl -- --preset tiny ...   # CPU, gloo

Each step every rank samples `--num-samples` completions of each of its `--prompts-per-step / world` prompts from the
Engine (tool calls run in the sandbox, their output forced in; reward 0 when one crashed) and trains on exactly the
tokens the engine emitted (the stop token included when it stopped on one).

Objective (per sampled token t of completion i in group g; forced tool-output tokens and the prompt are masked):
    A_i   = r_i - mean_g(r)                          group-relative advantage (--std-scale: / (pop. std_g + 1e-6))
    ratio = exp(logp_t - logp_old_t)                 logp_old = the policy that sampled (detached)
    L_t   = -A_i * ratio                             on-policy: gradient = -A_i * grad logp_t (REINFORCE)
          = -min(A_i * ratio, A_i * clip(ratio, 1 - eps, 1 + eps))       with --clip-eps eps (PPO)
          + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)          with --kl-coef beta (k3 estimator vs
                                                                         a frozen copy of the starting model)
    loss  = sum_t L_t / (number of sampled tokens in the step)           token-level mean (--reduction token), or
            mean over completions of their per-token mean                (--reduction sequence)
Defaults (nanochat's first release, https://github.com/karpathy/nanochat/blob/master/scripts/chat_rl.py): no std
scaling, KL or clipping, one inner step (on-policy), token-level mean; --inner-steps K > 1 re-uses the rollouts.
References: GRPO's advantage, clipped ratio and k3 KL: DeepSeekMath, https://arxiv.org/abs/2402.03300; the token-level
mean over the step: DAPO, https://arxiv.org/abs/2503.14476.
"""
import argparse
import math
import time

import torch

import kernels
from model.checkpoint import save_checkpoint, step_dir
from model.common import ArgumentParser, UserError, all_reduce_sum, full, local, print0, rank_share
from model.engine import Engine
from model.gpt import GPT
from train import stage
from train.loop import is_due, optimizer_step, resume, run_meta, set_lrs
from train.tasks import TaskError, get_task

def group_advantages(rewards, num_samples, std_scale=False, eps=1e-6):
    """rewards (P * G,) prompt-major (G = num_samples) -> advantages (P * G,): reward - its group's mean, optionally
    / (the group's population std + eps)."""
    r = rewards.float().view(-1, num_samples)
    adv = r - r.mean(dim=1, keepdim=True)
    if std_scale:
        adv = adv / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.view(-1)

def policy_loss(logp, mask, advantages, old_logp=None, ref_logp=None, clip_eps=None, kl_coef=0.0,
                reduction="token", normalizer=None):
    """GRPO loss of one micro-batch -> (loss, stats dict of floats). (N, T): logp of the taken tokens under the current
    policy (with grad), mask (1 on sampled tokens), old_logp of the sampling policy (None: on-policy), ref_logp of the
    frozen reference (kl_coef > 0); advantages (N,); clip_eps None = no clipping. reduction "token": sum over sampled
    tokens / normalizer (default their count); "sequence": sum of the rows' token means / normalizer (default N)."""
    mask = mask.float()
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    adv = advantages.float().view(-1, 1)
    surrogate = ratio * adv
    stats = {}
    if clip_eps is not None:
        surrogate = torch.minimum(surrogate, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
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
    """correct: 0/1 per sample of one prompt (n >= k) -> unbiased pass@k = 1 - C(n - c, k) / C(n, k)."""
    n, c = len(correct), sum(correct)
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)

def tool_crashed(tokenizer, completion):
    """True when a forced tool output in the completion reports an error ('Error: ...')."""
    start, end = tokenizer.encode_special("<|output_start|>"), tokenizer.encode_special("<|output_end|>")
    inside, out = False, []
    for t in completion:
        if t == start:
            inside, out = True, []
        elif t == end and inside:
            if "Error:" in tokenizer.decode(out):
                return True
            inside = False
        elif inside:
            out.append(t)
    return False

def rollout(engine, tokenizer, task, indices, num_samples, max_tokens, temperature, top_k, seed):
    """Sample num_samples completions of each task example in `indices` (the j-th seeded with seed + j) and score them
    -> dicts (prompt-major): ids = prompt + exactly the tokens the engine emitted, mask (1 on sampled tokens, 0 on the
    prompt and forced tool output), reward (of the text without the stop token), prompt index, length, crashed,
    finish ("stop" | "length"). RuntimeError when the engine failed a request."""
    convs = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    reqs = [engine.submit(p, num_samples=num_samples, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                          seed=seed + i) for i, p in enumerate(prompts)]
    while not all(r.done for r in reqs):
        engine.step()
    failed = next((r.error for r in reqs if r.error), None)
    if failed:
        raise RuntimeError(f"the engine failed a rollout: {failed}")
    out = []
    for p, (conv, prompt, r) in enumerate(zip(convs, prompts, reqs)):
        for comp, mask, finish in zip(r.completions, r.completion_masks, r.finish_reasons):
            stopped = finish == "stop" and comp and comp[-1] in engine.stop_ids
            text_ids = comp[:-1] if stopped else comp
            crashed = tool_crashed(tokenizer, text_ids)
            try:
                reward = 0.0 if crashed else float(task.reward(conv, tokenizer.decode(text_ids)))
            except Exception as e:  # noqa: BLE001
                raise TaskError(f"[rl] reward function of task {getattr(task, 'name', task)} raised: "
                                f"{type(e).__name__}: {e}") from e
            out.append(dict(ids=prompt + list(comp), mask=[0] * len(prompt) + list(mask), reward=reward, prompt=p,
                            length=len(comp), crashed=crashed, finish=finish))
    return out

def check_prompts(tokenizer, task, max_context, count=None):
    """TaskError naming the task and example unless the prompt of each of the first `count` examples (default all)
    leaves room for a completion in max_context tokens (checked at load time, not mid-run)."""
    for i in range(min(len(task), len(task) if count is None else count)):
        n = len(tokenizer.render_for_completion(task[i]))
        if n >= max_context:
            raise TaskError(f"[rl] {getattr(task, 'name', task)}: example {i}: its prompt of {n} tokens leaves "
                            f"no room for a completion in the context of {max_context} tokens")

def pad_samples(samples, device, pad_id):
    """Scored samples (see rollout) -> right-padded int64 (x, y) and bool m = y >= 0, each (N, longest ids - 1):
    y = ids[1:] with -1 where the target was not sampled (prompt, tool output, padding)."""
    T = max(len(s["ids"]) for s in samples) - 1
    x = torch.full((len(samples), T), pad_id, dtype=torch.long)
    y = torch.full((len(samples), T), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        ids, m = torch.tensor(s["ids"]), torch.tensor(s["mask"])
        n = len(ids) - 1
        x[i, :n] = ids[:-1]
        y[i, :n] = torch.where(m[1:] == 1, ids[1:], torch.full_like(ids[1:], -1))
    return x.to(device), y.to(device), (y >= 0).to(device)

def token_logp(model, x, y):
    """log p(y_t | x_<=t) for every position (0 where y == -1), shape (B, T)."""
    return -model(x, y, loss_reduction="none")

def grpo_update(model, optimizers, samples, args, ref_model=None):
    """One GRPO update from scored samples (prompt-major): advantages, then args.inner_steps optimizer steps over
    micro-batches of args.device_batch_size -> stats."""
    device = local(next(model.parameters())).device
    adv = group_advantages(torch.tensor([s["reward"] for s in samples]), args.num_samples, std_scale=args.std_scale)
    chunks = [slice(i, i + args.device_batch_size) for i in range(0, len(samples), args.device_batch_size)]
    batches = [pad_samples(samples[c], device, samples[0]["ids"][0]) for c in chunks]
    normalizer = max(sum(int(m.sum()) for _, _, m in batches), 1) if args.reduction == "token" else len(samples)
    need_old = args.clip_eps is not None or args.inner_steps > 1
    with torch.no_grad():
        old = [token_logp(model, x, y) for x, y, _ in batches] if need_old else [None] * len(batches)
        ref = [token_logp(ref_model, x, y) for x, y, _ in batches] if args.kl_coef else [None] * len(batches)
    stats = {}
    for _ in range(args.inner_steps):
        total = 0.0
        for c, (x, y, m), o, r in zip(chunks, batches, old, ref):
            logp = token_logp(model, x, y)
            loss, st = policy_loss(logp, m, adv[c].to(device), old_logp=o, ref_logp=r, clip_eps=args.clip_eps,
                                   kl_coef=args.kl_coef, reduction=args.reduction, normalizer=normalizer)
            loss.backward()
            total += loss.item()
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v / (len(batches) * args.inner_steps)  # mean over the update
        optimizer_step(model, optimizers, args.grad_clip)
    stats["loss"] = total
    return stats

@torch.no_grad()
def sync_sampler(model, sampler):
    """Copy the (possibly FSDP-sharded) training weights into the plain sampling copy (collective)."""
    for p, q in zip(model.parameters(), sampler.parameters()):
        q.copy_(full(p))

def plain_copy(model):
    """A plain (unsharded) GPT with the model's config and current weights: the Engine's sampler / KL reference."""
    with torch.device("meta"):
        copy = GPT(model.config)
    copy.to_empty(device=local(next(model.parameters())).device)
    copy.init_weights()  # fills the rotary buffers
    sync_sampler(model, copy)
    return copy.eval().requires_grad_(False)

def evaluate_pass_at_k(engine, tokenizer, task, num_examples, k, max_tokens, temperature, top_k, seed):
    """pass@1 and pass@k over the first num_examples of a (test) task, k samples each, split across ranks."""
    idx = rank_share(min(num_examples, len(task)))
    samples = rollout(engine, tokenizer, task, idx, k, max_tokens, temperature, top_k, seed) if idx else []
    correct = [[int(s["reward"] > 0) for s in samples[j * k:(j + 1) * k]] for j in range(len(idx))]
    p1, pk, n = all_reduce_sum([sum(pass_at_k(c, 1) for c in correct), sum(pass_at_k(c, k) for c in correct), len(idx)])
    return {"pass@1": p1 / max(n, 1), f"pass@{k}": pk / max(n, 1)}

PRESETS = {
    "tiny": dict(task="arithmetic", num_iterations=8, prompts_per_step=4, num_samples=4, max_new_tokens=48,
                 device_batch_size=16, eval_every=0, eval_examples=8, eval_k=4, top_k=50),
    "d20": dict(task="gsm8k", num_iterations=-1, prompts_per_step=16, num_samples=16, max_new_tokens=256,
                device_batch_size=8, eval_every=60, eval_examples=400, eval_k=8, top_k=50),
}

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = stage.add_stage_args(p, "rl")
    g.add_argument("--task", help="task with a verifiable reward: arithmetic | gsm8k | spelling | ...")
    g.add_argument("--prompts-per-step", type=int, help="prompts per optimizer step, over all ranks")
    g.add_argument("--num-samples", type=int, help="completions per prompt (the GRPO group)")
    g.add_argument("--max-new-tokens", type=int, help="completion budget")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--std-scale", action="store_true", help="divide advantages by the group std (default: off)")
    g.add_argument("--clip-eps", type=float, default=None, help="PPO ratio clipping epsilon (default: none)")
    g.add_argument("--inner-steps", type=int, default=1, help="optimizer steps per rollout batch (default 1)")
    g.add_argument("--kl-coef", type=float, default=0.0, help="KL penalty to the starting model (default 0)")
    g.add_argument("--reduction", choices=("token", "sequence"), default="token", help="loss mean (default token)")
    g.add_argument("--init-lr-frac", type=float, default=0.05, help="LRs x this, then linear decay to 0 (nanochat)")
    g.add_argument("--eval-examples", type=int, help="test prompts for pass@k")
    g.add_argument("--eval-k", type=int, help="k of pass@k")
    args = stage.parse_args(p, PRESETS, argv)
    stage.require_positive("rl", args, "prompts_per_step", "num_samples", "max_new_tokens", "device_batch_size",
                           "eval_k", "inner_steps")
    return args

def run(argv=None):
    """The RL stage -> summary (rewards, last pass@k, per-step history, checkpoint); leaves the process group up."""
    args = parse_args(argv)
    info = stage.start(args)
    if args.prompts_per_step % info.world_size:
        raise UserError(f"[rl] --prompts-per-step {args.prompts_per_step} must be divisible by the world size "
                        f"{info.world_size}")
    model, tokenizer, src_meta, src_path = stage.load_source("rl", args, info)
    try:
        train_task, test_task = get_task(args.task, "train"), get_task(args.task, "test")
    except Exception as e:
        raise UserError(f"[rl] {e}") from e
    per_rank = args.prompts_per_step // info.world_size
    if args.num_iterations < 1:
        args.num_iterations = max(1, int(args.epochs * len(train_task) / args.prompts_per_step))
    optimizers = stage.setup_optimizers(model, args)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"] = group["initial_lr"] * args.init_lr_frac
    meta = run_meta("rl", args, dict(config=src_meta["config"], tokenizer_dir=src_meta.get("tokenizer_dir"),
                                     source=src_path, task=args.task))
    start, ckpt = 0, None
    if args.resume:
        saved = resume("rl", args.run, model, optimizers)
        start, ckpt = saved["step"], saved["path"]
    sampler = plain_copy(model)  # ranks roll out independently from unsharded copies
    ref_model = plain_copy(model) if args.kl_coef else None
    engine = Engine(sampler, tokenizer)
    check_prompts(tokenizer, train_task, engine.max_context)
    check_prompts(tokenizer, test_task, engine.max_context, count=args.eval_examples)
    print0(f"[rl] {args.num_iterations} steps x {args.prompts_per_step} prompts x {args.num_samples} samples of "
           f"{args.task}, max {args.max_new_tokens} new tokens, kernels {kernels.get_mode()}")
    history, t_total, last_eval, step = [], 0.0, {}, start
    while True:
        last = step == args.num_iterations
        if is_due(step, args.eval_every, last):
            sync_sampler(model, sampler)
            last_eval = evaluate_pass_at_k(engine, tokenizer, test_task, args.eval_examples, args.eval_k,
                                           args.max_new_tokens, 1.0, args.top_k, seed=10_000)
            print0(f"[rl] step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        if step > start and args.save_every >= 0 and is_due(step, args.save_every, last):
            ckpt = save_checkpoint(step_dir("rl", args.run, step), step, model, optimizers,
                                   dict(meta, val=last_eval), {"step": step})
            print0(f"[rl] saved {ckpt}")
        if last:
            break
        t0 = time.perf_counter()
        set_lrs(optimizers, 1.0 - step / args.num_iterations)  # linear decay to 0 (nanochat)
        sync_sampler(model, sampler)
        base = step * args.prompts_per_step + info.rank * per_rank
        idx = [(base + j) % len(train_task) for j in range(per_rank)]
        samples = rollout(engine, tokenizer, train_task, idx, args.num_samples, args.max_new_tokens,
                          args.temperature, args.top_k, seed=args.seed + 7919 * step + 104729 * info.rank)
        model.train()
        stats = grpo_update(model, optimizers, samples, args, ref_model)
        G = args.num_samples
        solved = sum(max(s["reward"] for s in samples[j * G:(j + 1) * G]) > 0 for j in range(per_rank))
        r_sum, n, l_sum, crash, solved_n, cut = all_reduce_sum(
            [sum(s["reward"] for s in samples), len(samples), sum(s["length"] for s in samples),
             sum(s["crashed"] for s in samples), solved, sum(s["finish"] == "length" for s in samples)])
        step += 1
        dt = time.perf_counter() - t0
        t_total += dt
        rec = {"step": step, "reward": r_sum / n, f"pass@{G}": solved_n / args.prompts_per_step, "seq_len": l_sum / n,
               "tool_crashes": int(crash), "truncated": cut / n, "loss": stats["loss"], "dt": dt, **stats}
        history.append(rec)
        print0(f"[rl] step {step:05d}/{args.num_iterations:05d} | reward {rec['reward']:.4f} | "
               f"pass@{G} {rec[f'pass@{G}']:.3f} | len {rec['seq_len']:.1f} | "
               f"crashes {rec['tool_crashes']} | cut {rec['truncated']:.2f} | loss {rec['loss']:+.5f} | dt {dt:.2f}s")
    rewards = [h["reward"] for h in history]
    summary = {"stage": "rl", "run": args.run, "steps": args.num_iterations, "steps_this_run": step - start,
               "time_s": t_total, "task": args.task,
               "tokens": sum(h["seq_len"] for h in history) * args.prompts_per_step * args.num_samples,
               "first_reward": rewards[0] if rewards else None, "final_reward": rewards[-1] if rewards else None,
               "mean_reward": sum(rewards) / len(rewards) if rewards else None,
               "val": last_eval, "history": history, "checkpoint": ckpt}
    stage.write_summary("rl", args.run, summary)
    return summary

def main(argv=None):
    return stage.main(run, argv)

if __name__ == "__main__":
    main()
