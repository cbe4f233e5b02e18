"""Worker for tests/test_distributed.py: run as a single process or under torchrun (gloo, CPU, fp32).

    python tests/_dist_worker.py OUT.pt                          # world size 1 (in-memory process group)
    torchrun --nproc_per_node=2 tests/_dist_worker.py OUT.pt     # two ranks

Rank 0 writes OUT.pt with: the logits of a forward at init on a fixed batch, the global losses of a few training
steps of an FSDP2 tiny GPT (each rank its slice of the same global batch), the full parameters afterwards, the
number of matrices each rank orthogonalised, and the result of a sharded Muon on odd matrix shapes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.common import full  # noqa: E402
from model.gpt import GPTConfig  # noqa: E402
from train.distributed import build_model, cleanup, init_distributed  # noqa: E402
from model.optim import Muon, muon_momentum  # noqa: E402

CONFIG = dict(sequence_len=16, vocab_size=67, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
STEPS, BATCH = 4, 4
# Odd shapes: uneven dim-0 shards (5 rows over 2 ranks = 3 + 2), an empty shard (1 row), groups of 3/1/1 matrices.
MUON_SHAPES = [(5, 3), (5, 3), (5, 3), (1, 4), (7, 4), (3, 8)]

def muon_case():
    """Sharded Muon on MUON_SHAPES, 3 steps with fresh gradients; returns (initial, grads, final) full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g) for s in MUON_SHAPES]
    grads = [[torch.randn(s, generator=g) for s in MUON_SHAPES] for _ in range(3)]
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)], src_data_rank=None)) for t in init]
    opt = Muon(params, lr=0.1, momentum=0.9)
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = distribute_tensor(gr.clone(), mesh, [Shard(0)], src_data_rank=None)
        opt.step()
    return init, grads, [p.detach().full_tensor() for p in params], opt.ns_matrices

def main():
    out = sys.argv[1]
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    torch.manual_seed(0)
    model = build_model(GPTConfig(**CONFIG), info)
    optimizers = model.setup_optimizers()
    muon = optimizers[1]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, CONFIG["vocab_size"], (BATCH, CONFIG["sequence_len"] + 1), generator=g)
               for _ in range(STEPS)]
    with torch.no_grad():
        logits0 = model(batches[0][:, :-1]).detach().clone()
    per_rank = BATCH // world
    losses = []
    for step, batch in enumerate(batches):
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        rows = batch[rank * per_rank:(rank + 1) * per_rank]
        loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    params = {n: full(p).detach() for n, p in model.named_parameters()}
    ns_counts = [None] * world
    dist.all_gather_object(ns_counts, muon.ns_matrices)
    m_init, m_grads, m_final, m_count = muon_case()
    m_counts = [None] * world
    dist.all_gather_object(m_counts, m_count)
    if rank == 0:
        torch.save(dict(world=world, logits0=logits0, losses=losses, params=params, ns_counts=ns_counts,
                        muon=dict(init=m_init, grads=m_grads, final=m_final, counts=m_counts)), out)
    cleanup()

if __name__ == "__main__":
    main()
