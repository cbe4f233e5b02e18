"""Fused RoPE + QK-norm flash attention, forward and backward in Triton.

attention(q, k, v, cos, sin, *, causal=True, qk_norm=True, eps=1e-6, scale=None): q (B, T, H, D), k, v (B, T, Hkv, D),
H % Hkv == 0, cos, sin (T, D/2) -> (B, T, H, D) in q's dtype, differentiable w.r.t. q, k, v. Triton path (operator
tritonchat::attention): fp32/fp16/bf16 (else TypeError), D a power of two in [16, 256] (else ValueError).

Maths, per row x at position t: y = R_t x (halves x1, x2: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos), rstd =
(mean(y^2) + eps)^-1/2, x_hat = y rstd (y if not qk_norm). FlashAttention-2 on the hats: S = q_hat k_hat^T scale
(default 1/sqrt(D)), P = softmax(S) [causal], O = P V, online softmax in base 2 (LSE_i = log2 sum_j exp2(S_ij log2 e)
saved). Backward, the last line in the epilogue of the kernel that owns the row (dq, dk w.r.t. the raw q, k):
    dV = P^T dO          Delta_i = rowsum(dO_i * O_i)        dS = P * (dO V^T - Delta)
    dq_hat = scale dS k_hat          dk_hat = scale dS^T q_hat
    dy = rstd * (dx_hat - x_hat * mean(dx_hat * x_hat))      dx = R_t^T dy = [dy1 cos - dy2 sin | dy1 sin + dy2 cos]
Kernels: `_rope_norm_kv` (K pre-pass), `_attn_fwd` (Q rotated on load), `_attn_bwd_preprocess` (Delta),
`_attn_bwd_dkdv` (sums a KV head's query heads in registers: GQA without atomics or repeated K/V), `_attn_bwd_dq`.

References:
  * FlashAttention-2 (Dao, 2023): https://arxiv.org/abs/2307.08691
  * Triton tutorial 06, fused attention: https://triton-lang.org/main/getting-started/tutorials/06-fused-attention.html
"""
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels
from kernels._common import LOG2E, check_floats, configs, dot_precision, kernel_op

# Hopper bf16, D = 64/128 (the GPU tests run each); fwd/dq need BLOCK_M % BLOCK_N == 0, dkdv the converse (whole
# diagonal blocks). T is not specialised (one variant for every length); tuned per power-of-two bucket of T.
_BLOCKS = ("BLOCK_M", "BLOCK_N")
_FWD_CONFIGS = configs(_BLOCKS, [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4)], (64, 32, 4, 1))
_DKDV_CONFIGS = configs(_BLOCKS, [(32, 128, 8, 3), (32, 64, 8, 3), (32, 128, 8, 4)], (32, 64, 4, 1))
_DQ_CONFIGS = configs(_BLOCKS, [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)], (64, 32, 4, 1))
_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL"]

def _autotune_prune(candidates, nargs, **kwargs):
    """TRITONCHAT_ATTN_AUTOTUNE=0 (read at each new key): first config only, no sweep (for the GPU tests)."""
    return candidates[:1] if os.environ.get("TRITONCHAT_ATTN_AUTOTUNE", "1") == "0" else candidates

@triton.jit
def _halves(x, BLOCK: tl.constexpr, HALF: tl.constexpr):
    """(BLOCK, 2*HALF) -> x[:, :HALF], x[:, HALF:]"""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK, 2, HALF)), (0, 2, 1)))

@triton.jit
def _cat(a, b, BLOCK: tl.constexpr, HALF: tl.constexpr):
    """two (BLOCK, HALF) -> (BLOCK, 2*HALF) = [a | b]"""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (BLOCK, 2 * HALF))

@triton.jit
def _load_cos_sin(COS, SIN, rows, row_mask, HALF: tl.constexpr):
    offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    cos = tl.load(COS + offs, mask=row_mask[:, None], other=1.0).to(tl.float32)
    sin = tl.load(SIN + offs, mask=row_mask[:, None], other=0.0).to(tl.float32)
    return cos, sin

