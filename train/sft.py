"""Supervised fine-tuning on conversations: loss only on the assistant tokens the tokenizer's mask marks (mask == 1).

    python -m train.sft --preset tiny                                    # from the newest mid checkpoint
    torchrun --nproc_per_node=8 -m train.sft --preset d20                # ARC-E/C + GSM8K + SmolTalk 10k
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m train.sft --preset tiny --num-iterations 3

One conversation per row, truncated to sequence_len + 1 tokens and right-padded: y = ids[1:] with -1 wherever the
target token has mask 0 (user turns, tool output, the <|bos|>/<|user_start|>... scaffolding) and on the padding, so
padding never contributes to the loss. Rows whose targets would all be masked are skipped.

This module also holds what mid.py shares: the conversation loaders (packed for mid, padded for SFT), the stage
presets, and `run_stage` (load the previous stage's checkpoint into an FSDP2 model, build the task mixture, run the
shared loop of train/loop.py: same checkpoints, same exact --resume, eager or fused kernels).
"""
import argparse
import json
import os

import torch

from model.common import print0

# Stage presets: tiny = CPU minutes on the embedded tasks; d20 = nanochat's recipe on the real datasets.
PRESETS = {
    "tiny": {
        "mid": dict(tasks="arithmetic,spelling,identity,number_mc", num_iterations=80, device_batch_size=8,
                    eval_every=0, val_batches=4),
        "sft": dict(tasks="arithmetic,spelling,identity:0.5,number_mc", num_iterations=60, device_batch_size=8,
                    eval_every=0, val_batches=4),
    },
    "d20": {
        "mid": dict(tasks="smoltalk,mmlu_aux@100000,gsm8k,identity@1000,spelling@20000", num_iterations=-1,
                    device_batch_size=16, total_batch_size=524288, eval_every=150, val_batches=20),
        "sft": dict(tasks="arc_easy,arc_challenge,gsm8k,smoltalk@10000,identity@300,spelling@300",
                    num_iterations=-1, device_batch_size=4, total_batch_size=-1, eval_every=100, val_batches=20),
    },
}
PREVIOUS = {"mid": "base", "sft": "mid", "rl": "sft"}


# ------------------------------------------------------------------------------------------------ loaders
class _ConversationStream:
    """Walks a task (mixture) in order, this rank taking examples rank, rank + world, ...; epochs wrap around.
    Position = (epoch, index) -> exact resume."""

    def __init__(self, task, tokenizer, B, T, rank=0, world_size=1, device="cpu"):
        if len(task) == 0:
            raise ValueError("conversation loader: the task mixture is empty")
        self.task, self.tok, self.B, self.T = task, tokenizer, B, T
        self.rank, self.world, self.device = rank, world_size, torch.device(device)
        self.epoch, self.index = 0, rank

    def _next_conversation(self):
        conv = self.task[self.index % len(self.task)]
        self.index += self.world
        if self.index >= len(self.task):
            self.epoch, self.index = self.epoch + 1, self.index - len(self.task)
        return self.tok.render_conversation(conv, max_tokens=self.T + 1)

    def _to_device(self, x, y):
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]


class SFTLoader(_ConversationStream):
    """One conversation per row, right-padded; y == -1 where mask == 0 and on padding."""

    def next_batch(self):
        pad = self.tok.bos_token_id
        x = torch.full((self.B, self.T), pad, dtype=torch.long)
        y = torch.full((self.B, self.T), -1, dtype=torch.long)
        row = 0
        while row < self.B:
            ids, mask = self._next_conversation()
            ids, mask = ids[:self.T + 1], mask[:self.T + 1]
            tgt = [t if m == 1 else -1 for t, m in zip(ids[1:], mask[1:])]
            if all(t == -1 for t in tgt):  # nothing to learn (e.g. truncated before the assistant turn)
                continue
            n = len(ids) - 1
            x[row, :n] = torch.tensor(ids[:-1])
            y[row, :n] = torch.tensor(tgt)
            row += 1
        return self._to_device(x, y)


class PackedLoader(_ConversationStream):
    """Midtraining: rendered conversations concatenated into a token stream and cut into (B, T+1) rows, as base
    training packs documents. By default every token is a target (nanochat's first release); mask_loss=True
    trains only where the mask is 1. The partial buffer is part of the state (exact resume)."""

    def __init__(self, *a, mask_loss=False, **kw):
        super().__init__(*a, **kw)
        self.mask_loss, self.buf_ids, self.buf_mask = mask_loss, [], []

    def next_batch(self):
        need = self.B * (self.T + 1)
        while len(self.buf_ids) < need:
            ids, mask = self._next_conversation()
            self.buf_ids += ids
            self.buf_mask += mask
        ids = torch.tensor(self.buf_ids[:need]).view(self.B, self.T + 1)
        mask = torch.tensor(self.buf_mask[:need]).view(self.B, self.T + 1)
        self.buf_ids, self.buf_mask = self.buf_ids[need:], self.buf_mask[need:]
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        if self.mask_loss:
            y = torch.where(mask[:, 1:] == 1, y, torch.full_like(y, -1))
        return self._to_device(x, y)

    def state_dict(self):
        return dict(super().state_dict(), buf_ids=list(self.buf_ids), buf_mask=list(self.buf_mask))

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.buf_ids, self.buf_mask = list(state.get("buf_ids", [])), list(state.get("buf_mask", []))


