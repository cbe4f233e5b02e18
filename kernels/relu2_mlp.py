"""Fused ReLU^2 MLP: y = relu(x W_fc^T)^2 W_proj^T, forward and backward.

relu2_mlp(x, w_fc, w_proj): x (..., C), w_fc (F, C), w_proj (C, F) (nn.Linear layout, no bias) -> (..., C) in x's
dtype, differentiable w.r.t. all three. Triton path (operator tritonchat::relu2_mlp): one dtype among fp32/fp16/bf16
(under autocast: the autocast dtype; else TypeError), a shape mismatch is a ValueError.

Maths, with h = x W_fc^T (M, F), r = relu(h), a = r^2 (M, F):
    forward    y  = a W_proj^T
    backward   dW_proj = dy^T a          dA = dy W_proj          dh = dA * 2 r
               dW_fc   = dh^T x          dx = dh W_fc

GEMM 1 (`_matmul_kernel`, _ACT_RELU2) accumulates h in fp32 and writes only a; the backward GEMM dA = dy W_proj
(_ACT_DRELU2) writes dh = dA * 2 sqrt(a); the rest is cuBLAS. Saved: x and a only (r = sqrt(a) as r >= 0): C + 4C
elements per token, eager's C + 8C. In fp16, a = h^2 underflows for |h| < ~1.7e-4, so 2 sqrt(a) loses precision.

References:
  * Primer (So et al., 2021), squared ReLU: https://arxiv.org/abs/2109.08668
  * nanochat's MLP: https://github.com/karpathy/nanochat/blob/master/nanochat/gpt.py
  * Triton tutorial 03, matmul: https://triton-lang.org/main/getting-started/tutorials/03-matrix-multiplication.html
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels
from kernels._common import check_floats, configs, dot_precision, grouped_tile, kernel_op, matmul_tile

_ACT_RELU2: tl.constexpr = tl.constexpr(1)   # C = relu(A @ B)^2
_ACT_DRELU2: tl.constexpr = tl.constexpr(2)  # C = (A @ B) * 2 sqrt(aux)

# Hopper (H100/H200) bf16 GEMM configs (wgmma tile shapes)
_CONFIGS = configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
    (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 3)], (32, 64, 64, 4, 4, 1))

@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K", "ACT"])
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, aux_ptr, M, N, K, M_BUCKET,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_xm, stride_xn,
                   ACT: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = epilogue(A @ B), A (M, K), B (K, N), any strides; aux (M, N) = the saved a. Grid (tiles of C,), tuned per
    power-of-two bucket of M (the engine's token counts keep changing)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # int64 rows: M * F can pass 2^31 elements at 64k+ tokens and large F
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = matmul_tile(a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                      BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACT == _ACT_RELU2:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    elif ACT == _ACT_DRELU2:  # relu(h) = sqrt(a) since relu(h) >= 0
        aux = tl.load(aux_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
        acc = acc * (2.0 * tl.sqrt(aux.to(tl.float32)))
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=mask)

def _matmul(a, b, act, aux=None):
    """epilogue(a @ b) for a (M, K), b (K, N) with any strides, through `_matmul_kernel`."""
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return c
    aux = c if aux is None else aux  # read only by _ACT_DRELU2; any pointer will do
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _matmul_kernel[grid](a, b, c, aux, M, N, K, triton.next_power_of_2(M), *a.stride(), *b.stride(), *c.stride(),
                         *aux.stride(), ACT=act.value, PRECISION=dot_precision(a.dtype))
    return c

@kernel_op("tritonchat::relu2_mlp")
def _relu2_mlp_op(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y (..., C), a = relu(x w_fc^T)^2 (M, F), the one activation saved for the backward)."""
    a = _matmul(x.reshape(-1, x.shape[-1]), w_fc.t(), act=_ACT_RELU2)  # (M, F)
    y = torch.matmul(a, w_proj.t())  # (M, C), cuBLAS
    return y.view(*x.shape[:-1], w_proj.shape[0]), a

_relu2_mlp_op.register_fake(lambda x, w_fc, w_proj: (x.new_empty(*x.shape[:-1], w_proj.shape[0]),
                                                     x.new_empty(x.numel() // x.shape[-1], w_fc.shape[0])))

@kernel_op("tritonchat::relu2_mlp_dh")
def _relu2_mlp_dh_op(dy: torch.Tensor, w_proj: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """dh = (dy w_proj) * 2 sqrt(a) (M, F) for dy (M, C)."""
    return _matmul(dy, w_proj, act=_ACT_DRELU2, aux=a)

_relu2_mlp_dh_op.register_fake(lambda dy, w_proj, a: dy.new_empty(dy.shape[0], w_proj.shape[1]))

def _relu2_mlp_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs, output[1])

def _relu2_mlp_backward(ctx, dy, _da):
    x, w_fc, w_proj, a = ctx.saved_tensors
    x2, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (M, C)
    dx = dw_fc = dw_proj = None
    if ctx.needs_input_grad[2]:
        dw_proj = torch.matmul(dy.t(), a)  # (C, F)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        dh = torch.ops.tritonchat.relu2_mlp_dh(dy, w_proj, a)  # (M, F)
        if ctx.needs_input_grad[1]:
            dw_fc = torch.matmul(dh.t(), x2)  # (F, C)
        if ctx.needs_input_grad[0]:
            dx = torch.matmul(dh, w_fc).view(x.shape)
    return dx, dw_fc, dw_proj

_relu2_mlp_op.register_autograd(_relu2_mlp_backward, setup_context=_relu2_mlp_setup_context)

def relu2_mlp(x, w_fc, w_proj):
    """relu(x w_fc^T)^2 w_proj^T; x (..., C), w_fc (F, C), w_proj (C, F) -> (..., C), Triton or reference by mode."""
    fn = relu2_mlp_triton if kernels.use_fused() else relu2_mlp_reference
    return fn(x, w_fc, w_proj)

def relu2_mlp_triton(x, w_fc, w_proj):
    """tritonchat::relu2_mlp (differentiable) whatever the mode, in the autocast dtype if autocast is on."""
    if torch.is_autocast_enabled(x.device.type):  # the kernel runs in one dtype: apply autocast's cast ourselves
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_fc, w_proj = x.to(dtype), w_fc.to(dtype), w_proj.to(dtype)
    if x.ndim < 1 or w_fc.ndim != 2 or w_proj.ndim != 2:
        raise ValueError(f"relu2_mlp: expected x (..., C), w_fc (F, C), w_proj (C, F); got {tuple(x.shape)}, "
                         f"{tuple(w_fc.shape)}, {tuple(w_proj.shape)}")
    C, Fh = x.shape[-1], w_fc.shape[0]
    if w_fc.shape[1] != C or tuple(w_proj.shape) != (C, Fh):
        raise ValueError(f"relu2_mlp: shape mismatch: x (..., {C}) needs w_fc (F, {C}) and w_proj ({C}, F); got "
                         f"w_fc {tuple(w_fc.shape)}, w_proj {tuple(w_proj.shape)}")
    check_floats("relu2_mlp", "x, w_fc, w_proj", x, w_fc, w_proj)
    with torch.autocast(x.device.type, enabled=False):
        return torch.ops.tritonchat.relu2_mlp(x, w_fc, w_proj)[0]

def relu2_mlp_reference(x, w_fc, w_proj):
    """Eager PyTorch: linear, relu, square, linear."""
    return F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj)
