"""The training loop every stage shares (base, mid, SFT; RL drives its own steps with is_due, set_lrs, optimizer_step
and resume): `train(stage, model, optimizers, loader, args, eval_fn=..., sample_fn=..., meta={...}) -> summary`.

Loader: `next_batch() -> (x, y)` int64 (B, T) on the model's device, y == -1 where no loss; JSON-serialisable
`state_dict()` / `load_state_dict(state)`; attributes B and T. eval_fn(model, step) -> metrics dict and
sample_fn(model, step) run on every rank under torch.random.fork_rng, so they never change the training RNG stream.
--resume continues the newest checkpoint on any number of processes (DCP reshards; bit-for-bit on as many as saved; on
another, loader.load_state_dicts continues from where every saved rank had got to). Rank 0 logs every --log-every
steps (the only .item() sync), also to <run dir>/log.jsonl.
"""
import json
import os
import time

import torch
import torch.distributed as dist

import kernels
from model.checkpoint import (checkpoint_dir, find_last_checkpoint, load_checkpoint, save_checkpoint,
                              set_rng_state, step_dir)
from model.common import UserError, dist_info, full, local, peak_flops, print0
from model.optim import muon_momentum
from train.distributed import COMPILE_CHOICES

def add_train_args(parser):
    """The flags every stage shares (stages set their own defaults: presets)."""
    kernels.add_argument(parser)
    g = parser.add_argument_group("training loop")
    g.add_argument("--run", default="default", help="run name: checkpoints go to checkpoints/<stage>/<run>/")
    g.add_argument("--device-batch-size", type=int, default=32, help="sequences per micro-batch per process")
    g.add_argument("--total-batch-size", type=int, default=-1,
                   help="tokens per optimizer step (gradient accumulation); -1 = one micro-batch on every process")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: the stage decides)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps with linear LR warmup")
    g.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps with linear LR warmdown")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="LR multiplier at the end of the warmdown")
    g.add_argument("--muon-momentum-warmup", type=int, default=300, help="steps of Muon momentum 0.85->0.95 (0: off)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: no clipping)")
    g.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of lm_head")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--eval-every", type=int, default=250, help="steps between evaluations (0: only at the end)")
    g.add_argument("--sample-every", type=int, default=0, help="steps between samples (0: only at the end)")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end, -1: never)")
    g.add_argument("--log-every", type=int, default=1, help="steps between log lines")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this stage/run")
    g.add_argument("--seed", type=int, default=42, help="seed of torch/python RNGs")
    add_compile_args(g)
    return parser

def add_compile_args(parser):
    """--compile and --compile-backend: every training stage's, and train.speedrun's."""
    parser.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                        help="torch.compile every block and the root's embedding and loss, then shard (auto: on "
                             "with CUDA, off on CPU and for RL; see train/distributed.py)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend: inductor, or "
                        "aot_eager for quick CPU runs (no C++ build, no speed-up)")

def lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """nanochat's schedule: linear warmup, constant, linear warmdown to final_lr_frac over the last warmdown_ratio."""
    warmup, warmdown = round(warmup_ratio * num_iterations), round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac

