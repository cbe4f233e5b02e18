"""Process group setup and FSDP2 model construction, in one place.

    python -m train.base ...                               # single process (CPU or one GPU)
    torchrun --nproc_per_node=8 -m train.base -- ...       # one process per GPU (NCCL); stage flags after --
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 -m train.base -- --preset tiny   # CPU, gloo

One code path for every world size: without torchrun a process still gets a process group (world size 1, an
in-memory HashStore, no port) and the model is sharded with FSDP2 as under torchrun, so parameters are always
DTensors after build_model and optimizers, checkpoints and the loop see the same types. The price on one rank: FSDP2
copies every parameter in before its forward and every gradient out after its backward (nothing to shard). On one
CPU rank the root's wte and lm_head, the largest matrices (at depth 4 with a 65 536 vocabulary ten times the blocks),
therefore stay plain tensors (build_model's shard_root): the blocks stay FSDP2-sharded DTensors.

build_model: GPT on the meta device -> [apply_compile] -> fully_shard every block, then the root -> to_empty(device)
-> init_weights(). On CUDA FSDP2's MixedPrecisionPolicy computes in bf16 (params gathered in bf16, gradients reduced
in fp32, fp32 master weights); on CPU everything stays fp32 (the Triton interpreter and cross-world-size tests).

Compile (as torchtitan's apply_compile, torchtitan/models/llama3/infra/parallelize.py): each block's forward and the
root's embedding and head (final norm + lm_head + softcap + loss) are compiled separately with fullgraph=True, then
sharded. FSDP2's hooks run eagerly between those graphs, never inside one, so there is no graph break (compiling the
whole sharded model instead breaks at every hook and leaves the head uncompiled). The blocks share one graph; eval
without grad adds one entry per part; GPT.generate runs uncompiled (every token changes the shape).
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
    """Initialise (or reuse) the default process group and pick this rank's device -> DistInfo.

    device_type: "cuda" | "cpu" | None (= cuda when available). NCCL on CUDA, gloo on CPU. Without torchrun this
    creates a 1-rank group (HashStore, no network). Idempotent: an existing group is reused."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"init_distributed: device_type must be 'cuda' or 'cpu', got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("init_distributed: CUDA requested but no GPU is visible; use device_type='cpu'")
    is_dist = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"init_distributed: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs; "
                               "launch at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if is_dist:
            kwargs = dict(device_id=device) if device_type == "cuda" else {}
            dist.init_process_group(backend, **kwargs)  # env:// rendezvous from torchrun
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"init_distributed: process group has {dist.get_world_size()} ranks, "
                           f"WORLD_SIZE says {world_size}")
    return DistInfo(is_dist, rank, local_rank, world_size, device)


COMPILE_CHOICES = ("auto", "on", "off")


def compile_enabled(value, device):
    """--compile value ("on" | "off" | "auto", or a bool) and the training device -> bool. auto = on with CUDA, off
    on CPU (inductor builds C++ per graph there: minutes of compile for a model that trains in seconds)."""
    if isinstance(value, bool):
        return value
    if value not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)} or a bool, got {value!r}")
    return value == "on" or (value == "auto" and torch.device(device).type == "cuda")


def apply_compile(model, backend="inductor"):
    """Compile a GPT in place, part by part: every block (nn.Module.compile, so parameter names and state dicts do
    not change) and the root's embed / head_loss / head_logits functions, each with fullgraph=True (a graph break
    raises). Call it before fully_shard (torchtitan's order) or on a plain model. backend: "inductor" (the
    default), or "aot_eager" for CPU smoke runs and tests (traced and differentiated, then run op by op: no C++
    build, no speed-up). Returns the model."""
    kwargs = dict(backend=backend, fullgraph=True)
    # Inductor may hand a block's output back as a view of its buffer; FSDP2 then warns that an in-place op on it
    # would skip the pre-backward all-gather. GPT.forward never writes into a block's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
    for block in model.transformer.h:
        block.compile(**kwargs)
    model.embed = torch.compile(model.embed, **kwargs)
    model.head_loss = torch.compile(model.head_loss, **kwargs)
    model.head_logits = torch.compile(model.head_logits, **kwargs)
    return model


def build_model(config, dist_info, compile=False, compile_backend="inductor", shard_root=None):
    """GPT(config) sharded with FSDP2 over all ranks and initialised; identical weights for any world size.
    compile: "on" | "off" | "auto" | bool (see compile_enabled); when on, apply_compile(model, compile_backend)
    before sharding. shard_root: FSDP2 manages the root's wte and lm_head (True), leaves them plain tensors (False),
    or None: managed unless this is one CPU rank, where FSDP2 has neither a shard to make nor a bf16 cast to do for
    them and would only copy the two largest matrices in and their gradients out every step."""
    device = dist_info.device
    if not dist.is_initialized():
        raise RuntimeError("build_model: call init_distributed() first")
    with torch.device("meta"):
        model = GPT(config)
    if compile_enabled(compile, device):
        apply_compile(model, compile_backend)
        print0(f"torch.compile ({compile_backend}): {config.n_layer} blocks, embedding, head")
    mesh = init_device_mesh(device.type, (dist_info.world_size,))
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()  # fp32 throughout on CPU
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # The root keeps wte + lm_head gathered from a training forward to its backward (FSDP2's default for a root): no
    # second all-gather of the largest parameters in every backward; the backward reshards them. Forwards without
    # grad (eval, sampling) reshard at once, so that outside a training step the module always holds its shards
    # (optimizers and checkpoints see DTensors) and a gathered copy never outlives an optimizer step; a forward
    # that still finds them gathered (a training forward without backward) drops them and gathers fresh shards.
    if shard_root is None:
        shard_root = dist_info.world_size > 1 or device.type == "cuda"
    root_params = {model.transformer.wte.weight, model.lm_head.weight}
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False,
                ignored_params=None if shard_root else root_params)
    if shard_root:
        model.register_forward_pre_hook(_root_pre_forward, prepend=True)  # before FSDP2's own pre-forward
        model.register_forward_hook(_root_post_forward)  # after FSDP2's own post-forward
    model.to_empty(device=device)
    model.init_weights()
    return model


def _root_gathered(model):
    return not isinstance(model.lm_head.weight, DTensor)  # gathered: a plain tensor; sharded: the DTensor shard


def _root_pre_forward(model, args):
    """Drop root parameters left gathered by a forward without backward (an optimizer step may have followed)."""
    if _root_gathered(model):
        model.reshard()


def _root_post_forward(model, args, output):
    """Without grad there is no backward to reshard the root: reshard now."""
    if not torch.is_grad_enabled() and _root_gathered(model):
        model.reshard()


def cleanup():
    """Destroy the process group (safe to call when none exists)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
