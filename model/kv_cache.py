"""Paged KV cache: one pool of fixed-size pages ("blocks") for all layers, shared by every running sequence.

k and v are (n_layer, num_blocks, block_size, n_kv_head, head_dim) tensors, with a free list and a refcount per
block. A sequence owns a block table (a list of block ids): block j holds its tokens j*block_size ...
(j+1)*block_size - 1. Sequences forked from one prompt share its blocks (refcount > 1); the first write into a shared
block copies it first (copy-on-write), so full prompt pages are stored once however many samples run. A finished
sequence gives its blocks back at once, and the pool doubles whenever it runs dry.

The model calls `cache.attend(layer_idx, q, k, v)` with raw q/k/v during a forward (model/gpt.py). What kind of
forward that is, the engine says by setting `cache.plan` around it (`with cache.planned(plan): model(...)`):
- PrefillPlan: R prompts right padded to T, each at positions 0..len-1. Attention by kernels.attention.attention
  (causal, so the padding is never attended); the rotated + normalised k and the v of the valid tokens are scattered
  into the pages by kernels.paged_decode.write_kv.
- DecodePlan: one new token per sequence, at its own position. Rotary + RMS norm here, write_kv, then
  kernels.paged_decode.paged_decode_attention over the sequence's pages.
Both follow kernels.set_mode: eager = the PyTorch references, fused = the Triton kernels.
"""
import contextlib
from dataclasses import dataclass

import torch

from kernels.attention import apply_rotary, attention, rms_norm
from kernels.paged_decode import paged_decode_attention, write_kv

QK_NORM_EPS = 1e-6  # kernels.attention.attention's default, so the prefill and decode paths normalise alike


@dataclass
class PrefillPlan:
    """The N valid tokens of a right-padded (R, T) prompt batch: token i sits at (rows[i], cols[i])."""
    rows: torch.Tensor          # (N,) int64: the batch row of each valid token
    cols: torch.Tensor          # (N,) int64: its position in its prompt (= its column in the batch)
    token_tables: torch.Tensor  # (N, max_blocks) int32: the block table of its row


@dataclass
class DecodePlan:
    """One new token for each of B sequences."""
    positions: torch.Tensor  # (B,) int64: the new token's position
    tables: torch.Tensor     # (B, max_blocks) int32: block tables, padded with block 0 (never read)
    seq_lens: torch.Tensor   # (B,) int32: positions + 1, the new token's k/v included


