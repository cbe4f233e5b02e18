"""What the training stages share: the preset-aware argument parser, the start of a stage that continues an earlier
one (flags, kernels, seed, process group, source checkpoint), the summary the speedrun reads, and mid's and SFT's
recipe. Every stage module has PRESETS, `parse_args(argv)`, `run(argv) -> summary` (leaves the process group up:
train.speedrun runs the stages on one group) and `main(argv)` = stage.main(run, argv).
"""
import argparse
import json
import os
import sys

import torch

import kernels
from model.checkpoint import checkpoint_dir, find_last_checkpoint, load_checkpoint, load_tokenizer, read_meta
from model.common import ArgumentParser, UserError, is_rank0, print0, run_main
from model.gpt import GPTConfig
from train.distributed import build_model, cleanup, init_distributed
from train.loop import add_train_args, grad_accum_steps, train
from train.tasks import build_mixture

PREVIOUS = {"mid": "base", "sft": "mid", "rl": "sft"}  # the stage whose newest checkpoint a stage starts from
# --compile auto per stage (else train.distributed.compile_enabled): RL's padded rollouts change length every step
# (compiled parts would retrace) and its time goes to sampling anyway.
COMPILE_AUTO = {"rl": "off"}
# Sequences per GPU where a preset leaves device_batch_size None (d20 base and mid), by kernel mode (bench/train.py)
D20_DEVICE_BATCH = {"fused": 32, "eager": 16}

def main(run, argv=None):
    """A stage's entry point: run(argv) under model.common.run_main, then the process group is destroyed -> summary."""
    summary = run_main(lambda: run(argv))
    cleanup()
    return summary

def parse_args(parser, presets, argv=None):
    """Two-phase parse: --preset (default "tiny", added to `parser`) picks presets[name], flag defaults that every flag
    given overrides; UserError for an unknown preset. A leading `--` (`torchrun ... -m train.<stage> -- FLAGS`) is
    dropped. device_batch_size None -> D20_DEVICE_BATCH of the kernel mode ("auto" resolved as kernels.set_mode)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv[1:] if argv[:1] == ["--"] else argv
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny")
    name = pre.parse_known_args(argv)[0].preset
    if name not in presets:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(presets)}")
    parser.add_argument("--preset", default="tiny", help=f"defaults of the other flags: {' | '.join(presets)}")
    parser.set_defaults(**presets[name])
    args = parser.parse_args(argv)
    if getattr(args, "device_batch_size", 0) is None:
        args.device_batch_size = D20_DEVICE_BATCH[kernels.resolve(args.kernels)]
    return args

def require_positive(stage, args, *names):
    """UserError naming the flag unless each args.<name> is an integer >= 1 (before any work starts)."""
    for name in names:
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"[{stage}] --{name.replace('_', '-')} must be an integer >= 1, got {value}")

def add_stage_args(parser, stage):
    """The loop's flags plus those of a stage that starts from an earlier stage's checkpoint -> the stage's group."""
    add_train_args(parser)
    g = parser.add_argument_group(stage)
    g.add_argument("--source", default=PREVIOUS[stage], help="stage whose newest checkpoint we start from")
    g.add_argument("--source-run", default=None, help="run of the source stage (default: its newest)")
    g.add_argument("--data-url", default=None, help="base URL of the task datasets ($TRITONCHAT_DATA_URL)")
    g.add_argument("--epochs", type=float, default=1.0, help="with --num-iterations -1: passes over the train data")
    return g

def start(args):
    """Task data URL, kernels mode, seed, process group: the start of a stage after base -> DistInfo."""
    if args.data_url:
        os.environ["TRITONCHAT_DATA_URL"] = args.data_url
    kernels.set_mode(args.kernels)
    torch.manual_seed(args.seed)
    return init_distributed()

def compile_setting(stage, value):
    """The --compile value `stage` builds with: "auto" becomes COMPILE_AUTO[stage] where there is one."""
    return COMPILE_AUTO.get(stage, "auto") if value == "auto" else value

def load_source(stage, args, info):
    """The newest checkpoint of args.source (run args.source_run, default its newest) in an FSDP2 model -> (model,
    tokenizer, source meta, source path); UserError naming the stage when there is none."""
    path = find_last_checkpoint(args.source, args.source_run)
    if path is None:
        where = checkpoint_dir(args.source, args.source_run or "<newest run>")
        raise UserError(f"[{stage}] no {args.source} checkpoint found in {where}: run the {args.source} stage first "
                        f"(python -m train.{args.source}) or pass --source/--source-run")
    meta = read_meta(path)
    model = build_model(GPTConfig(**meta["config"]), info, compile=compile_setting(stage, args.compile),
                        compile_backend=args.compile_backend)
    load_checkpoint(path, model)
    tokenizer = load_tokenizer(meta)
    print0(f"[{stage}] starting from {path}")
    return model, tokenizer, meta, path

def setup_optimizers(model, args):
    """model.setup_optimizers with the loop's learning-rate and weight-decay flags."""
    return model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                  matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)

def write_summary(stage, run, summary):
    """checkpoints/<stage>/<run>/summary.json (rank 0): what the speedrun's report card reads."""
    if is_rank0():
        path = os.path.join(checkpoint_dir(stage, run), "summary.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(summary, f, indent=1, default=str)

def mixture_stage(stage, presets, loader_cls, doc):
    """-> (parse_args, run, main) of a stage that trains on a task mixture with loader_cls (train.mid, train.sft)."""
    def parse(argv=None):
        p = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        g = add_stage_args(p, stage)
        g.add_argument("--tasks", default=None, help="task mixture spec, e.g. 'arithmetic:2,spelling,smoltalk@10000'")
        g.add_argument("--val-batches", type=int, default=None, help="batches of the test mixture per evaluation")
        return parse_args(p, presets, argv)

    def run(argv=None):
        """The stage -> train_on_mixture's summary. Leaves the process group up."""
        return train_on_mixture(stage, parse(argv), loader_cls)

    return parse, run, lambda argv=None: main(run, argv)

def train_on_mixture(stage, args, loader_cls):
    """train.loop.train from the source checkpoint on loader_cls over the train split of the mixture args.tasks,
    val_loss = mean loss of args.val_batches batches of its test split (--num-iterations -1: args.epochs passes)
    -> the loop's summary plus "tasks" (also written by write_summary)."""
    require_positive(stage, args, "device_batch_size", "val_batches")
    info = start(args)
    model, tokenizer, src_meta, src_path = load_source(stage, args, info)
    T = src_meta["config"]["sequence_len"]
    train_ds, val_ds = build_mixture(args.tasks, "train", stage=stage), build_mixture(args.tasks, "test", stage=stage)
    mk = lambda ds: loader_cls(ds, tokenizer, args.device_batch_size, T, info.rank, info.world_size, info.device)
    loader = mk(train_ds)
    if args.num_iterations < 1:
        rows = args.device_batch_size * info.world_size * grad_accum_steps(args.total_batch_size, info.world_size,
                                                                           args.device_batch_size, T)
        args.num_iterations = max(1, int(args.epochs * len(train_ds) * loader_cls.rows_per_conversation(T) / rows))
    optimizers = setup_optimizers(model, args)

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
    return summary