def grad_accum_steps(total_batch_size, world_size, B, T):
    """Micro-batches per step so that world_size·B·T·steps == total_batch_size tokens (-1 = one micro-batch)."""
    if total_batch_size == -1:
        return 1
    per_micro = world_size * B * T
    if total_batch_size <= 0 or total_batch_size % per_micro:
        lo = max(per_micro, total_batch_size // per_micro * per_micro)
        raise UserError(f"--total-batch-size {total_batch_size} is not divisible by world_size x device_batch_size x "
                        f"seq_len = {world_size} x {B} x {T} = {per_micro} tokens; set --total-batch-size to a "
                        f"multiple of {per_micro} (e.g. {lo} or {lo + per_micro}) or change --device-batch-size")
    return total_batch_size // per_micro

def is_due(step, every, last):
    """True at the last step and, with every > 0, at every multiple of `every` (step 0 included)."""
    return last or (every > 0 and step % every == 0)

def set_lrs(optimizers, lr_mult, momentum=None):
    """Every param group's lr = its initial_lr x lr_mult; with `momentum`, also the momentum of the Muon groups."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if momentum is not None and "momentum" in group:  # Muon
                group["momentum"] = momentum

def optimizer_step(model, optimizers, grad_clip):
    """Clip the gradient norm (grad_clip > 0), step every optimizer, drop the gradients -> norm before clipping (a
    tensor; None without clipping)."""
    grad_norm = None
    if grad_clip > 0:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if len({type(g) for g in grads}) == 1:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        else:  # DTensor blocks beside a plain root: one CPU rank (train.distributed), where every shard is whole
            grads = [local(g) for g in grads]
            grad_norm = torch.nn.utils.get_total_norm(grads)
            torch._foreach_mul_(grads, torch.clamp(grad_clip / (grad_norm + 1e-6), max=1.0))  # as clip_grad_norm_
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grad_norm

def resume(stage, run, model, optimizers):
    """Load the newest checkpoint of <stage>/<run> into model and optimizers and restore this rank's RNG -> its
    meta.json plus "path" and "exact" (saved by as many processes; else a note). UserError when there is none."""
    ckpt = find_last_checkpoint(stage, run)
    if ckpt is None:
        raise UserError(f"--resume: no checkpoint found in {checkpoint_dir(stage, run)}; run without --resume first "
                        f"(or pass the --run name of an existing run)")
    saved, info = load_checkpoint(ckpt, model, optimizers), dist_info()
    saved_world, rng_states = saved.get("world_size", 1), saved.get("rng_states", [])
    if info.rank < len(rng_states) and not set_rng_state(rng_states[info.rank]):
        print0(f"note: {ckpt} holds its RNG state in an older format that is not decoded (it would be unpickled); "
               f"the RNG stays seeded, so this resume is not bit-exact")
    exact = saved_world == info.world_size
    if not exact:
        print0(f"note: {ckpt} was saved by {saved_world} process{'es' if saved_world > 1 else ''} and resumes on "
               f"{info.world_size}: model and optimizer state resharded, the data continue from where every saved "
               f"rank had got to, in another order than an uninterrupted run")
    print0(f"resumed from {ckpt} at step {saved['step']}")
    return dict(saved, path=ckpt, exact=exact)

def run_meta(stage, args, meta):
    """A checkpoint's meta: stage, kernel mode and the flags' plain values, then the dict `meta` (which wins)."""
    plain = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {"stage": stage, "kernels": kernels.get_mode(), "args": plain, **meta}

def _fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

def _forked(fn, *a):
    """Run fn without touching the training RNG stream (CPU + current CUDA device)."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        return fn(*a)

def train(stage, model, optimizers, loader, args, eval_fn=None, sample_fn=None, meta=None):
    """Run the loop for args.num_iterations optimizer steps -> summary: {"stage", "run", "steps", "tokens", "time_s",
    "tokens_per_s", "mfu", "first_train_loss", "final_train_loss", "val": last eval_fn metrics, "losses": {step: loss
    of logged steps}, "checkpoint": last checkpoint path}."""
    num_iterations = args.num_iterations
    if num_iterations is None or num_iterations < 1:
        raise UserError(f"--num-iterations must be >= 1, got {num_iterations}")
    world, rank = dist_info().world_size, dist_info().rank
    B, T = loader.B, loader.T
    accum = grad_accum_steps(args.total_batch_size, world, B, T)
    tokens_per_step = accum * world * B * T
    run_dir = checkpoint_dir(stage, args.run)
    meta = run_meta(stage, args, {"tokens_per_step": tokens_per_step, **(meta or {})})

    start_step, last_val, ckpt = 0, {}, None
    if args.resume:
        saved = resume(stage, args.run, model, optimizers)
        states = saved["loader_states"]
        if hasattr(loader, "load_state_dicts"):
            loader.load_state_dicts(states)
        elif saved["exact"]:
            loader.load_state_dict(states[rank])
        else:
            raise UserError(f"--resume: {saved['path']} was saved by {len(states)} processes and this loader "
                            f"({type(loader).__name__}) can only continue on as many")
        was = saved.get("tokens_per_step", tokens_per_step)
        if was != tokens_per_step:  # e.g. --total-batch-size -1 (one micro-batch per process) on another world size
            print0(f"note: a step now holds {tokens_per_step:,} tokens, {was:,} before the resume; pass "
                   f"--total-batch-size {was} to keep the batch (and the schedule's meaning)")
        start_step, last_val, ckpt = saved["step"], saved.get("val", {}), saved["path"]
    print0(f"{stage}: {num_iterations} steps x {tokens_per_step:,} tokens (world {world} x batch {B} x seq {T} x "
           f"accum {accum}), kernels {kernels.get_mode()}")
    device = next(model.parameters()).device
    peak = peak_flops(device)
    flops_per_token = model.estimate_flops() if peak and hasattr(model, "estimate_flops") else None
    log_path = os.path.join(run_dir, "log.jsonl")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        if os.path.exists(log_path):  # a fresh run starts a new log; a resumed one drops what came after its step
            with open(log_path) as f:
                keep = [line for line in f if args.resume and json.loads(line)["step"] <= start_step]
            with open(log_path, "w") as f:
                f.writelines(keep)

    def log(record):
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    losses, first_loss, last_loss, mfu = {}, None, None, None
    train_time, t_log, steps_since_log, step = 0.0, 0.0, 0, start_step
    model.train()
    while True:
        last = step == num_iterations
        resumed_here = args.resume and step == start_step  # already evaluated before that checkpoint was saved
        if eval_fn is not None and not resumed_here and is_due(step, args.eval_every, last):
            last_val = _forked(eval_fn, model, step) or {}
            model.train()
            print0(f"step {step:06d} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_val.items()))
            log({"step": step, **last_val})
        if sample_fn is not None and step > 0 and is_due(step, args.sample_every, last):
            _forked(sample_fn, model, step)
            model.train()
        if step > start_step and args.save_every >= 0 and is_due(step, args.save_every, last):
            ckpt = save_checkpoint(step_dir(stage, args.run, step), step, model, optimizers,
                                   dict(meta, val=last_val), loader.state_dict())
            print0(f"saved {ckpt}")
        if last:
            break

        t0 = time.perf_counter()
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_lrs(optimizers, lrm, muon_momentum(step, args.muon_momentum_warmup))
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = loader.next_batch()
            loss = model(x, y)
            loss_sum += loss.detach()
            (loss / accum).backward()
        grad_norm = optimizer_step(model, optimizers, args.grad_clip)
        step += 1
        steps_since_log += 1
        logging = step % max(1, args.log_every) == 0 or step == num_iterations
        if logging and device.type == "cuda":
            torch.cuda.synchronize()  # the only sync: it flushes the queued steps, so the timing below is right
        train_time += time.perf_counter() - t0
        if logging:  # dt = training time per step since the last log line (eval / sample / save time left out)
            dt = (train_time - t_log) / steps_since_log
            t_log, steps_since_log = train_time, 0
            mean_loss = loss_sum / accum
            if world > 1:
                dist.all_reduce(mean_loss)  # SUM (gloo has no AVG)
                mean_loss /= world
            lossf = mean_loss.item()
            first_loss = lossf if first_loss is None else first_loss
            last_loss = losses[step] = lossf
            tok_s = tokens_per_step / max(dt, 1e-9)
            mfu = flops_per_token * tok_s / (peak * world) if flops_per_token else None
            eta = (train_time / max(step - start_step, 1)) * (num_iterations - step)
            gnf = float(full(grad_norm)) if grad_norm is not None else float("nan")
            print0(f"step {step:06d}/{num_iterations:06d} ({100 * step / num_iterations:5.1f}%) | loss {lossf:.6f} | "
                   f"grad norm {gnf:.3f} | lrm {lrm:.3f} | dt {dt * 1000:.0f} ms | tok/s {tok_s:,.0f} | "
                   f"mfu {'n/a' if mfu is None else f'{100 * mfu:.2f}%'} | eta {_fmt_time(eta)}")
            log({"step": step, "loss": lossf, "lrm": lrm, "grad_norm": gnf, "dt": dt, "tok_per_s": tok_s, "mfu": mfu})
    steps_done = num_iterations - start_step
    summary = {"stage": stage, "run": args.run, "steps": num_iterations, "steps_this_run": steps_done,
               "tokens": num_iterations * tokens_per_step, "time_s": train_time,
               "tokens_per_s": steps_done * tokens_per_step / train_time if train_time > 0 else float("nan"),
               "mfu": mfu, "first_train_loss": first_loss, "final_train_loss": last_loss, "val": last_val,
               "losses": losses, "checkpoint": ckpt}
    print0(f"{stage} done: {steps_done} steps in {_fmt_time(train_time)}, {summary['tokens_per_s']:,.0f} tok/s, "
           f"train loss {first_loss} -> {last_loss}" + "".join(f", {k} {v:.4f}" for k, v in last_val.items()))
    return summary