class PagedKVCache:
    """Block pool for all layers + free list + refcounts; `attend` is what the model calls during a forward.

    cos, sin: the model's rotary tables (rotary_len, head_dim / 2). block_size: 16, 32 or 64 tokens per page (else
    ValueError); num_blocks: the initial pool size, doubled on demand."""

    def __init__(self, n_layer, n_kv_head, head_dim, block_size, num_blocks, dtype, device, cos, sin):
        if block_size not in (16, 32, 64):
            raise ValueError(f"PagedKVCache: block_size must be 16, 32 or 64, got {block_size}")
        self.block_size = block_size
        shape = (n_layer, num_blocks, block_size, n_kv_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refcount = [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives low ids first
        self.cos = cos
        self.sin = sin
        self.plan = None  # a PrefillPlan or DecodePlan while the engine runs a forward, else None

    @property
    def num_blocks(self):
        return self.k.shape[1]

    def num_free(self):
        return len(self.free)

    # -- blocks ----------------------------------------------------------------------------------------------------
    def _grow(self):
        old = self.num_blocks
        new_shape = (self.k.shape[0], 2 * old) + tuple(self.k.shape[2:])
        for name in ("k", "v"):
            t = torch.zeros(new_shape, dtype=self.k.dtype, device=self.k.device)
            t[:, :old] = getattr(self, name)
            setattr(self, name, t)
        self.refcount += [0] * old
        self.free = list(range(2 * old - 1, old - 1, -1)) + self.free

    def allocate(self):
        """A free block id with refcount 1 (the pool doubles if none is free)."""
        if not self.free:
            self._grow()
        b = self.free.pop()
        self.refcount[b] = 1
        return b

    def incref(self, b):
        self.refcount[b] += 1

    def decref(self, b):
        self.refcount[b] -= 1
        assert self.refcount[b] >= 0, f"block {b} freed twice"
        if self.refcount[b] == 0:
            self.free.append(b)

    def writable(self, blocks, pos):
        """Make sure token position `pos` of a sequence with block table `blocks` can be written: append a fresh
        block at a page boundary, copy a shared block first (copy-on-write). Returns True if it copied."""
        j = pos // self.block_size
        if j == len(blocks):
            blocks.append(self.allocate())
        elif self.refcount[blocks[j]] > 1:
            new = self.allocate()
            self.k[:, new] = self.k[:, blocks[j]]
            self.v[:, new] = self.v[:, blocks[j]]
            self.decref(blocks[j])
            blocks[j] = new
            return True
        return False

    # -- plans -----------------------------------------------------------------------------------------------------
    def _table(self, tables):
        """List of B block lists -> (B, max_blocks) int32 (padding 0: never read, seq_lens masks it)."""
        width = max(1, max(len(t) for t in tables))
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=self.k.device)

    def prefill_plan(self, tables, lengths):
        """tables: the block list of each of R prompts, lengths: their token counts -> PrefillPlan."""
        device = self.k.device
        lens = torch.tensor(lengths)
        rows = torch.repeat_interleave(torch.arange(len(lengths)), lens).to(device)
        cols = torch.cat([torch.arange(n) for n in lengths]).to(device)
        return PrefillPlan(rows=rows, cols=cols, token_tables=self._table(tables)[rows])

    def decode_plan(self, tables, positions):
        """tables: the block list of each of B sequences, positions: where each one's new token goes -> DecodePlan."""
        positions = torch.tensor(positions, device=self.k.device)
        return DecodePlan(positions=positions, tables=self._table(tables), seq_lens=(positions + 1).to(torch.int32))

    @contextlib.contextmanager
    def planned(self, plan):
        """Set `plan` for the forwards inside the block; cleared on the way out, also on an exception."""
        self.plan = plan
        try:
            yield
        finally:
            self.plan = None

    # -- what the model calls --------------------------------------------------------------------------------------
    def attend(self, layer_idx, q, k, v):
        """q (B, T, H, D), k and v (B, T, Hkv, D) raw, not rotated or normalised -> y (B, T, H, D).

        Prefill: T prompt tokens at positions 0..T-1 (right padded); decode: T = 1 at plan.positions[b]."""
        plan = self.plan
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]  # (num_blocks, block_size, Hkv, D)
        if isinstance(plan, PrefillPlan):
            T = q.shape[1]
            cos, sin = self.cos[:T], self.sin[:T]                 # (T, D/2)
            y = attention(q, k, v, cos, sin, eps=QK_NORM_EPS)     # causal: right padding is never attended
            k = rms_norm(apply_rotary(k, cos, sin), QK_NORM_EPS)
            rows, cols = plan.rows, plan.cols
            write_kv(k_cache, v_cache, k[rows, cols], v[rows, cols], plan.token_tables, cols)  # (N, Hkv, D) each
            return y
        if not isinstance(plan, DecodePlan):
            raise RuntimeError("PagedKVCache.attend called outside a planned forward (use `with cache.planned(...)`)")
        pos = plan.positions
        cos, sin = self.cos[pos], self.sin[pos]                   # (B, D/2): a "time" axis of length B
        q = rms_norm(apply_rotary(q.transpose(0, 1), cos, sin), QK_NORM_EPS)[0]  # (B, H, D)
        k = rms_norm(apply_rotary(k.transpose(0, 1), cos, sin), QK_NORM_EPS)[0]  # (B, Hkv, D)
        write_kv(k_cache, v_cache, k, v[:, 0], plan.tables, pos)
        y = paged_decode_attention(q.to(k_cache.dtype).contiguous(), k_cache, v_cache, plan.tables, plan.seq_lens)
        return y.to(v.dtype)[:, None]                             # (B, 1, H, D)