# ------------------------------------------------------------------------------------------------ stage plumbing
def add_stage_args(p, stage):
    from train.loop import add_train_args
    add_train_args(p)
    g = p.add_argument_group(stage)
    g.add_argument("--preset", choices=tuple(PRESETS), default="tiny", help="stage defaults (flags override)")
    g.add_argument("--source", default=PREVIOUS[stage], help="stage whose newest checkpoint we start from")
    g.add_argument("--source-run", default=None, help="run of the source stage (default: its newest)")
    g.add_argument("--tasks", default=None, help="task mixture spec, e.g. 'arithmetic:2,spelling,smoltalk@10000'")
    g.add_argument("--data-url", default=None, help="base URL of the task datasets ($TRITONCHAT_DATA_URL)")
    g.add_argument("--val-batches", type=int, default=None, help="batches of the test mixture per evaluation")
    g.add_argument("--epochs", type=float, default=1.0, help="with --num-iterations -1: passes over the mixture")
    return p


def parse_stage_args(stage, argv=None, extra=None):
    """Parse with the preset's values as defaults (explicit flags win)."""
    p = argparse.ArgumentParser(description=f"train.{stage}", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_args(p, stage)
    if extra:
        extra(p)
    pre, _ = p.parse_known_args(argv)
    preset = dict(PRESETS[pre.preset].get(stage, {}))
    preset["run"] = preset.get("run", "default")
    p.set_defaults(**preset)
    args = p.parse_args(argv)
    if args.data_url:
        os.environ["TRITONCHAT_DATA_URL"] = args.data_url
    return args


def load_source(stage, args, info):
    """FSDP2 model initialised from the newest checkpoint of args.source, plus tokenizer and source meta."""
    from model.gpt import GPTConfig
    from model.checkpoint import find_last_checkpoint, load_checkpoint, read_meta
    from model.common import UserError
    from train.distributed import build_model
    path = find_last_checkpoint(args.source, args.source_run)
    if path is None:
        from model.checkpoint import checkpoint_dir
        where = checkpoint_dir(args.source, args.source_run or "<newest run>")
        raise UserError(f"[{stage}] no {args.source} checkpoint found in {where}: run the {args.source} stage first "
                        f"(python -m train.{args.source}) or pass --source/--source-run")
    meta = read_meta(path)
    model = build_model(GPTConfig(**meta["config"]), info)
    load_checkpoint(path, model)
    tokenizer = load_tokenizer(meta)
    print0(f"[{stage}] starting from {path}")
    return model, tokenizer, meta, path


def load_tokenizer(meta):
    from model.tokenizer import Tokenizer, get_tokenizer
    tok_dir = meta.get("tokenizer_dir")
    return Tokenizer.load(tok_dir) if tok_dir and os.path.isdir(tok_dir) else get_tokenizer()


def write_summary(stage, run, summary):
    """checkpoints/<stage>/<run>/summary.json: what the speedrun's report card reads."""
    from model.common import is_rank0
    from model.checkpoint import checkpoint_dir
    if is_rank0():
        path = os.path.join(checkpoint_dir(stage, run), "summary.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(summary, f, indent=1, default=str)


def run_stage(stage, argv=None):
    """mid / sft: previous checkpoint -> FSDP2 model -> task mixture loader -> train/loop.train -> summary."""
    import kernels
    from train.distributed import cleanup, init_distributed
    from train.loop import train
    from train.tasks import build_mixture
    args = parse_stage_args(stage, argv)
    kernels.set_mode(args.kernels)
    torch.manual_seed(args.seed)
    info = init_distributed()
    model, tokenizer, src_meta, src_path = load_source(stage, args, info)
    T = src_meta["config"]["sequence_len"]
    train_ds = build_mixture(args.tasks, "train", stage=stage)
    val_ds = build_mixture(args.tasks, "test", stage=stage)
    Loader = PackedLoader if stage == "mid" else SFTLoader
    mk = lambda ds: Loader(ds, tokenizer, args.device_batch_size, T, info.rank, info.world_size, info.device)
    loader = mk(train_ds)
    if args.num_iterations < 1:  # one pass (x epochs) over the mixture
        from train.loop import grad_accum_steps
        rows = args.device_batch_size * info.world_size * grad_accum_steps(args.total_batch_size, info.world_size,
                                                                           args.device_batch_size, T)
        per_row = 1 if stage == "sft" else 1 / max(1, T // 128)  # packed: a conversation is ~128 tokens
        args.num_iterations = max(1, int(args.epochs * len(train_ds) * per_row / rows))
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)

    def eval_fn(model, step):
        model.eval()
        vl = mk(val_ds)  # a fresh loader each time: the same batches every evaluation
        with torch.no_grad():
            losses = [model(*vl.next_batch()).item() for _ in range(args.val_batches)]
        return {"val_loss": sum(losses) / len(losses)}

    meta = {"config": src_meta["config"], "tokenizer_dir": src_meta.get("tokenizer_dir"), "source": src_path,
            "tasks": args.tasks}
    summary = train(stage, model, optimizers, loader, args, eval_fn=eval_fn, meta=meta)
    summary["tasks"] = args.tasks
    write_summary(stage, args.run, summary)
    cleanup()
    return summary


def main(argv=None):
    from train.loop import run_main
    return run_main(lambda: run_stage("sft", argv))


if __name__ == "__main__":
    main()
