"""Supervised fine-tuning from the newest mid checkpoint, as nanochat's chat_sft
(https://github.com/karpathy/nanochat/blob/master/scripts/chat_sft.py): one conversation per row (train.data.SFTLoader),
truncated to sequence_len + 1 tokens and right-padded; loss only on assistant tokens (mask 1); rows with none skipped.

    python -m train.sft --preset tiny
    torchrun --nproc_per_node=8 -m train.sft -- --preset d20             # ARC-E/C + GSM8K + SmolTalk 10k
"""
from train import stage
from train.data import SFTLoader

# d20: 4 conversations per GPU, no accumulation: 32 a step on 8 GPUs, as nanochat's chat_sft
PRESETS = {
    "tiny": dict(tasks="arithmetic,spelling,identity:0.5,number_mc", num_iterations=60, device_batch_size=8,
                 eval_every=0, val_batches=4),
    "d20": dict(tasks="arc_easy,arc_challenge,gsm8k,smoltalk@10000,identity@300,spelling@300", num_iterations=-1,
                device_batch_size=4, total_batch_size=-1, eval_every=100, val_batches=20),
}

parse_args, run, main = stage.mixture_stage("sft", PRESETS, SFTLoader, __doc__)

if __name__ == "__main__":
    main()
