"""Midtraining: continue the base model on conversations, teaching the special tokens, the python tool and the
multiple-choice format (nanochat: SmolTalk + MMLU auxiliary_train + GSM8K,
https://github.com/karpathy/nanochat/blob/master/scripts/mid_train.py).

    python -m train.mid --preset tiny                                    # from the newest base checkpoint
    torchrun --nproc_per_node=8 -m train.mid -- --preset d20 [--data-url URL]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m train.mid -- --preset tiny --num-iterations 3

Rendered conversations are packed into (B, T+1) rows like base training (train.data.PackedLoader); every token is a
target, as in nanochat's first release. Same loop, FSDP2, checkpoints and --resume as every stage (train/loop.py);
the recipe is SFT's with the packed loader (train.stage.train_on_mixture).
"""
from train import stage
from train.data import PackedLoader

# tiny = CPU minutes on the embedded tasks; d20 = nanochat's mixture on the real datasets, with base's sequences per
# GPU (device_batch_size None = train.stage.D20_DEVICE_BATCH: 32 fused, 16 eager; the same shapes as base's d20).
PRESETS = {
    "tiny": dict(tasks="arithmetic,spelling,identity,number_mc", num_iterations=80, device_batch_size=8,
                 eval_every=0, val_batches=4),
    "d20": dict(tasks="smoltalk,mmlu_aux@100000,gsm8k,identity@1000,spelling@20000", num_iterations=-1,
                device_batch_size=None, total_batch_size=524288, eval_every=150, val_batches=20),
}

parse_args, run, main = stage.mixture_stage("mid", PRESETS, PackedLoader, __doc__)

if __name__ == "__main__":
    main()
