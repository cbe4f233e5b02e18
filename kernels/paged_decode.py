"""Paged KV-cache decode attention (flash-decoding), the KV scatter, and the fused decode-step prologue.

paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, scale=None): q (B, H, D) one rotated, normalised
  new token per sequence, caches (num_blocks, block_size in {16, 32, 64}, Hkv, D), block_table (B, max_blocks) and
  seq_lens (B,) int32 (the new k/v already written) -> (B, H, D).
write_kv(k_cache, v_cache, k, v, block_table, positions): k, v (N, Hkv, D) into slot pos % block_size of page
  block_table[i, pos // block_size], pos = positions[i], in place.
rope_norm_write_kv(q, k, v, cos, sin, k_cache, v_cache, block_table, positions, *, eps=1e-6): q (B, H, D), k, v
  (B, Hkv, D); q, k rotated at positions (B,) and RMS-normalised, k_hat, v written as write_kv -> q_hat, cache dtype.
Triton path (operators tritonchat::*, inference only): fp16/bf16/fp32 (else TypeError), bad shapes a ValueError.

Maths, sequence b, query head h, kv head g = h // (H / Hkv), context length L:
    s_j = scale * q_h . k_{g,j},   y_h = sum_j softmax(s)_j v_{g,j},   j < L, token j in page table[b, j // bs].
A program owns one (sequence, kv head) and all its query heads: each page is read once per group. Split-KV: grid
(B, Hkv, splits), each writing o_s, lse_s (base 2); y = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max lse.

References:
  * Flash-Decoding (Dao, Haziza, Massa, Sizov, 2023): https://crfm.stanford.edu/2023/10/12/flashdecoding.html
  * vLLM's Triton decode attention (paged, split-KV, GQA-grouped), adapted from LightLLM and SGLang:
    https://github.com/vllm-project/vllm/blob/main/vllm/attention/ops/triton_decode_attention.py
  * SGLang's Triton decode attention:
    https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/layers/attention/triton_ops/decode_attention.py
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernels
from kernels._common import LOG2E, check_floats, dot_precision, kernel_op

_MIN_SPLIT_TOKENS = 256   # below this a split's fixed cost (q load, partial write, combine) outweighs its parallelism

@triton.jit(do_not_specialize=["stride_btb", "num_splits"])
def _paged_decode_split(Q, K, V, BT, SL, OUT, OP, LSE, stride_qb, stride_qh, stride_kblk, stride_ktok, stride_kh,
                        stride_vblk, stride_vtok, stride_vh, stride_btb, stride_ob, stride_oh, num_splits, sm_scale,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Grid (B, Hkv, num_splits): one split of one sequence's context for all H/Hkv query heads of one kv head.
    stride_btb and num_splits change as sequences grow: not specialised, no variant per value."""
    b, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(SL + b)
    qk_scale = sm_scale * LOG2E
    # this split's token range, in whole BLOCK_N tiles of this sequence's own length
    n_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    rows = tl.arange(0, GROUP_PAD)  # query heads of this kv group
    cols = tl.arange(0, D_PAD)
    row_ok = rows < GROUP
    col_ok = cols < D
    heads = g * GROUP + rows
    out_mask = row_ok[:, None] & col_ok[None, :]
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + cols[None, :], mask=out_mask, other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = pos < end
        # page of each row (a tile spans BLOCK_N // BLOCK_SIZE pages); masked rows never read the table
        blk = tl.load(BT + b * stride_btb + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & col_ok[None, :]
        k = tl.load(K + blk[:, None] * stride_kblk + slot[:, None] * stride_ktok + g * stride_kh + cols[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + blk[:, None] * stride_vblk + slot[:, None] * stride_vtok + g * stride_vh + cols[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (GROUP_PAD, BLOCK_N)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if SINGLE_SPLIT:
        y = acc / l_i[:, None]
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + cols[None, :], y.to(OUT.dtype.element_ty),
                 mask=out_mask)
    else:
        # empty split (short sequence): o = 0, lse = -inf, weight 0 in the combine
        has = l_i > 0
        y = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        # OP (B, H, num_splits, D), LSE (B, H, num_splits): fp32, contiguous
        bh = b * (tl.num_programs(1) * GROUP) + heads
        tl.store(OP + (bh[:, None] * num_splits + split) * D + cols[None, :], y, mask=out_mask)
        tl.store(LSE + bh * num_splits + split, lse, mask=row_ok)

@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_combine(OP, LSE, OUT, stride_ob, stride_oh, H, num_splits,
                          D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """Grid (B, H): y = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M) over the splits of one (sequence, head)."""
    b, h = tl.program_id(0), tl.program_id(1)
    bh = b * H + h
    offs_s = tl.arange(0, SPLITS_PAD)
    cols = tl.arange(0, D_PAD)
    s_ok = offs_s < num_splits
    lse = tl.load(LSE + bh * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)  # finite: split 0 is never empty (seq_len >= 1)
    w = tl.exp2(lse - m)
    o = tl.load(OP + (bh * num_splits + offs_s[:, None]) * D + cols[None, :],
                mask=s_ok[:, None] & (cols[None, :] < D), other=0.0)
    y = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b * stride_ob + h * stride_oh + cols, y.to(OUT.dtype.element_ty), mask=cols < D)

@triton.jit
def _rope_rms(X, row_mask, cols, col_ok, c, s, eps, HALF: tl.constexpr):
    """Rows of X as two halves (no register shuffle), rotated and RMS-normalised over 2 * HALF columns, fp32."""
    m = row_mask[:, None] & col_ok[None, :]
    x1 = tl.load(X + cols[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + HALF + cols[None, :], mask=m, other=0.0).to(tl.float32)
    y1 = x1 * c[None, :] + x2 * s[None, :]
    y2 = x2 * c[None, :] - x1 * s[None, :]
    rstd = tl.rsqrt((tl.sum(y1 * y1, 1) + tl.sum(y2 * y2, 1)) / (2 * HALF) + eps)
    return y1 * rstd[:, None], y2 * rstd[:, None], m

@triton.jit(do_not_specialize=["stride_btb"])
def _rope_norm_write_kv_kernel(Q, K, V, COS, SIN, KC, VC, BT, POS, QOUT,
                               stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos,
                               stride_kcblk, stride_kctok, stride_kch, stride_vcblk, stride_vctok, stride_vch,
                               stride_btb, stride_ob, stride_oh, eps,
                               H: tl.constexpr, HKV: tl.constexpr, H_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
                               HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Grid (B,): sequence b's q rotated + normalised into QOUT; k (so too) and v into slot POS[b] % BLOCK_SIZE of
    page BT[b, POS[b] // BLOCK_SIZE]."""
    b = tl.program_id(0)
    pos = tl.load(POS + b).to(tl.int64)
    blk = tl.load(BT + b * stride_btb + pos // BLOCK_SIZE).to(tl.int64)
    slot = pos % BLOCK_SIZE
    cols = tl.arange(0, HALF_PAD)
    col_ok = cols < HALF
    c = tl.load(COS + pos * stride_cos + cols, mask=col_ok, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos * stride_cos + cols, mask=col_ok, other=0.0).to(tl.float32)
    hq = tl.arange(0, H_PAD)
    y1, y2, m = _rope_rms(Q + b * stride_qb + hq[:, None] * stride_qh, hq < H, cols, col_ok, c, s, eps, HALF)
    out = QOUT + b * stride_ob + hq[:, None] * stride_oh + cols[None, :]
    tl.store(out, y1.to(QOUT.dtype.element_ty), mask=m)
    tl.store(out + HALF, y2.to(QOUT.dtype.element_ty), mask=m)
    hk = tl.arange(0, HKV_PAD)
    y1, y2, m = _rope_rms(K + b * stride_kb + hk[:, None] * stride_kh, hk < HKV, cols, col_ok, c, s, eps, HALF)
    kc = KC + blk * stride_kcblk + slot * stride_kctok + hk[:, None] * stride_kch + cols[None, :]
    tl.store(kc, y1.to(KC.dtype.element_ty), mask=m)
    tl.store(kc + HALF, y2.to(KC.dtype.element_ty), mask=m)
    vsrc = V + b * stride_vb + hk[:, None] * stride_vh + cols[None, :]
    vc = VC + blk * stride_vcblk + slot * stride_vctok + hk[:, None] * stride_vch + cols[None, :]
    tl.store(vc, tl.load(vsrc, mask=m).to(VC.dtype.element_ty), mask=m)
    tl.store(vc + HALF, tl.load(vsrc + HALF, mask=m).to(VC.dtype.element_ty), mask=m)

@triton.jit(do_not_specialize=["stride_btn"])
def _write_kv_kernel(K, V, KC, VC, BT, POS, stride_kn, stride_kh, stride_vn, stride_vh, stride_kcblk, stride_kctok,
                     stride_kch, stride_vcblk, stride_vctok, stride_vch, stride_btn,
                     HKV: tl.constexpr, HKV_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr):
    """Grid (N,): token i's (Hkv, D) k and v rows into slot POS[i] % BLOCK_SIZE of page BT[i, POS[i] // BLOCK_SIZE]."""
    i = tl.program_id(0)
    pos = tl.load(POS + i).to(tl.int64)
    blk = tl.load(BT + i * stride_btn + pos // BLOCK_SIZE).to(tl.int64)
    slot = pos % BLOCK_SIZE
    hs, cols = tl.arange(0, HKV_PAD), tl.arange(0, D_PAD)
    mask = (hs[:, None] < HKV) & (cols[None, :] < D)
    k = tl.load(K + i * stride_kn + hs[:, None] * stride_kh + cols[None, :], mask=mask)
    v = tl.load(V + i * stride_vn + hs[:, None] * stride_vh + cols[None, :], mask=mask)
    tl.store(KC + blk * stride_kcblk + slot * stride_kctok + hs[:, None] * stride_kch + cols[None, :],
             k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + blk * stride_vcblk + slot * stride_vctok + hs[:, None] * stride_vch + cols[None, :],
             v.to(VC.dtype.element_ty), mask=mask)

def _check_cache(k_cache, v_cache, name):
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{name}: k_cache and v_cache must both be (num_blocks, block_size, Hkv, D), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    check_floats(name, "k_cache and v_cache", k_cache, v_cache)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{name}: the last (D) dim of the caches must be contiguous")
    if k_cache.shape[1] not in (16, 32, 64):
        raise ValueError(f"{name}: block_size must be 16, 32 or 64, got {k_cache.shape[1]}")

def choose_num_splits(batch, n_kv_head, max_context, device=None):
    """Splits per sequence: a power of two, for ~2 waves of batch * Hkv * splits programs, each >= _MIN_SPLIT_TOKENS."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if torch.cuda.is_available() else 132
    want = max(1, (2 * sms) // max(1, batch * n_kv_head))
    cap = max(1, max_context // _MIN_SPLIT_TOKENS)
    return 1 << (min(want, cap).bit_length() - 1)

@kernel_op("tritonchat::paged_decode_attention")
def _paged_decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, seq_lens: torch.Tensor, scale: Optional[float],
                               num_splits: Optional[int]) -> torch.Tensor:
    """One decode step over the paged cache -> (B, H, D), contiguous."""
    B, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    q, block_table, seq_lens = q.contiguous(), block_table.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(q)
    if B == 0:
        return out
    group, block_n, d_pad = H // Hkv, max(64, block_size), triton.next_power_of_2(D)
    max_context = block_table.shape[1] * block_size  # an upper bound, known without a device sync
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, max_context, q.device)
    num_splits = max(1, min(num_splits, triton.cdiv(max_context, block_n)))
    o_part = q.new_empty(B, H, num_splits, D, dtype=torch.float32) if num_splits > 1 else out  # out: unused
    lse = q.new_empty(B, H, num_splits, dtype=torch.float32) if num_splits > 1 else out
    # memory bound: 4 warps, 2 stages keep a (64, 128) K and V tile in flight per program
    _paged_decode_split[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, o_part, lse, *q.stride()[:2], *k_cache.stride()[:3],
        *v_cache.stride()[:3], block_table.stride(0), *out.stride()[:2], num_splits,
        scale if scale is not None else 1.0 / math.sqrt(D),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, SINGLE_SPLIT=num_splits == 1, PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=2)
    if num_splits > 1:
        _paged_decode_combine[(B, H)](o_part, lse, out, *out.stride()[:2], H, num_splits,
                                      D=D, D_PAD=d_pad, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4)
    return out

_paged_decode_attention_op.register_fake(lambda q, *_: q.new_empty(q.shape))

@kernel_op("tritonchat::write_kv", mutates_args=("k_cache", "v_cache"))
def _write_kv_op(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 block_table: torch.Tensor, positions: torch.Tensor) -> None:
    """Scatter k, v (N, Hkv, D) into the caches in place."""
    _, block_size, Hkv, D = k_cache.shape
    if k.shape[0] == 0:
        return
    k, v, block_table, positions = (x.contiguous() for x in (k, v, block_table, positions))
    _write_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, block_table, positions, *k.stride()[:2], *v.stride()[:2],
                                    *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
                                    HKV=Hkv, HKV_PAD=triton.next_power_of_2(Hkv), D=D,
                                    D_PAD=triton.next_power_of_2(D), BLOCK_SIZE=block_size, num_warps=4)

_write_kv_op.register_fake(lambda *_: None)

@kernel_op("tritonchat::rope_norm_write_kv", mutates_args=("k_cache", "v_cache"))
def _rope_norm_write_kv_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, positions: torch.Tensor, eps: float) -> torch.Tensor:
    """Rotate + normalise the new q and k, write k and v into the caches in place -> q_hat (B, H, D)."""
    B, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    out = torch.empty(B, H, D, device=q.device, dtype=k_cache.dtype)
    if B == 0:
        return out
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cos, sin, block_table, positions = (x.contiguous() for x in (cos, sin, block_table, positions))
    # a few KB per program: 2 warps cover a (16, 64) half tile without idle lanes
    _rope_norm_write_kv_kernel[(B,)](
        q, k, v, cos, sin, k_cache, v_cache, block_table, positions, out, *q.stride()[:2], *k.stride()[:2],
        *v.stride()[:2], cos.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        *out.stride()[:2], eps, H=H, HKV=Hkv, H_PAD=triton.next_power_of_2(H), HKV_PAD=triton.next_power_of_2(Hkv),
        HALF=D // 2, HALF_PAD=triton.next_power_of_2(D // 2), BLOCK_SIZE=block_size, num_warps=2)
    return out

_rope_norm_write_kv_op.register_fake(lambda q, k, v, cos, sin, k_cache, *_: q.new_empty(q.shape, dtype=k_cache.dtype))

def paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, scale=None):
    """One decode step over a paged KV cache (module docstring) -> (B, H, D), Triton or reference by mode."""
    fn = paged_decode_attention_triton if kernels.use_fused() else paged_decode_attention_reference
    return fn(q, k_cache, v_cache, block_table, seq_lens, scale=scale)

def paged_decode_attention_triton(q, k_cache, v_cache, block_table, seq_lens, *, scale=None, num_splits=None):
    """tritonchat::paged_decode_attention whatever the mode; num_splits per sequence, default choose_num_splits."""
    _check_cache(k_cache, v_cache, "paged_decode_attention")
    if q.dim() != 3:
        raise ValueError(f"paged_decode_attention: q must be (B, H, D), got {tuple(q.shape)}")
    B, H, D = q.shape
    Hkv, Dc = k_cache.shape[2:]
    if Dc != D:
        raise ValueError(f"paged_decode_attention: head dim of q ({D}) != head dim of the cache ({Dc})")
    if H % Hkv != 0:
        raise ValueError(f"paged_decode_attention: n_head {H} must be a multiple of n_kv_head {Hkv}")
    check_floats("paged_decode_attention", "q and the caches", q, k_cache)
    if block_table.dim() != 2 or block_table.shape[0] != B or seq_lens.shape != (B,) or not (
            {block_table.dtype, seq_lens.dtype} <= {torch.int32, torch.int64}):
        raise ValueError(f"paged_decode_attention: block_table (B={B}, max_blocks), seq_lens (B,) must be int32, got "
                         f"{tuple(block_table.shape)} {block_table.dtype}, {tuple(seq_lens.shape)} {seq_lens.dtype}")
    scale = None if scale is None else float(scale)
    num_splits = None if num_splits is None else int(num_splits)
    return torch.ops.tritonchat.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale, num_splits)

def paged_decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, *, scale=None):
    """Eager PyTorch: every sequence's pages gathered into a dense copy, then SDPA with a length mask."""
    B, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    L = block_table.shape[1] * block_size
    table = block_table.long().clamp(min=0, max=k_cache.shape[0] - 1)
    k, v = (cache[table].reshape(B, L, Hkv, D) for cache in (k_cache, v_cache))  # unused entries: anything
    valid = torch.arange(L, device=q.device)[None, :] < seq_lens.long()[:, None]  # (B, L)
    y = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=valid[:, None, None, :],
                                       scale=scale if scale is not None else 1 / math.sqrt(D),
                                       enable_gqa=True if H != Hkv else False)  # a bool, not a SymBool under compile
    return y[:, :, 0, :]

def write_kv(k_cache, v_cache, k, v, block_table, positions):
    """Scatter N new tokens' k, v (N, Hkv, D) into their cache slots in place, Triton or reference by mode."""
    fn = write_kv_triton if kernels.use_fused() else write_kv_reference
    return fn(k_cache, v_cache, k, v, block_table, positions)

def write_kv_triton(k_cache, v_cache, k, v, block_table, positions):
    """tritonchat::write_kv (one program per token) whatever the mode."""
    _check_cache(k_cache, v_cache, "write_kv")
    Hkv, D = k_cache.shape[2:]
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (Hkv, D):
        raise ValueError(f"write_kv: k and v must be (N, Hkv={Hkv}, D={D}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    N = k.shape[0]
    if block_table.dim() != 2 or block_table.shape[0] != N or positions.shape != (N,):
        raise ValueError(f"write_kv: block_table must be (N={N}, max_blocks) and positions (N,), got "
                         f"{tuple(block_table.shape)} and {tuple(positions.shape)}")
    torch.ops.tritonchat.write_kv(k_cache, v_cache, k, v, block_table, positions)

def write_kv_reference(k_cache, v_cache, k, v, block_table, positions):
    """Eager PyTorch: index assignment into the caches."""
    pos, block_size = positions.long(), k_cache.shape[1]
    blocks = block_table.long()[torch.arange(len(pos), device=pos.device), pos // block_size]
    slots = pos % block_size
    k_cache[blocks, slots] = k.to(k_cache.dtype)
    v_cache[blocks, slots] = v.to(v_cache.dtype)

def rope_norm_write_kv(q, k, v, cos, sin, k_cache, v_cache, block_table, positions, *, eps=1e-6):
    """The decode step's prologue (module docstring) -> q_hat (B, H, D) in the cache dtype, Triton or reference."""
    fn = rope_norm_write_kv_triton if kernels.use_fused() else rope_norm_write_kv_reference
    return fn(q, k, v, cos, sin, k_cache, v_cache, block_table, positions, eps=eps)

def rope_norm_write_kv_triton(q, k, v, cos, sin, k_cache, v_cache, block_table, positions, *, eps=1e-6):
    """tritonchat::rope_norm_write_kv (one program per sequence) whatever the mode."""
    _check_cache(k_cache, v_cache, "rope_norm_write_kv")
    Hkv, D = k_cache.shape[2:]
    if q.dim() != 3 or q.shape[-1] != D or q.shape[1] % Hkv != 0:
        raise ValueError(f"rope_norm_write_kv: q must be (B, H, D={D}) with H a multiple of Hkv={Hkv}, got "
                         f"{tuple(q.shape)}")
    B = q.shape[0]
    if k.shape != (B, Hkv, D) or v.shape != (B, Hkv, D):
        raise ValueError(f"rope_norm_write_kv: k and v must be (B={B}, Hkv={Hkv}, D={D}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    check_floats("rope_norm_write_kv", "q, k, v", q, k, v)
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != D // 2 or D % 2:
        raise ValueError(f"rope_norm_write_kv: cos and sin must be (rotary_len, D/2={D // 2}), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != B or positions.shape != (B,):
        raise ValueError(f"rope_norm_write_kv: block_table must be (B={B}, max_blocks) and positions (B,), got "
                         f"{tuple(block_table.shape)} and {tuple(positions.shape)}")
    return torch.ops.tritonchat.rope_norm_write_kv(q, k, v, cos, sin, k_cache, v_cache, block_table, positions,
                                                   float(eps))

def rope_norm_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, block_table, positions, *, eps=1e-6):
    """Eager PyTorch, in fp32 as the kernel: rotate halves, rms_norm, write_kv_reference."""
    pos = positions.long()
    c, s = cos[pos].float()[:, None], sin[pos].float()[:, None]  # (B, 1, D/2)
    def rope_norm(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return F.rms_norm(torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], -1), (x.shape[-1],), eps=eps)
    write_kv_reference(k_cache, v_cache, rope_norm(k), v, block_table, positions)
    return rope_norm(q).to(k_cache.dtype)
