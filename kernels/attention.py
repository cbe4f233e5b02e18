"""Fused RoPE + QK-norm flash attention.

Contract (DESIGN.md): fused_attention(q, k, v, cos, sin, *, causal=True, qk_norm=True, eps=1e-6, scale=None)
  q (B, T, H, D), k and v (B, T, Hkv, D) with H % Hkv == 0, cos and sin (T, D/2) -> (B, T, H, D).
Per head: rotate (x1, x2 = halves of D; y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos), RMS-normalise q and k over D
(no weight), then softmax(q k^T * scale [causal]) v, scale = 1/sqrt(D) by default.

The Triton kernel lands with its own issue; until then fused mode raises NotImplementedError.
"""
import math

import torch
import torch.nn.functional as F

import kernels


def fused_attention(q, k, v, cos, sin, *, causal=True, qk_norm=True, eps=1e-6, scale=None):
    if kernels.use_fused():
        raise NotImplementedError("kernels.attention: the fused Triton attention kernel is not implemented yet; "
                                  "use --kernels eager")
    return reference_attention(q, k, v, cos, sin, causal=causal, qk_norm=qk_norm, eps=eps, scale=scale)


# ----------------------------------------------------------------------------------------------------------------
# Reference: readable eager PyTorch, the ground truth.

def apply_rotary(x, cos, sin):
    """x (B, T, H, D), cos/sin (T, D/2) -> x rotated by position (half-split convention)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def rms_norm(x, eps=1e-6):
    """RMSNorm over the last dim without a learned weight."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def reference_attention(q, k, v, cos, sin, *, causal=True, qk_norm=True, eps=1e-6, scale=None):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"attention: n_head {H} must be a multiple of n_kv_head {Hkv}")
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if qk_norm:
        q, k = rms_norm(q, eps), rms_norm(k, eps)
    # SDPA wants (B, H, T, D); enable_gqa maps each query head to its KV head without copying K/V.
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal and T > 1, scale=scale if scale is not None else 1 / math.sqrt(D),
                                       enable_gqa=H != Hkv)
    return y.transpose(1, 2)
