"""Midtraining: continue the base model on conversations, teaching the special tokens, the python tool and the
multiple-choice format (nanochat: SmolTalk + MMLU auxiliary_train + GSM8K).

    python -m train.mid --preset tiny                                    # from the newest base checkpoint
    torchrun --nproc_per_node=8 -m train.mid --preset d20 [--data-url URL]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m train.mid --preset tiny --num-iterations 3

Rendered conversations are packed into (B, T+1) rows like base training (train.sft.PackedLoader); every token is a
target, as in nanochat's first release. Same loop, FSDP2, checkpoints and --resume as every stage (train/loop.py);
the plumbing is shared with SFT (train.sft.run_stage). Presets: train.sft.PRESETS["tiny"|"d20"]["mid"].
"""
from train.sft import run_stage


def main(argv=None):
    from train.loop import run_main
    return run_main(lambda: run_stage("mid", argv))


if __name__ == "__main__":
    main()
