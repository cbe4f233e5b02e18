"""Process group setup and FSDP2 model construction (stages run under `torchrun ... -m train.<stage> -- <flags>`).

One code path for every world size: without torchrun a process still gets a 1-rank group (in-memory HashStore) and
an FSDP2 model, so optimizers, checkpoints and the loop always see DTensors; only on one CPU rank the root's wte and
lm_head stay plain (build_model's shard_root). On CUDA FSDP2 computes in bf16 (fp32 master weights and gradient
reduction); on CPU everything stays fp32.

Compile (as torchtitan's apply_compile, torchtitan/models/llama3/infra/parallelize.py): each block's forward and the
root's embedding and head are compiled separately with fullgraph=True, then sharded, so FSDP2's hooks run eagerly
between graphs, never inside one (compiling the whole sharded model breaks at every hook). GPT.generate runs eager.
"""
import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model.common import DistInfo, print0
from model.gpt import GPT

def init_distributed(device_type=None):
    """Initialise (or reuse) the default process group (NCCL on CUDA, gloo on CPU; without torchrun a 1-rank HashStore
    group) -> DistInfo of this rank. device_type: "cuda" | "cpu" | None (= cuda when available)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"init_distributed: device_type must be 'cuda' or 'cpu', got {device_type!r}")
    cuda = device_type == "cuda"
    is_dist = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"init_distributed: CUDA on LOCAL_RANK {local_rank} but {torch.cuda.device_count()} "
                               "GPUs visible; use device_type='cpu' or launch at most one process per GPU")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if is_dist:  # env:// rendezvous from torchrun
            dist.init_process_group(backend, device_id=device if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"init_distributed: process group has {dist.get_world_size()} ranks, "
                           f"WORLD_SIZE says {world_size}")
    return DistInfo(is_dist, rank, local_rank, world_size, device)

COMPILE_CHOICES = ("auto", "on", "off")

def compile_enabled(value, device):
    """--compile value ("on" | "off" | "auto", or a bool) and the training device -> bool. auto = on with CUDA only
    (on CPU inductor builds C++ per graph: minutes of compile for a model that trains in seconds)."""
    if isinstance(value, bool):
        return value
    if value not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)} or a bool, got {value!r}")
    return value == "on" or (value == "auto" and torch.device(device).type == "cuda")

def apply_compile(model, backend="inductor"):
    """Compile a GPT in place, part by part, each with fullgraph=True: every block (nn.Module.compile: parameter names
    and state dicts do not change) and the root's embed / head_loss / head_logits. Call it before fully_shard or on a
    plain model. backend: "inductor", or "aot_eager" for CPU smoke runs (no C++ build, no speed-up) -> the model."""
    # Inductor may return a block's output as a view, which FSDP2 warns about; GPT.forward never modifies it in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
    for block in model.transformer.h:
        block.compile(backend=backend, fullgraph=True)
    for name in ("embed", "head_loss", "head_logits"):
        setattr(model, name, torch.compile(getattr(model, name), backend=backend, fullgraph=True))
    return model

def build_model(config, dist_info, compile=False, compile_backend="inductor", shard_root=None):
    """GPT(config) sharded with FSDP2 over all ranks and initialised (identical weights for any world size). compile:
    see compile_enabled; when on, apply_compile(model, compile_backend) before sharding. shard_root: FSDP2 manages the
    root's wte and lm_head (True), leaves them plain tensors (False), or None: managed unless on one CPU rank."""
    device = dist_info.device
    if not dist.is_initialized():
        raise RuntimeError("build_model: call init_distributed() first")
    with torch.device("meta"):
        model = GPT(config)
    if compile_enabled(compile, device):
        apply_compile(model, compile_backend)
        print0(f"torch.compile ({compile_backend}): {config.n_layer} blocks, embedding, head")
    mesh = init_device_mesh(device.type, (dist_info.world_size,))
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # The root keeps wte + lm_head gathered from a training forward to its backward (no second all-gather);
    # _reshard_root drops any other gathered copy, so none outlives an optimizer step.
    if shard_root is None:
        shard_root = dist_info.world_size > 1 or device.type == "cuda"
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False,
                ignored_params=None if shard_root else {model.transformer.wte.weight, model.lm_head.weight})
    if shard_root:
        model.register_forward_pre_hook(_reshard_root, prepend=True)  # before FSDP2's own pre-forward
        model.register_forward_hook(_reshard_root)  # after FSDP2's own post-forward
    model.to_empty(device=device)
    model.init_weights()
    return model

def _reshard_root(model, args, output=None):
    """Reshard a gathered root (plain tensors): before a forward, and after one without grad (no backward will)."""
    if not isinstance(model.lm_head.weight, DTensor) and (output is None or not torch.is_grad_enabled()):
        model.reshard()

def cleanup():
    """Destroy the process group (safe to call when none exists)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
