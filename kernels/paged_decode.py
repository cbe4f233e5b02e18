"""Paged KV-cache decode attention (flash-decoding) and the KV scatter.

Contract (DESIGN.md):
  paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, scale=None) -> (B, H, D)
    q (B, H, D) one new token per sequence, already rotated and normalised; k_cache, v_cache
    (num_blocks, block_size, Hkv, D); block_table (B, max_blocks_per_seq) int32; seq_lens (B,) int32 valid tokens
    (the new token's k/v already written).
  write_kv(k_cache, v_cache, k, v, block_table, positions): k, v (N, Hkv, D), block_table (N, max_blocks) int32,
    positions (N,) -> token i goes to block block_table[i, pos // block_size], slot pos % block_size (in place).
The Triton kernels land with their own issue; until then fused mode raises NotImplementedError.
"""
import math

import torch
import torch.nn.functional as F

import kernels


def paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, scale=None):
    if kernels.use_fused():
        raise NotImplementedError("kernels.paged_decode: the fused Triton paged decode kernel is not implemented "
                                  "yet; use --kernels eager")
    return reference_paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale=scale)


def write_kv(k_cache, v_cache, k, v, block_table, positions):
    if kernels.use_fused():
        raise NotImplementedError("kernels.paged_decode: the fused Triton write_kv kernel is not implemented yet; "
                                  "use --kernels eager")
    return reference_write_kv(k_cache, v_cache, k, v, block_table, positions)


def reference_paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, scale=None):
    B, H, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    max_blocks = block_table.shape[1]
    L = max_blocks * block_size
    # Gather every sequence's pages into a dense (B, L, Hkv, D) view; unused table entries may hold anything.
    table = block_table.long().clamp(min=0, max=k_cache.shape[0] - 1)
    k = k_cache[table].reshape(B, L, Hkv, D)
    v = v_cache[table].reshape(B, L, Hkv, D)
    valid = torch.arange(L, device=q.device)[None, :] < seq_lens.long()[:, None]  # (B, L)
    y = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=valid[:, None, None, :],
                                       scale=scale if scale is not None else 1 / math.sqrt(D), enable_gqa=H != Hkv)
    return y[:, :, 0, :]


def reference_write_kv(k_cache, v_cache, k, v, block_table, positions):
    block_size = k_cache.shape[1]
    positions = positions.long()
    rows = torch.arange(positions.shape[0], device=positions.device)
    blocks = block_table.long()[rows, positions // block_size]
    slots = positions % block_size
    k_cache[blocks, slots] = k.to(k_cache.dtype)
    v_cache[blocks, slots] = v.to(v_cache.dtype)
