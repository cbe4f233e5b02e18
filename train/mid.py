"""Midtraining: continue the base model on conversations, teaching the special tokens, the python tool and the
multiple-choice format (https://github.com/karpathy/nanochat/blob/master/scripts/mid_train.py); conversations are
packed into (B, T+1) rows like base training (train.data.PackedLoader), every token a target.

    python -m train.mid --preset tiny                                    # from the newest base checkpoint
    torchrun --nproc_per_node=8 -m train.mid -- --preset d20 [--data-url URL]
"""
from train import stage
from train.data import PackedLoader

# d20: base's sequences per GPU (device_batch_size None = train.stage.D20_DEVICE_BATCH)
PRESETS = {
    "tiny": dict(tasks="arithmetic,spelling,identity,number_mc", num_iterations=80, device_batch_size=8,
                 eval_every=0, val_batches=4),
    "d20": dict(tasks="smoltalk,mmlu_aux@100000,gsm8k,identity@1000,spelling@20000", num_iterations=-1,
                device_batch_size=None, total_batch_size=524288, eval_every=150, val_batches=20),
}

parse_args, run, main = stage.mixture_stage("mid", PRESETS, PackedLoader, __doc__)

if __name__ == "__main__":
    main()
