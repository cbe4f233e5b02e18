"""Optimizers: Muon for the 2-D block matrices, AdamW for the embedding and lm_head (nanochat's split).

Muon (MomentUm Orthogonalized by Newton-Schulz), per matrix W with gradient G:
    buf = momentum * buf + (1 - momentum) * G                  # momentum (as a lerp)
    U   = (1 - momentum) * G + momentum * buf                  # Nesterov look-ahead
    O   = newton_schulz(U)                                      # ~ U V^T of the SVD: all singular values ~ 1
    W  -= lr * max(1, rows/cols)^0.5 * O
Newton-Schulz (kernels.newton_schulz) runs in bf16 on CUDA as nanochat, fp32 on CPU. Under FSDP2 (sharded on dim 0)
the momentum update runs on the local shard; Newton-Schulz needs whole matrices, so matrix i (counted over all param
groups) is owned by rank i % W: per group one async all_to_all sends the shards to their owners, which orthogonalise
theirs in ONE batched call, and a second sends the results back.
"""
import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard

from kernels.newton_schulz import newton_schulz
from model.common import local

def muon_momentum(step, warmup_steps=300, start=0.85, end=0.95):
    """nanochat's Muon momentum warmup: linear from `start` to `end` over the first `warmup_steps` steps."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end

def make_adamw(param_groups, weight_decay=0.0):
    """nanochat's AdamW for embedding and lm_head: betas (0.8, 0.95), eps 1e-10, fused on CUDA; DTensors welcome."""
    fused = local(next(p for g in param_groups for p in g["params"])).device.type == "cuda"
    return torch.optim.AdamW(param_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, fused=fused)

class Muon(torch.optim.Optimizer):
    """Muon over 2-D plain tensors or FSDP2 DTensors sharded on dim 0, one param group per matrix shape (lr, momentum,
    nesterov, ns_steps). `ns_matrices` counts the matrices this rank has orthogonalised (~1/W of them under W ranks)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        by_shape = {}
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon: only 2-D matrices are supported, got a parameter of shape {tuple(p.shape)}; "
                                 "put embeddings, vectors and scalars in AdamW")
            by_shape.setdefault(tuple(p.shape), []).append(p)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__([dict(params=ps) for ps in by_shape.values()], defaults)
        self.ns_matrices = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Each group's job is a generator that stops at its communication points; driving all groups stage by stage
        # lets one group's all_to_all run while another group is orthogonalised.
        jobs, base = [], 0
        for group in self.param_groups:
            params = group["params"]
            if any(p.grad is not None for p in params):
                updates = [self._momentum_update(p, group) for p in params]
                jobs.append((group, self._orthogonalize(params, updates, group["ns_steps"], base)))
            base += len(params)  # owners continue round-robin across groups, so small groups spread over ranks
        for _ in range(2):  # stage 1: shards sent to their owners; 2: owners orthogonalise, results sent back (async)
            for _, job in jobs:
                next(job)
        for group, job in jobs:
            outs = next(job)  # stage 3: this rank's rows of every orthogonalised matrix
            for p, o in zip(group["params"], outs):
                local(p).add_(o.to(p.dtype), alpha=-group["lr"] * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
        return loss

    def _momentum_update(self, p, group):
        """Elementwise on the local shard -> the (local) Nesterov update."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)  # a DTensor for a DTensor param: checkpoints shard it
        buf = local(state["momentum_buffer"])
        g = local(p.grad) if p.grad is not None else torch.zeros_like(buf)
        buf.lerp_(g, 1 - group["momentum"])
        return g.lerp(buf, group["momentum"]) if group["nesterov"] else buf.clone()

    def _ns(self, x, steps):
        """One batched Newton-Schulz call on (k, rows, cols), counted by the spy."""
        self.ns_matrices += x.size(0)
        return newton_schulz(x, steps=steps)

    def _orthogonalize(self, params, updates, steps, base):
        """Generator over the three stages of step(); finally yields the local orthogonalised updates."""
        p0 = params[0]
        ns_dtype = torch.bfloat16 if updates[0].device.type == "cuda" else torch.float32
        mesh = getattr(p0, "device_mesh", None)
        if mesh is None or mesh.size() == 1:  # every matrix is whole here: one batched call, no communication
            yield
            yield
            yield self._ns(torch.stack([u.to(ns_dtype) for u in updates]), steps).unbind(0)
            return
        if mesh.ndim != 1 or tuple(p0.placements) != (Shard(0),):
            raise ValueError(f"Muon: expected parameters sharded on dim 0 over a 1-D mesh (FSDP2), "
                             f"got placements {p0.placements} on a {mesh.ndim}-D mesh")
        pg = mesh.get_group()
        W, r = dist.get_world_size(pg), dist.get_rank(pg)
        (rows, cols), n = p0.shape, len(params)
        P = -(-rows // W)                 # shard rows (torch.chunk), padded to equal size in the buffers
        my_rows = max(0, min(P, rows - r * P))
        # matrix i (global index base + i) is owned by rank (base + i) % W and sits in slot (base % W + i) // W
        owner = [(base + i) % W for i in range(n)]
        slot = [(base % W + i) // W for i in range(n)]
        k = slot[-1] + 1                  # slots per owner in the buffers
        mine = [slot[i] for i in range(n) if owner[i] == r]   # a contiguous range of slots
        lo, hi = (mine[0], mine[-1] + 1) if mine else (0, 0)

        # send[o, j] = my shard of the matrix that rank o owns in slot j
        send = torch.zeros(W, k, P, cols, dtype=ns_dtype, device=updates[0].device)
        for i, u in enumerate(updates):
            send[owner[i], slot[i], :my_rows] = u
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=pg, async_op=True)
        yield
        work.wait()
        # recv[s, j] = rank s's shard of my matrix in slot j -> my full matrices (hi - lo, rows, cols)
        full = recv[:, lo:hi].permute(1, 0, 2, 3).reshape(hi - lo, W * P, cols)[:, :rows]
        back = torch.zeros(k, W * P, cols, dtype=ns_dtype, device=send.device)
        if hi > lo:
            back[lo:hi, :rows] = self._ns(full, steps)
        back = back.view(k, W, P, cols).permute(1, 0, 2, 3).contiguous()  # back[s, j] = rank s's rows
        out = torch.empty_like(back)
        work = dist.all_to_all_single(out, back, group=pg, async_op=True)
        yield
        work.wait()
        # out[o, j] = my rows of the matrix rank o owns in slot j
        yield [out[owner[i], slot[i], :my_rows] for i in range(n)]
