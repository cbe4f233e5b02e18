"""Worker for tests/test_base.py: trains a tiny GPT with the shared loop (FSDP2, gloo, fp32, eager kernels).

    python tests/_base_worker.py --steps 6 [--kill-at 3] [--resume] [--rows]      (single process)
    torchrun --nproc_per_node=2 tests/_base_worker.py --steps 4 --rows           (two ranks)

--kill-at K: SIGKILL this process right after the checkpoint of step K is on disk (a real crash, not an exception).
--rows: a synthetic loader whose global micro-batch order does not depend on the world size (row block
        step*accum*W + micro*W + rank), so W ranks with accumulation a/W see the same data as one process with a.
--dump-resumed PATH: right after --resume loaded the checkpoint, rank 0 writes the full (unsharded) model and
        optimizer state to PATH (torch.save of get_state_dict's full_state_dict), to compare with what was saved.
Losses land in $TRITONCHAT_HOME/checkpoints/<stage>/<run>/log.jsonl (rank 0, full precision).
"""
import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # noqa: E402

import kernels  # noqa: E402
from model.common import run_main  # noqa: E402
from model.gpt import GPTConfig  # noqa: E402
from stand_ins import ByteTokenizer, synthetic_docs  # noqa: E402
from train import loop  # noqa: E402
from train.data import TokenLoader  # noqa: E402
from train.distributed import build_model, cleanup, init_distributed  # noqa: E402
from train.evaluate import evaluate_bpb, token_bytes  # noqa: E402

class RowLoader:
    """Deterministic random rows; block index = calls * world + rank (world-size independent global order)."""

    def __init__(self, B, T, vocab, rank, world):
        self.B, self.T, self.vocab, self.rank, self.world, self.calls = B, T, vocab, rank, world, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(1000 + self.calls * self.world + self.rank)
        self.calls += 1
        rows = torch.randint(0, self.vocab, (self.B, self.T + 1), generator=g)
        rows[:, 1::3] = rows[:, 0::3][:, : rows[:, 1::3].size(1)]  # some structure so the loss can fall
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]

def main():
    p = argparse.ArgumentParser()
    loop.add_train_args(p)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--rows", action="store_true")
    p.add_argument("--stage", default="worker")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dump-resumed", default=None)
    args = p.parse_args()
    args.num_iterations = args.steps
    kernels.set_mode("eager")
    torch.manual_seed(args.seed)
    info = init_distributed(args.device)
    cfg = GPTConfig(sequence_len=32, vocab_size=257, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = build_model(cfg, info)
    opts = model.setup_optimizers(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                  unembedding_lr=args.unembedding_lr)
    B, T = args.device_batch_size, cfg.sequence_len
    if args.rows:
        loader = RowLoader(B, T, cfg.vocab_size, info.rank, info.world_size)
    else:
        loader = TokenLoader(ByteTokenizer(), synthetic_docs(), B, T, rank=info.rank, world_size=info.world_size,
                             device=info.device)
    if args.kill_at >= 0:
        save = loop.save_checkpoint

        def save_then_die(path, step, *a, **kw):
            out = save(path, step, *a, **kw)
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        loop.save_checkpoint = save_then_die
    if args.dump_resumed:
        resume = loop.resume

        def resume_then_dump(*a, **kw):
            out = resume(*a, **kw)
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd, optim_sd = get_state_dict(model, opts, options=full)
            if info.rank == 0:
                torch.save({"model": model_sd, "optim": optim_sd}, args.dump_resumed)
            return out
        loop.resume = resume_then_dump
    tb = token_bytes(ByteTokenizer())
    val_docs = synthetic_docs(21, seed=1)  # odd: under 2 ranks they hold different numbers of val batches

    def eval_fn(model, step):
        val = TokenLoader(ByteTokenizer(), val_docs, B, T, rank=info.rank, world_size=info.world_size, loop=False,
                          device=info.device)
        return {"val_bpb": evaluate_bpb(model, val, tb)}

    loop.train(args.stage, model, opts, loader, args, eval_fn=eval_fn,
               meta={"config": cfg.__dict__})
    cleanup()

if __name__ == "__main__":
    run_main(main)
