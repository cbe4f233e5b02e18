"""Small shared helpers: where artifacts live, rank-0 printing, the compute device."""
import os

import torch
import torch.distributed as dist


class UserError(RuntimeError):
    """Bad input the user can fix (unknown preset, missing checkpoint, no disk space, corrupt shard, ...).
    Entry points print its message alone, without a traceback, and exit with status 2."""


def home_dir():
    """$TRITONCHAT_HOME (default ~/.cache/tritonchat): tokenizer/, data/, checkpoints/<stage>/<run>/, reports/."""
    path = os.environ.get("TRITONCHAT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tritonchat")
    os.makedirs(path, exist_ok=True)
    return path


def is_rank0():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


def default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
