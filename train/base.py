"""Base pretraining: next-token prediction on raw text, nanochat's recipe
(https://github.com/karpathy/nanochat/blob/master/scripts/base_train.py), FSDP2 on any number of processes.

    python -m train.base --preset tiny                              # CPU, embedded Shakespeare corpus, ~3 minutes
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m train.base -- --preset tiny    # the same on 2 CPU ranks (gloo)
    torchrun --nproc_per_node=8 -m train.base -- --preset d20       # the speedrun model on FineWeb-Edu (8 GPUs)
    python -m train.base --preset tiny --resume                     # continue the newest checkpoint bit-for-bit

Presets (PRESETS): tiny trains a vocab-2048 tokenizer on the corpus if none exists; d20 = nanochat's speedrun (~561 M
params, 524 288 tokens a step of train.stage.D20_DEVICE_BATCH sequences per GPU, 20 tokens per parameter, 240
FineWeb-Edu shards, the last one validation, a vocab-65536 tokenizer trained on the first 2 B characters).
Bits per byte (train.evaluate.evaluate_bpb) = nats / (ln 2 x UTF-8 bytes of the targets), special tokens left out (as
nanochat's loss_eval.py). The summary is also written to $TRITONCHAT_HOME/reports/base_<run>.json.
"""
import itertools
import json
import os
import time

import torch

import kernels
from model.common import ArgumentParser, UserError, barrier, home_dir, print0
from model.gpt import GPTConfig
from model.tokenizer import Tokenizer, get_tokenizer
from train import data, stage
from train.data import TokenLoader
from train.distributed import build_model, init_distributed
from train.evaluate import evaluate_bpb, token_bytes
from train.loop import add_train_args, train
from train.tokenizer import capped_docs

PRESETS = {
    "tiny": dict(depth=2, max_seq_len=256, vocab_size=2048, device_batch_size=8, total_batch_size=2048,
                 num_iterations=200, target_param_data_ratio=-1, eval_every=50, eval_tokens=4 * 256 * 16,
                 sample_every=0, sample_tokens=48, save_every=0, warmup_ratio=0.0, warmdown_ratio=0.2,
                 data="shakespeare", num_shards=0),
    "d20": dict(depth=20, max_seq_len=2048, vocab_size=65536, device_batch_size=None, total_batch_size=524288,
                num_iterations=-1, target_param_data_ratio=20, eval_every=250, eval_tokens=20 * 524288,
                sample_every=2000, sample_tokens=16, save_every=0, warmup_ratio=0.0, warmdown_ratio=0.2,
                data="fineweb", num_shards=240),
}
SAMPLE_PROMPTS = ["ROMEO.", "To be, or not to be", "The capital of France is", "If 5*x + 3 = 13, then x is"]

def parse_args(argv=None):
    """The flags below with the --preset's defaults; UserError for values that cannot work."""
    p = ArgumentParser(description="Base pretraining (see the module docstring of train/base.py)")
    g = p.add_argument_group("model and data")
    g.add_argument("--depth", type=int, help="number of layers; width 64*depth")
    g.add_argument("--max-seq-len", type=int, help="tokens per sequence")
    g.add_argument("--vocab-size", type=int, help="vocab of the tokenizer trained when none exists yet")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda when available")
    g.add_argument("--data", choices=["shakespeare", "fineweb"], help="embedded corpus or FineWeb-Edu shards")
    g.add_argument("--num-shards", type=int, help="FineWeb-Edu shards to download (the last one is validation)")
    g.add_argument("--data-url", default=None, help="base URL of the shards (default $TRITONCHAT_FINEWEB_URL or HF)")
    g.add_argument("--checksums", default=None, help="sha256sum-format list of the shards (else: parse check)")
    g.add_argument("--target-param-data-ratio", type=float, help="with --num-iterations -1: tokens per parameter")
    g.add_argument("--eval-tokens", type=int, help="validation tokens per bpb evaluation")
    g.add_argument("--sample-tokens", type=int, help="tokens per greedy sample")
    add_train_args(p)
    args = stage.parse_args(p, PRESETS, argv)
    for name, low in (("depth", 1), ("max_seq_len", 2), ("device_batch_size", 1)):
        if getattr(args, name) is None or getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= {low} (got {getattr(args, name)})")
    if args.data == "fineweb" and args.num_shards < 2:
        raise UserError(f"--num-shards must be >= 2 (training shards + 1 validation shard), got {args.num_shards}")
    if args.num_iterations == -1 and args.target_param_data_ratio <= 0:
        raise UserError("set --num-iterations, or --num-iterations -1 with --target-param-data-ratio > 0")
    return args

def resolve_num_iterations(args, num_params, world_size):
    """--num-iterations, or (when -1) target_param_data_ratio x params / tokens per step."""
    if args.num_iterations != -1:
        return args.num_iterations
    tokens_per_step = args.total_batch_size if args.total_batch_size > 0 else \
        world_size * args.device_batch_size * args.max_seq_len
    return max(1, int(args.target_param_data_ratio * num_params) // tokens_per_step)

def _markers():
    """(data, tokenizer) marker files of this launch: the same on every rank (torchrun's run id + the agent's pid)."""
    launch = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'single')}-{os.getppid()}"
    return os.path.join(home_dir(), "data", f".ready-{launch}"), os.path.join(home_dir(), f".tok-ready-{launch}")

