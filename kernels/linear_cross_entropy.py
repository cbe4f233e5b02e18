"""Fused linear + softcap + cross-entropy: the LM head's loss without ever holding the (tokens x vocab) logits.

linear_cross_entropy(h, w, targets, *, softcap=15.0, ignore_index=-1, reduction="mean", chunk_size=None): h (N, C),
w (V, C) (nn.Linear layout), targets (N,) int64 in [0, V) or ignore_index -> fp32 scalar ("mean", "sum") or (N,)
("none", 0 at ignored rows); differentiable w.r.t. h and w. softcap=None: no cap; chunk_size: tokens per chunk.
All targets ignored: "mean" returns 0 with zero gradients (F.cross_entropy alone gives 0/0 = nan).

Maths, for token i and vocab entry j, c = softcap:
    z = h w^T                  GEMM in the input dtype with fp32 accumulation (exactly nn.Linear's)
    t = tanh(z / c),  s = c t  in fp32 (nanochat's logit softcap)
    loss_i = logsumexp_j s_ij - s_i,target_i            0 where target_i == ignore_index
    "mean": sum_i loss_i / n_valid, n_valid = #(targets != ignore_index);  "sum": sum_i loss_i
    dz_ij = (softmax(s_i)_j - [j == target_i]) (1 - t_ij^2) g_i       g_i = 1/n_valid ("mean"), 1 ("sum"),
                                                                       grad_output_i ("none"); 0 at ignored rows
    dh = dz w  (N, C),   dw = dz^T h  (V, C)
Per chunk of tokens: z = h w^T (cuBLAS, one reused (chunk, V) buffer); `_softcap_ce_kernel`, a program per token,
sums exp(s - c) in fp32 (s <= c: no running max; without a cap an online max) -> loss_i and overwrites z with dz;
dh = dz w, dw += dz^T h (cuBLAS, fp32 across chunks). "mean"/"sum" compute the gradients in the forward (as
Liger-Kernel) and the backward scales them; "none" reruns the chunks. Nothing N x V is saved.

References:
  Liger-Kernel, fused linear cross-entropy (gradients in the forward, chunked over tokens):
    https://github.com/linkedin/Liger-Kernel/blob/main/src/liger_kernel/ops/fused_linear_cross_entropy.py
  E. Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024: https://arxiv.org/abs/2411.09009
  nanochat's softcapped loss: https://github.com/karpathy/nanochat/blob/master/nanochat/gpt.py
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels
from kernels._common import INTERPRET, check_floats, kernel_op

REDUCTIONS = ("mean", "sum", "none")

# interpreter: 128-wide tiles test the multi-tile loop at V ~ 300; GPU: 8 contiguous bf16 (16 B) per thread and load
_BLOCK_V, _NUM_WARPS = (128, 4) if INTERPRET else (2048, 8)

# logits buffer <= 2^28 elements (512 MiB bf16), >= 1024 tokens (at ~500 adding dz^T h to dw costs as much as the GEMMs)
_CHUNK_ELEMENTS = 1 << 28
_MIN_CHUNK = 1024

@triton.jit
def _tanh(x):
    # Triton has no portable tanh (libdevice's is CUDA-only); e in (0, 1] never overflows; error ~1e-7
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)

@triton.jit
def _softcap_ce_kernel(z_ptr, stride_z, tgt_ptr, loss_ptr, scale_ptr, stride_scale, V, softcap, ignore_index,
                       HAS_SOFTCAP: tl.constexpr, GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One token per program: z (M, V) logits, targets (M,), loss (M,) fp32 out. GRAD: overwrite z with
    dz = (softmax(s) - onehot) * ds/dz * scale[row * stride_scale]."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    cols = tl.arange(0, BLOCK_V)
    # pass 1: log-sum-exp of s over the row
    if HAS_SOFTCAP:
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane sums of exp(s - c): one reduction at the end
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(z_row + offs, mask=offs < V, other=0.0).to(tl.float32)
            s = softcap * _tanh(z / softcap)
            acc += tl.where(offs < V, tl.exp(s - softcap), 0.0)
        lse = softcap + tl.log(tl.sum(acc, axis=0))
    else:
        m, d = float("-inf"), 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            s = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(s, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
    z_t = tl.load(z_row + tl.where(valid, tgt, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        z_t = softcap * _tanh(z_t / softcap)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))
    # pass 2: dz in place of z
    if GRAD:
        g = tl.where(valid, tl.load(scale_ptr + row * stride_scale).to(tl.float32), 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                p = tl.exp(softcap * t - lse)
                dz = tl.where(offs == tgt, p - 1.0, p) * ((1.0 - t * t) * g)
            else:
                p = tl.exp(z - lse)
                dz = tl.where(offs == tgt, p - 1.0, p) * g
            tl.store(z_row + offs, dz.to(z_ptr.dtype.element_ty), mask=mask)

def _chunked(h, w, targets, scale, softcap, ignore_index, chunk_size, grad_h, grad_w):
    """Steps 1-3 of the module docstring -> (loss (N,) fp32, dh, dw; each empty unless wanted); scale (1,) or (N,)."""
    (N, C), V = h.shape, w.shape[0]
    if h.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("linear_cross_entropy_triton: CPU tensors need TRITON_INTERPRET=1 set before triton is "
                           "imported (slow, for tests); use linear_cross_entropy_reference otherwise")
    # out-of-range targets would read outside the logits row; asynchronous on CUDA, like F.cross_entropy's check
    torch._assert_async(((targets == ignore_index) | ((targets >= 0) & (targets < V))).all(),
                        f"linear_cross_entropy: targets must be in [0, {V}) or equal ignore_index={ignore_index}")
    targets = targets.contiguous()
    loss = torch.empty(N, device=h.device, dtype=torch.float32)
    dh = torch.empty(N, C, device=h.device, dtype=h.dtype) if grad_h else h.new_empty(0)
    multi = not 0 < N <= chunk_size  # several chunks (or none): dw accumulates in fp32
    dw = torch.zeros(V, C, device=w.device, dtype=torch.float32) if grad_w and multi else None
    z = torch.empty(min(N, chunk_size), V, device=h.device, dtype=h.dtype)
    scale = scale.expand(N)  # one factor for all rows (stride 0) or one per row
    for a in range(0, N, chunk_size):
        b = min(a + chunk_size, N)
        zc, hc = z[: b - a], h[a:b]
        torch.mm(hc, w.t(), out=zc)
        _softcap_ce_kernel[(b - a,)](zc, zc.stride(0), targets[a:b], loss[a:b], scale[a:b], scale.stride(0), V,
                                     softcap if softcap > 0 else 1.0, ignore_index, HAS_SOFTCAP=softcap > 0,
                                     GRAD=grad_h or grad_w, BLOCK_V=_BLOCK_V, num_warps=_NUM_WARPS)
        if grad_h:
            torch.mm(zc, w, out=dh[a:b])
        if grad_w:
            if not multi:
                dw = torch.mm(zc.t(), hc)
            elif zc.dtype == torch.float32:
                dw.addmm_(zc.t(), hc)
            else:  # bf16/fp16 product, fp32 sum, rounded once at the end
                dw += torch.mm(zc.t(), hc)
    return loss, dh, dw.to(w.dtype) if grad_w else w.new_empty(0)

@kernel_op("tritonchat::linear_cross_entropy")
def _lce_op(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, softcap: float, ignore_index: int,
            reduction: str, chunk_size: int, grad_h: bool, grad_w: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, dh, dw): the reduced loss's gradients ("mean"/"sum") when grad_h / grad_w, else empty."""
    if reduction == "none" and (grad_h or grad_w):
        raise ValueError("tritonchat::linear_cross_entropy: gradients in the forward need reduction 'mean' or 'sum'")
    n_valid = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)  # stays on device: no sync
    scale = (1.0 / n_valid if reduction == "mean" else torch.ones((), device=h.device)).reshape(1)
    loss, dh, dw = _chunked(h, w, targets, scale, softcap, ignore_index, chunk_size, grad_h, grad_w)
    if reduction != "none":
        loss = loss.sum() / n_valid if reduction == "mean" else loss.sum()
    return loss, dh, dw

