"""Checkpoints: model + optimizers (sharded, via torch.distributed.checkpoint) + meta.json, written atomically.

$TRITONCHAT_HOME/checkpoints/<stage>/<run>/step_XXXXXX/ holds the DCP files (*.distcp, .metadata: each rank writes its
shards of {"model", "optim"}; DCP reshards on load, so N ranks' checkpoint loads into M ranks or one plain module) and
meta.json: {"config", "step", "stage", "kernels", "world_size", "loader_states" and "rng_states" (per rank; torch/CUDA
states as base64 bytes, python's and numpy's as JSON numbers, never a pickle), plus what the stage adds}. All is
written into a hidden `.step_XXXXXX.tmp/`, meta.json last, then renamed: a step_* dir is complete or absent. Free disk
space is checked first. save_checkpoint and load_checkpoint are collective; load_model is one process, no FSDP."""
import base64
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.utils._pytree import tree_leaves

from model.common import UserError, dist_info, home_dir
from model.gpt import GPT, GPTConfig
from model.tokenizer import Tokenizer, get_tokenizer

_STEP_RE = re.compile(r"^step_(\d{6,})$")

def checkpoint_dir(stage, run="default"):
    """$TRITONCHAT_HOME/checkpoints/<stage>/<run>/ (holds a step_XXXXXX/ directory per saved step)."""
    return os.path.join(home_dir(), "checkpoints", stage, run)

def step_dir(stage, run, step):
    return os.path.join(checkpoint_dir(stage, run), f"step_{step:06d}")

def _b64(t):
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")

def _unb64(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

def rng_state():
    """This process's RNG states (torch CPU, CUDA, python, numpy) as plain JSON values (data only: resuming never
    runs anything stored in a checkpoint)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": _b64(torch.get_rng_state()), "python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(t) for t in torch.cuda.get_rng_state_all()]
    return state

def set_rng_state(state):
    """Restore what rng_state() returned -> True; another format (an older base64 pickle) is not decoded -> False."""
    if not isinstance(state, dict):
        return False
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(t) for t in state["cuda"]])
    return True

def _state_dicts(model, opts):
    if not opts:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, opts)
    return {"model": model_sd, "optim": optim_sd}

def estimate_checkpoint_bytes(model, optimizers=None):
    """Disk bytes a checkpoint needs: its tensors' global (unsharded) size + 10 % + 1 MiB."""
    return _state_bytes(_state_dicts(model, list(optimizers or [])))

def _state_bytes(state):
    leaves = tree_leaves(state)
    return int(sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor)) * 1.1) + (1 << 20)

def save_checkpoint(path, step, model, optimizers, meta, loader_state=None):
    """Atomically write a checkpoint of `step` to `path` (a step_XXXXXX dir); collective. meta: JSON-serialisable dict
    for meta.json, to which "step", "world_size", "loader_states" and "rng_states" (of every rank) are added."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.tmp")
    info = dist_info()
    rank, world = info.rank, info.world_size
    state = _state_dicts(model, list(optimizers or []))
    gathered = [(loader_state, rng_state())] * world
    if dist.is_initialized():
        dist.all_gather_object(gathered, gathered[0])
    loader_states, rng_states = zip(*gathered)
    ok = [True]
    if rank == 0:
        os.makedirs(parent, exist_ok=True)
        need, free = _state_bytes(state), shutil.disk_usage(parent).free
        ok[0] = free >= need
        if ok[0]:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    if dist.is_initialized():
        dist.broadcast_object_list(ok, src=0)  # an object, not a CPU tensor: works on NCCL too
    if not ok[0]:
        raise UserError(f"not enough disk space for the checkpoint in {parent}: need about {need / 2**30:.2f} GiB, "
                        f"{free / 2**30:.2f} GiB free. Free some space or point $TRITONCHAT_HOME elsewhere."
                        if rank == 0 else "not enough disk space for the checkpoint (see rank 0)")
    try:
        dcp.save(state, checkpoint_id=tmp)
        if rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(dict(meta or {}, step=step, world_size=world, loader_states=loader_states,
                               rng_states=rng_states), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            old = os.path.join(parent, f".{name}.old")
            if os.path.exists(path):  # re-saving the same step: swap the old one out
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_initialized():
        dist.barrier()
    return path

# What a DCP .metadata pickle may name. DCP unpickles it with plain pickle.load, which would run anything a foreign
# checkpoint put there: it is checked first.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                ("collections", "OrderedDict")}

class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = (module, name) in _DCP_GLOBALS or \
            (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)) or \
            (module in _DCP_MODULES and isinstance(getattr(sys.modules.get(module), name, None), type))
        if not allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        return super().find_class(module, name)

def read_meta(path):
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise UserError(f"{path} is not a checkpoint (no meta.json)")
    return json.loads(Path(meta_path).read_text())

def load_checkpoint(path, model, optimizers=None):
    """Load model (and optimizer) state from `path` into the (possibly FSDP-sharded) model; collective -> meta.json.
    UserError when the DCP .metadata pickle names anything but DCP's metadata types (checked before DCP loads it)."""
    meta, opts = read_meta(path), list(optimizers or [])
    state = _state_dicts(model, opts)
    dcp_meta = os.path.join(path, ".metadata")
    if not os.path.exists(dcp_meta):
        raise UserError(f"{path} has no DCP metadata; the checkpoint is incomplete")
    try:
        with open(dcp_meta, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - a foreign or damaged file: one clear line, nothing run
        raise UserError(f"{dcp_meta} is not DCP metadata this code loads ({type(e).__name__}: {e}); "
                        f"refusing to unpickle it") from None
    with warnings.catch_warnings():  # without a process group DCP warns that it loads in one process: as meant
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=path)
    if opts:
        set_state_dict(model, opts, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
    return meta

def find_last_checkpoint(stage, run=None):
    """Newest complete step_* dir of `run` (default: the most recently modified run of the stage), or None."""
    stage_dir = Path(home_dir(), "checkpoints", stage)
    if run is None:
        runs = [d for d in stage_dir.glob("[!.]*") if d.is_dir()]  # none without a stage_dir
        if not runs:
            return None
        run = max(runs, key=os.path.getmtime).name
    steps = [(int(m.group(1)), str(p.parent)) for p in (stage_dir / run).glob("step_*/meta.json")
             if (m := _STEP_RE.match(p.parent.name))]
    return max(steps)[1] if steps else None

def load_model(stage, device="cpu", run=None, path=None):
    """(model, tokenizer, meta) from the newest checkpoint of `stage` (or `path`): a plain fp32 GPT in eval mode on
    `device`, and load_tokenizer(meta) (None when there is none yet: the caller may bring its own)."""
    path = path or find_last_checkpoint(stage, run)
    if path is None:
        raise UserError(f"no {stage} checkpoint found under {os.path.join(home_dir(), 'checkpoints', stage)}; "
                        f"train the {stage} stage first")
    meta = read_meta(path)
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["config"]))
    model.to_empty(device=device)
    model.init_weights()  # also fills the non-persistent rotary buffers
    load_checkpoint(path, model)
    model.eval()
    try:
        tokenizer = load_tokenizer(meta)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, meta

def load_tokenizer(meta):
    """The tokenizer of meta["tokenizer_dir"] when it still exists, else of $TRITONCHAT_HOME/tokenizer."""
    tok_dir = meta.get("tokenizer_dir")
    return Tokenizer.load(tok_dir) if tok_dir and os.path.isdir(tok_dir) else get_tokenizer()
