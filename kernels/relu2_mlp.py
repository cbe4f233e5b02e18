"""Fused ReLU^2 MLP: relu(x W_fc^T)^2 W_proj^T.

Contract (DESIGN.md): relu2_mlp(x, w_fc, w_proj): x (..., C), w_fc (F, C), w_proj (C, F) -> (..., C).
The Triton kernel lands with its own issue; until then fused mode raises NotImplementedError.
"""
import torch
import torch.nn.functional as F

import kernels


def relu2_mlp(x, w_fc, w_proj):
    if kernels.use_fused():
        raise NotImplementedError("kernels.relu2_mlp: the fused Triton ReLU^2 MLP kernel is not implemented yet; "
                                  "use --kernels eager")
    return reference_relu2_mlp(x, w_fc, w_proj)


def reference_relu2_mlp(x, w_fc, w_proj):
    h = F.linear(x, w_fc)            # (..., F)
    return F.linear(F.relu(h).square(), w_proj)  # (..., C)