def _rank0_first(rank, fn, marker):
    """Run fn on rank 0 while the others poll for the file `marker` (no collective, so no process-group timeout),
    then on them; rank 0 writes marker + '.failed' if fn fails."""
    if rank == 0:
        for stale in (marker, marker + ".failed"):
            if os.path.exists(stale):
                os.remove(stale)
        try:
            out = fn()
        except BaseException as e:
            open(marker + ".failed", "w").write(str(e))
            raise
        open(marker, "w").write("ok")
        return out
    while not os.path.exists(marker):
        if os.path.exists(marker + ".failed"):
            raise UserError("rank 0 failed to prepare the data (see its message)")
        time.sleep(1)
    return fn()  # everything is on disk now: fn only reads

def prepare_data(args, rank):
    """-> (train source, val source): lists of documents (shakespeare) or ParquetSources (fineweb)."""
    os.makedirs(os.path.join(home_dir(), "data"), exist_ok=True)
    marker = _markers()[0]
    if args.data == "shakespeare":
        return _rank0_first(rank, lambda: (data.load_corpus("train"), data.load_corpus("val")), marker)
    paths = _rank0_first(rank, lambda: data.download_shards(args.num_shards, base_url=args.data_url,
                                                            checksums=args.checksums), marker)
    return data.ParquetSource(paths[:-1]), data.ParquetSource(paths[-1:])

def prepare_tokenizer(args, rank, train_source):
    """Load $TRITONCHAT_HOME/tokenizer, training one (rank 0) first when it does not exist yet."""
    tok_dir = os.path.join(home_dir(), "tokenizer")

    def load_or_train():
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            # nanochat: the first 2 B characters of FineWeb-Edu, documents capped at 10 000 characters
            docs = train_source if isinstance(train_source, list) else \
                (d for u in range(train_source.num_units()) for d in train_source.read_unit(u))
            print0(f"training a tokenizer with vocab {args.vocab_size} -> {tok_dir}")
            tok = Tokenizer.train(capped_docs(docs, max_chars=2_000_000_000), args.vocab_size)
            tok.save(tok_dir)
        return get_tokenizer(tok_dir)

    return _rank0_first(rank, load_or_train, _markers()[1]), tok_dir

def run(argv=None):
    """Base pretraining -> the loop's summary plus preset, num_params, config, world_size; leaves the group up."""
    args = parse_args(argv)
    kernels.set_mode(args.kernels)
    device_type = None if args.device == "auto" else args.device
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    info = init_distributed(device_type)
    torch.manual_seed(args.seed)
    train_src, val_src = prepare_data(args, info.rank)
    tok, tok_dir = prepare_tokenizer(args, info.rank, train_src)
    try:
        config = GPTConfig.from_depth(args.depth, vocab_size=tok.vocab_size, sequence_len=args.max_seq_len)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = build_model(config, info, compile=args.compile, compile_backend=args.compile_backend)
    barrier()  # every rank is past the marker files now: rank 0 may delete them
    for m in _markers() if info.rank == 0 else ():
        if os.path.exists(m):
            os.remove(m)
    optimizers = stage.setup_optimizers(model, args)
    num_params = model.num_params()
    args.num_iterations = resolve_num_iterations(args, num_params, info.world_size)
    print0(f"model: depth {args.depth}, width {config.n_embd}, heads {config.n_head}, vocab {config.vocab_size}, "
           f"{num_params:,} params, {model.estimate_flops():.3e} FLOPs/token; device {info.device}, "
           f"world {info.world_size}")

    B, T = args.device_batch_size, args.max_seq_len
    mk = lambda src, **kw: TokenLoader(tok, src, B, T, info.rank, info.world_size, info.device, **kw)
    loader, tbytes = mk(train_src), token_bytes(tok)
    eval_steps = max(1, args.eval_tokens // (B * T * info.world_size))

    def eval_fn(model, step):
        return {"val_bpb": evaluate_bpb(model, itertools.islice(mk(val_src, loop=False), eval_steps), tbytes)}

    def sample_fn(model, step):
        model.eval()
        for prompt in SAMPLE_PROMPTS:
            ids = tok.encode(prompt, prepend="<|bos|>")
            out = list(model.generate(ids, max_tokens=args.sample_tokens, temperature=0.0))
            print0(f"sample | {tok.decode(ids[1:] + out)!r}")

    meta = {"config": vars(config).copy(), "tokenizer_dir": tok_dir, "preset": args.preset}
    summary = train("base", model, optimizers, loader, args, eval_fn=eval_fn, sample_fn=sample_fn, meta=meta)
    summary.update(preset=args.preset, num_params=num_params, config=meta["config"], world_size=info.world_size)
    if info.rank == 0:
        os.makedirs(os.path.join(home_dir(), "reports"), exist_ok=True)
        with open(os.path.join(home_dir(), "reports", f"base_{args.run}.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary

def main(argv=None):
    return stage.main(run, argv)

if __name__ == "__main__":
    main()