@_lce_op.register_fake
def _(h, w, targets, softcap, ignore_index, reduction, chunk_size, grad_h, grad_w):
    loss = h.new_empty((h.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    dh = h.new_empty(h.shape) if grad_h else h.new_empty(0)
    return loss, dh, (w.new_empty(w.shape) if grad_w else w.new_empty(0))

@kernel_op("tritonchat::linear_cross_entropy_backward")
def _lce_backward_op(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, grad_loss: torch.Tensor,
                     softcap: float, ignore_index: int, chunk_size: int, grad_h: bool, grad_w: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """reduction "none": (dh, dw) for the per-token upstream gradient grad_loss (N,), recomputing the logits."""
    return _chunked(h, w, targets, grad_loss.to(torch.float32).contiguous(), softcap, ignore_index, chunk_size,
                    grad_h, grad_w)[1:]

@_lce_backward_op.register_fake
def _(h, w, targets, grad_loss, softcap, ignore_index, chunk_size, grad_h, grad_w):
    return (h.new_empty(h.shape) if grad_h else h.new_empty(0)), (w.new_empty(w.shape) if grad_w else w.new_empty(0))

def _setup_context(ctx, inputs, output):
    _, _, _, softcap, ignore_index, reduction, chunk_size, _, _ = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.reduction, ctx.args = reduction, (softcap, ignore_index, chunk_size)
    ctx.save_for_backward(*(inputs[:3] if reduction == "none" else output[1:]))  # h, w, targets or dh, dw

def _backward(ctx, grad_loss, _grad_dh, _grad_dw):
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.reduction == "none":
        h, w, targets = ctx.saved_tensors
        dh, dw = torch.ops.tritonchat.linear_cross_entropy_backward(h, w, targets, grad_loss, *ctx.args, need_h, need_w)
    else:
        dh, dw = ctx.saved_tensors
        if (need_h and dh.ndim != 2) or (need_w and dw.ndim != 2):  # the (0,) placeholders of the forward
            raise RuntimeError("tritonchat::linear_cross_entropy: a gradient the forward skipped (grad_h/grad_w False)")
        dh, dw = dh * grad_loss, dw * grad_loss
    return (dh if need_h else None), (dw if need_w else None), None, None, None, None, None, None, None

_lce_op.register_autograd(_backward, setup_context=_setup_context)

def linear_cross_entropy(h, w, targets, *, softcap=15.0, ignore_index=-1, reduction="mean", chunk_size=None):
    """Cross-entropy of softcap * tanh(h w^T / softcap), h (N, C), w (V, C), targets (N,) int64 -> fp32 scalar
    ("mean" over non-ignored targets, 0 when all are ignored; "sum") or (N,) ("none"). Triton or reference by mode."""
    fn = linear_cross_entropy_triton if kernels.use_fused() else linear_cross_entropy_reference
    return fn(h, w, targets, softcap=softcap, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)

def linear_cross_entropy_triton(h, w, targets, *, softcap=15.0, ignore_index=-1, reduction="mean", chunk_size=None):
    """The chunked cuBLAS + Triton path whatever the mode; bad dtypes a TypeError, other bad arguments a ValueError."""
    if torch.is_autocast_enabled(h.device.type):  # the kernels run in one dtype: apply autocast's cast ourselves
        dtype = torch.get_autocast_dtype(h.device.type)
        h, w = h.to(dtype), w.to(dtype)
    if h.ndim != 2 or w.ndim != 2 or targets.ndim != 1:
        raise ValueError(f"linear_cross_entropy: expected h (N, C), w (V, C), targets (N,); got {tuple(h.shape)}, "
                         f"{tuple(w.shape)}, {tuple(targets.shape)}")
    if w.shape[1] != h.shape[1] or targets.shape[0] != h.shape[0] or w.shape[0] == 0:
        raise ValueError(f"linear_cross_entropy: shape mismatch: h {tuple(h.shape)} needs w (V >= 1, {h.shape[1]}) "
                         f"and targets ({h.shape[0]},); got w {tuple(w.shape)}, targets {tuple(targets.shape)}")
    check_floats("linear_cross_entropy", "h and w", h, w)
    if targets.dtype != torch.int64:
        raise TypeError(f"linear_cross_entropy: targets must be int64, got {targets.dtype}")
    if targets.device != h.device:
        raise ValueError(f"linear_cross_entropy: targets on {targets.device}, h on {h.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be None (no cap) or > 0, got {softcap!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size must be None or a positive int, got {chunk_size!r}")
    # default: the largest power of two of tokens whose logits fit in _CHUNK_ELEMENTS, at least _MIN_CHUNK
    chunk = chunk_size or max(_MIN_CHUNK, triton.next_power_of_2(_CHUNK_ELEMENTS // w.shape[0] + 1) // 2)
    grads = torch.is_grad_enabled() and reduction != "none"
    with torch.autocast(h.device.type, enabled=False):
        return torch.ops.tritonchat.linear_cross_entropy(h, w, targets, float(softcap or 0.0), int(ignore_index),
                                                         reduction, chunk, grads and h.requires_grad,
                                                         grads and w.requires_grad)[0]

def linear_cross_entropy_reference(h, w, targets, *, softcap=15.0, ignore_index=-1, reduction="mean",
                                   chunk_size=None):
    """Plain PyTorch: linear -> fp32 -> softcap -> F.cross_entropy, with the (N, V) logits; chunk_size is ignored."""
    logits = F.linear(h, w).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    if reduction == "mean":  # all targets ignored: 0 (zero gradients flow through where) instead of 0/0 = nan
        loss = torch.where((targets != ignore_index).any(), loss, torch.zeros_like(loss))
    return loss
