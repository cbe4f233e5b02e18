"""Supervised fine-tuning on conversations: loss only on the assistant tokens the tokenizer's mask marks (mask == 1).

    python -m train.sft --preset tiny                                    # from the newest mid checkpoint
    torchrun --nproc_per_node=8 -m train.sft -- --preset d20             # ARC-E/C + GSM8K + SmolTalk 10k
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m train.sft -- --preset tiny --num-iterations 3

One conversation per row (train.data.SFTLoader), truncated to sequence_len + 1 tokens and right-padded:
y = ids[1:] with -1 wherever the target token has mask 0 (user turns, tool output, the <|bos|>/<|user_start|>...
scaffolding) and on the padding, so padding never contributes to the loss. Rows whose targets would all be masked
are skipped. The model starts from the newest mid checkpoint; the task mixture runs through the shared loop
(train/loop.py: FSDP2, checkpoints, exact --resume, eager or fused kernels), as nanochat's chat_sft
(https://github.com/karpathy/nanochat/blob/master/scripts/chat_sft.py).
"""
from train import stage
from train.data import SFTLoader

# tiny = CPU minutes on the embedded tasks; d20 = nanochat's mixture on the real datasets, 4 conversations per GPU and
# no accumulation: 32 a step on 8 GPUs, as nanochat's chat_sft (device_batch_size 4, target_examples_per_step 32).
PRESETS = {
    "tiny": dict(tasks="arithmetic,spelling,identity:0.5,number_mc", num_iterations=60, device_batch_size=8,
                 eval_every=0, val_batches=4),
    "d20": dict(tasks="arc_easy,arc_challenge,gsm8k,smoltalk@10000,identity@300,spelling@300", num_iterations=-1,
                device_batch_size=4, total_batch_size=-1, eval_every=100, val_batches=20),
}

parse_args, run, main = stage.mixture_stage("sft", PRESETS, SFTLoader, __doc__)

if __name__ == "__main__":
    main()