@triton.jit
def _rope_norm(x, cos, sin, eps, QK_NORM: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
    """raw rows x (BLOCK, D) fp32 -> (x_hat = rotated [and RMS-normalised] rows, rstd (BLOCK,))"""
    x1, x2 = _halves(x, BLOCK, HALF)
    y = _cat(x1 * cos + x2 * sin, x2 * cos - x1 * sin, BLOCK, HALF)
    if QK_NORM:
        rstd = tl.rsqrt(tl.sum(y * y, axis=1) / (2 * HALF) + eps)
        y = y * rstd[:, None]
    else:
        rstd = tl.full((BLOCK,), 1.0, tl.float32)
    return y, rstd

@triton.jit
def _rope_norm_bwd(dz, z, rstd, cos, sin, QK_NORM: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
    """dz = dL/dx_hat, z = x_hat (BLOCK, D) fp32 -> dL/dx for the raw rows (norm backward, then R^T)."""
    if QK_NORM:
        dy = rstd[:, None] * (dz - z * (tl.sum(dz * z, axis=1) / (2 * HALF))[:, None])
    else:
        dy = dz
    dy1, dy2 = _halves(dy, BLOCK, HALF)
    return _cat(dy1 * cos - dy2 * sin, dy1 * sin + dy2 * cos, BLOCK, HALF)

@triton.jit
def _load(ptrs, mask, MASK: tl.constexpr):
    """Load under `mask` (0 elsewhere) if MASK, else unmasked (blocks wholly inside the sequence)."""
    if MASK:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x

@triton.jit
def _mask_scores(s, valid, q_idx, k_idx, fill, MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """MASK: s where `valid` (and q_idx >= k_idx if CAUSAL), else `fill`; s unchanged when not MASK."""
    if MASK:
        if CAUSAL:
            valid = valid & (q_idx >= k_idx)
        s = tl.where(valid, s, fill)
    return s

@triton.jit
def _rope_norm_kv(X, XHAT, RSTD, COS, SIN, T, NH, eps,
                  QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """K pre-pass: x (B, T, NH, D) -> x_hat (same layout), rstd (B, NH, T). Grid (cdiv(T, BLOCK_T), B * NH)."""
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // NH, pid_bh % NH
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    base = b.to(tl.int64) * T * NH * HEAD_DIM + h * HEAD_DIM
    X, XHAT = X + base, XHAT + base
    offs = rows[:, None] * (NH * HEAD_DIM) + tl.arange(0, HEAD_DIM)[None, :]
    x = tl.load(X + offs, mask=row_mask[:, None], other=0.0).to(tl.float32)
    cos, sin = _load_cos_sin(COS, SIN, rows, row_mask, HEAD_DIM // 2)
    x_hat, rstd = _rope_norm(x, cos, sin, eps, QK_NORM, BLOCK_T, HEAD_DIM // 2)
    tl.store(XHAT + offs, x_hat.to(XHAT.dtype.element_ty), mask=row_mask[:, None])
    tl.store(RSTD + pid_bh.to(tl.int64) * T + rows, rstd, mask=row_mask)

@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, lo, hi, rows, T, qk_scale,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASK: apply the sequence-end mask (and the causal one if CAUSAL)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_offs = cols[:, None] * stride_kt + offs_d[None, :]
        k, v = _load(K + kv_offs, (cols < T)[:, None], MASK), _load(V + kv_offs, (cols < T)[:, None], MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = _mask_scores(s, cols[None, :] < T, rows[:, None], cols[None, :], float("-inf"), MASK, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i

@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _autotune_prune})
@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _attn_fwd(Q, K, V, COS, SIN, OUT, QHAT, LSE, RSTD_Q, T, H, HKV, T_BUCKET, sm_scale, eps,
              CAUSAL: tl.constexpr, QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), B * H), heaviest (last, when causal) query blocks first; K holds k_hat, Q is raw."""
    pid_m, pid_bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hkv = h // (H // HKV)
    stride_qt, stride_kt = H * HEAD_DIM, HKV * HEAD_DIM
    # 64-bit batch/head offsets go into the scalar base pointers; tile offsets stay 32-bit (fewer registers)
    q_base = b.to(tl.int64) * T * stride_qt + h * HEAD_DIM
    Q, QHAT, OUT = Q + q_base, QHAT + q_base, OUT + q_base
    k_base = b.to(tl.int64) * T * stride_kt + hkv * HEAD_DIM
    K, V = K + k_base, V + k_base
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    row_mask = rows < T
    q_offs = rows[:, None] * stride_qt + tl.arange(0, HEAD_DIM)[None, :]
    q = tl.load(Q + q_offs, mask=row_mask[:, None], other=0.0).to(tl.float32)
    cos, sin = _load_cos_sin(COS, SIN, rows, row_mask, HEAD_DIM // 2)
    q, rstd = _rope_norm(q, cos, sin, eps, QK_NORM, BLOCK_M, HEAD_DIM // 2)
    q = q.to(QHAT.dtype.element_ty)
    tl.store(QHAT + q_offs, q, mask=row_mask[:, None])
    tl.store(RSTD_Q + pid_bh.to(tl.int64) * T + rows, rstd, mask=row_mask)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    qk_scale = sm_scale * LOG2E
    # key blocks [0, lo) need no mask; [lo, hi) are the diagonal blocks (causal) or the ragged tail (not causal)
    if CAUSAL:
        lo, hi = m_start, tl.minimum(m_start + BLOCK_M, T)
    else:
        lo, hi = (T // BLOCK_N) * BLOCK_N, T
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, 0, lo, rows, T, qk_scale,
                                    False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, lo, hi, rows, T, qk_scale,
                                    True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(OUT + q_offs, acc.to(OUT.dtype.element_ty), mask=row_mask[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * T + rows, m_i + tl.math.log2(l_i), mask=row_mask)

@triton.jit
def _attn_bwd_preprocess(OUT, DO, DELTA, T, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta (B, H, T) = rowsum(dO * O). Grid (cdiv(T, BLOCK_M), B * H)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = b.to(tl.int64) * T * H * HEAD_DIM + h * HEAD_DIM
    OUT, DO = OUT + base, DO + base
    offs = rows[:, None] * (H * HEAD_DIM) + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(OUT + offs, mask=(rows < T)[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=(rows < T)[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + rows, tl.sum(o * do, axis=1), mask=rows < T)

@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, lo, hi, cols, T, qk_scale,
                         MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Accumulate dk_hat, dv of one key block over query blocks [lo, hi) of one query head (transposed tiles)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q_offs = rows[:, None] * stride_qt + offs_d[None, :]
        q, do = _load(Q + q_offs, (rows < T)[:, None], MASK), _load(DO + q_offs, (rows < T)[:, None], MASK)
        lse, delta = _load(LSE + rows, rows < T, MASK), _load(DELTA + rows, rows < T, MASK)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])  # (N, M)
        p_t = _mask_scores(p_t, rows[None, :] < T, rows[None, :], cols[:, None], 0.0, MASK, CAUSAL)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv

@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _autotune_prune})
@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _attn_bwd_dkdv(QHAT, KHAT, V, DO, LSE, DELTA, RSTD_K, COS, SIN, DK, DV, T, H, HKV, T_BUCKET, sm_scale,
                   CAUSAL: tl.constexpr, QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(T, BLOCK_N), B * Hkv). Sums over the H/Hkv query heads of the group, then the chain rule -> dk."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hkv = pid_bh // HKV, pid_bh % HKV
    group = H // HKV
    stride_qt, stride_kt = H * HEAD_DIM, HKV * HEAD_DIM
    n_start = pid_n * BLOCK_N
    cols = n_start + tl.arange(0, BLOCK_N)
    col_mask = cols < T
    kv_base = b.to(tl.int64) * T * stride_kt + hkv * HEAD_DIM
    KHAT, V, DK, DV = KHAT + kv_base, V + kv_base, DK + kv_base, DV + kv_base
    kv_offs = cols[:, None] * stride_kt + tl.arange(0, HEAD_DIM)[None, :]
    k = tl.load(KHAT + kv_offs, mask=col_mask[:, None], other=0.0)
    v = tl.load(V + kv_offs, mask=col_mask[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    qk_scale = sm_scale * LOG2E
    # query blocks: [lo, mid) masked (the diagonal, causal only), [mid, t_full) unmasked, [tail, T) ragged tail
    t_full = (T // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo, mid = n_start, tl.minimum(n_start + BLOCK_N, T)
        tail = tl.maximum(mid, t_full)
    else:
        lo, mid, tail = 0, 0, t_full
    for g in range(group):
        h = hkv * group + g
        q_base = b.to(tl.int64) * T * stride_qt + h * HEAD_DIM
        r_base = (b * H + h).to(tl.int64) * T
        Qg, DOg, LSEg, DELTAg = QHAT + q_base, DO + q_base, LSE + r_base, DELTA + r_base
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qg, DOg, LSEg, DELTAg, stride_qt, lo, mid, cols, T, qk_scale,
                                      True, CAUSAL, HEAD_DIM, BLOCK_M, PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qg, DOg, LSEg, DELTAg, stride_qt, mid, t_full, cols, T, qk_scale,
                                      False, CAUSAL, HEAD_DIM, BLOCK_M, PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Qg, DOg, LSEg, DELTAg, stride_qt, tail, T, cols, T, qk_scale,
                                      True, CAUSAL, HEAD_DIM, BLOCK_M, PRECISION)
    cos, sin = _load_cos_sin(COS, SIN, cols, col_mask, HEAD_DIM // 2)
    rstd = tl.load(RSTD_K + pid_bh.to(tl.int64) * T + cols, mask=col_mask, other=1.0)
    dk = _rope_norm_bwd(dk * sm_scale, k.to(tl.float32), rstd, cos, sin, QK_NORM, BLOCK_N, HEAD_DIM // 2)
    tl.store(DK + kv_offs, dk.to(DK.dtype.element_ty), mask=col_mask[:, None])
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=col_mask[:, None])

@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, lo, hi, rows, T, qk_scale,
                       MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Accumulate dq_hat of one query block over key blocks [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_offs = cols[:, None] * stride_kt + offs_d[None, :]
        k, v = _load(K + kv_offs, (cols < T)[:, None], MASK), _load(V + kv_offs, (cols < T)[:, None], MASK)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        p = _mask_scores(p, cols[None, :] < T, rows[:, None], cols[None, :], 0.0, MASK, CAUSAL)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq

@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _autotune_prune})
@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _attn_bwd_dq(QHAT, KHAT, V, DO, LSE, DELTA, RSTD_Q, COS, SIN, DQ, T, H, HKV, T_BUCKET, sm_scale,
                 CAUSAL: tl.constexpr, QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), B * H), heaviest query blocks first."""
    pid_m, pid_bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hkv = h // (H // HKV)
    stride_qt, stride_kt = H * HEAD_DIM, HKV * HEAD_DIM
    k_base = b.to(tl.int64) * T * stride_kt + hkv * HEAD_DIM
    KHAT, V = KHAT + k_base, V + k_base
    q_base = b.to(tl.int64) * T * stride_qt + h * HEAD_DIM
    QHAT, DO, DQ = QHAT + q_base, DO + q_base, DQ + q_base
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    row_mask = rows < T
    q_offs = rows[:, None] * stride_qt + tl.arange(0, HEAD_DIM)[None, :]
    q = tl.load(QHAT + q_offs, mask=row_mask[:, None], other=0.0)
    do = tl.load(DO + q_offs, mask=row_mask[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + rows, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + rows, mask=row_mask, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    qk_scale = sm_scale * LOG2E
    if CAUSAL:
        lo, hi = m_start, tl.minimum(m_start + BLOCK_M, T)
    else:
        lo, hi = (T // BLOCK_N) * BLOCK_N, T
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, KHAT, V, stride_kt, 0, lo, rows, T, qk_scale,
                            False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, KHAT, V, stride_kt, lo, hi, rows, T, qk_scale,
                            True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION)
    cos, sin = _load_cos_sin(COS, SIN, rows, row_mask, HEAD_DIM // 2)
    rstd = tl.load(RSTD_Q + pid_bh.to(tl.int64) * T + rows, mask=row_mask, other=1.0)
    dq = _rope_norm_bwd(dq * sm_scale, q.to(tl.float32), rstd, cos, sin, QK_NORM, BLOCK_M, HEAD_DIM // 2)
    tl.store(DQ + q_offs, dq.to(DQ.dtype.element_ty), mask=row_mask[:, None])

def triton_kernels():
    """{"fwd", "dkdv", "dq"} -> the @triton.autotune'd kernels (.configs, .fn), for config-by-config checks."""
    return {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}

@kernel_op("tritonchat::attention")
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  causal: bool, qk_norm: bool, eps: float, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (o, q_hat, k_hat, lse, rstd_q, rstd_k); all but o are saved for the backward only."""
    q, k, v, cos, sin = (x.contiguous() for x in (q, k, v, cos, sin))
    (B, T, H, D), Hkv = q.shape, k.shape[2]
    stats = lambda heads: q.new_empty(B, heads, T, dtype=torch.float32)
    k_hat, rstd_k = torch.empty_like(k), stats(Hkv)
    _rope_norm_kv[(triton.cdiv(T, 64), B * Hkv)](k, k_hat, rstd_k, cos, sin, T, Hkv, eps,
                                                  QK_NORM=qk_norm, HEAD_DIM=D, BLOCK_T=64, num_warps=4)
    o, q_hat, lse, rstd_q = torch.empty_like(q), torch.empty_like(q), stats(H), stats(H)
    _attn_fwd[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        q, k_hat, v, cos, sin, o, q_hat, lse, rstd_q, T, H, Hkv, triton.next_power_of_2(T), scale, eps,
        CAUSAL=causal, QK_NORM=qk_norm, HEAD_DIM=D, PRECISION=dot_precision(q.dtype))
    return o, q_hat, k_hat, lse, rstd_q, rstd_k

@_attention_op.register_fake
def _(q, k, v, cos, sin, causal, qk_norm, eps, scale):
    B, T, H, _ = q.shape
    stats = lambda heads: q.new_empty(B, heads, T, dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty(q.shape), k.new_empty(k.shape), stats(H), stats(H), stats(k.shape[2])

@kernel_op("tritonchat::attention_backward")
def _attention_backward_op(do: torch.Tensor, q_hat: torch.Tensor, k_hat: torch.Tensor, v: torch.Tensor,
                           o: torch.Tensor, lse: torch.Tensor, rstd_q: torch.Tensor, rstd_k: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, causal: bool, qk_norm: bool, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) w.r.t. the raw q, k, v, from tritonchat::attention's saved tensors."""
    do, q_hat, k_hat, v, o, lse, rstd_q, rstd_k, cos, sin = (
        x.contiguous() for x in (do, q_hat, k_hat, v, o, lse, rstd_q, rstd_k, cos, sin))
    (B, T, H, D), Hkv = q_hat.shape, k_hat.shape[2]
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess[(triton.cdiv(T, 64), B * H)](o, do, delta, T, H, HEAD_DIM=D, BLOCK_M=64, num_warps=4)
    dq, dk, dv = torch.empty_like(q_hat), torch.empty_like(k_hat), torch.empty_like(v)
    args = (T, H, Hkv, triton.next_power_of_2(T), scale)
    meta = dict(CAUSAL=causal, QK_NORM=qk_norm, HEAD_DIM=D, PRECISION=dot_precision(q_hat.dtype))
    _attn_bwd_dkdv[lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * Hkv)](
        q_hat, k_hat, v, do, lse, delta, rstd_k, cos, sin, dk, dv, *args, **meta)
    _attn_bwd_dq[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)](
        q_hat, k_hat, v, do, lse, delta, rstd_q, cos, sin, dq, *args, **meta)
    return dq, dk, dv

_attention_backward_op.register_fake(
    lambda do, q_hat, k_hat, v, *_: (q_hat.new_empty(q_hat.shape), k_hat.new_empty(k_hat.shape), v.new_empty(v.shape)))

def _attention_setup_context(ctx, inputs, output):
    _, _, v, cos, sin, causal, qk_norm, _, scale = inputs
    o, q_hat, k_hat, lse, rstd_q, rstd_k = output
    ctx.mark_non_differentiable(q_hat, k_hat, lse, rstd_q, rstd_k)
    ctx.save_for_backward(q_hat, k_hat, v, o, lse, rstd_q, rstd_k, cos, sin)
    ctx.flags = (causal, qk_norm, scale)

def _attention_backward(ctx, do, *_):
    dq, dk, dv = torch.ops.tritonchat.attention_backward(do, *ctx.saved_tensors, *ctx.flags)
    return dq, dk, dv, None, None, None, None, None, None

_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)

def apply_rotary(x, cos, sin):
    """x (B, T, H, D), cos/sin (T, D/2) -> x rotated by position (half-split convention), x's dtype."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)

def rms_norm(x, eps=1e-6):
    """RMSNorm over the last dim without a learned weight."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)

def attention(q, k, v, cos, sin, *, causal=True, qk_norm=True, eps=1e-6, scale=None):
    """RoPE + QK-norm + softmax attention (module docstring): Triton in fused mode, else the reference."""
    fn = attention_triton if kernels.use_fused() else attention_reference
    return fn(q, k, v, cos, sin, causal=causal, qk_norm=qk_norm, eps=eps, scale=scale)

def attention_triton(q, k, v, cos, sin, *, causal=True, qk_norm=True, eps=1e-6, scale=None):
    """tritonchat::attention (the Triton kernels, differentiable) whatever the eager/fused mode; any strides."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, T, heads, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    (B, T, H, D), Hkv = q.shape, k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"attention: k and v must be (B, T, Hkv, D) = ({B}, {T}, Hkv, {D}) to match q "
                         f"{tuple(q.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"attention: n_head {H} must be a multiple of n_kv_head {Hkv}")
    if cos.shape != (T, D // 2) or sin.shape != (T, D // 2):
        raise ValueError(f"attention: cos and sin must be (T, D/2) = ({T}, {D // 2}); got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"attention: head dim must be a power of two in [16, 256] for the Triton kernel; got {D}")
    check_floats("attention", "q, k, v", q, k, v)
    if not (q.device == cos.device == sin.device):
        raise ValueError("attention: q, k, v, cos, sin must be on one device")
    scale = float(scale) if scale is not None else 1 / math.sqrt(q.shape[-1])
    return torch.ops.tritonchat.attention(q, k, v, cos, sin, bool(causal), bool(qk_norm), float(eps), scale)[0]

def attention_reference(q, k, v, cos, sin, *, causal=True, qk_norm=True, eps=1e-6, scale=None):
    """Eager PyTorch: apply_rotary, rms_norm, then SDPA (GQA without repeating K/V)."""
    (_, T, H, D), Hkv = q.shape, k.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"attention: n_head {H} must be a multiple of n_kv_head {Hkv}")
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if qk_norm:
        q, k = rms_norm(q, eps), rms_norm(k, eps)
    # SDPA's flags must be plain bools: under torch.compile(dynamic=True) T > 1 and H != Hkv are SymBools.
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=causal if T > 1 else False, enable_gqa=True if H != Hkv else False,
                                       scale=scale if scale is not None else 1 / math.sqrt(D))
    return y.transpose(1, 2)
