"""The order a real dataset's rows are presented in: a seeded permutation of the whole split, so that any prefix of
a task (`--max-examples 100`, `mmlu@500` in a mixture, the first prompts of an RL run) is a seeded sample of the
whole set, the same on every run and every rank.

The permutation is numpy.random.default_rng(42).permutation(n), which is what Hugging Face's
`Dataset.shuffle(seed=42)` applies; nanochat's tasks load every split that way
(https://github.com/karpathy/nanochat/blob/master/tasks/mmlu.py), so the same file gives nanochat's order.
"""
import numpy as np

SEED = 42


def permutation(n, seed=SEED):
    """list of the n indices 0..n-1 in the seeded order."""
    return np.random.default_rng(seed).permutation(n).tolist()


def seeded_order(rows, seed=SEED):
    """The rows (a list) in the seeded order: rows[permutation(len(rows))[i]] at position i."""
    return [rows[i] for i in permutation(len(rows), seed)]
