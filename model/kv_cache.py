"""Paged KV cache: one pool of fixed-size pages ("blocks") for all layers, shared by every running sequence.

Pages (vLLM's PagedAttention, https://arxiv.org/abs/2309.06180): k and v (n_layer, num_blocks, block_size, n_kv_head,
head_dim), a free list and a refcount per block; block j of a sequence's table holds its tokens j*block_size ...
Forked samples share blocks, copied on the first write; the pool doubles when it runs dry. Prefix cache (SGLang's
RadixAttention, https://arxiv.org/abs/2312.07104, per block): full blocks in a tree keyed by their tokens; a request
reuses its longest cached prefix; allocation takes free blocks, then the least recently used unused cached leaf, then
grows the pool. Dense rows (eager decode, nanochat's layout): each running sequence also has a row of a (n_layer,
rows, n_kv_head, row_len, head_dim) tensor that SDPA reads without gathering pages, flushed into the pages before
these are read. The model calls `cache.attend(layer_idx, q, k, v)` inside `with cache.planned(plan):`."""
import contextlib
import heapq
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from kernels.attention import apply_rotary, attention, rms_norm
from kernels.paged_decode import paged_decode_attention, rope_norm_write_kv, write_kv

QK_NORM_EPS = 1e-6  # kernels.attention.attention's default, so the prefill and decode paths normalise alike

@dataclass
class PrefillPlan:
    """The N valid tokens of a right-padded (R, T) prompt batch: token i at (rows[i], cols[i]), position
    starts[rows[i]] + cols[i]. Int64 unless said."""
    rows: torch.Tensor           # (N,)
    cols: torch.Tensor           # (N,)
    token_tables: torch.Tensor   # (N, max_blocks) int32: its row's block table
    slots: torch.Tensor          # (N,) block * block_size + offset: its flat page slot
    token_index: torch.Tensor    # (N,) rows * T + cols; None without padding
    starts: torch.Tensor = None  # (R,) each row's cached-prefix length; None = all zero
    tables: torch.Tensor = None  # (R, max_blocks) int32: each row's block table (only with starts)
    rot: tuple = None            # (positions, [cos, cos], [sin, -sin]) for the eager path, set by its first layer

@dataclass
class DecodePlan:
    """One new token for each of B sequences; the fields after seq_lens are the dense-row (eager) path's."""
    positions: torch.Tensor  # (B,) int64: the new token's position
    tables: torch.Tensor     # (B, max_blocks) int32, padded with block 0 (never read); None with rows
    seq_lens: torch.Tensor   # (B,) int32: positions + 1; None with rows
    row_index: torch.Tensor = None  # (B,) int64: each sequence's row
    row_slots: torch.Tensor = None  # (B * Hkv,) int64: the new token's flat (row, head, position) in a layer's rows
    rot_cos: torch.Tensor = None    # (B, 1, D): [cos, cos] at each position, the cache dtype
    rot_sin: torch.Tensor = None    # (B, 1, D): [sin, -sin]
    n_rows: int = 0                 # rows in use: attention runs over rows[:n_rows]
    row_len: int = 0                # max seq_len: the columns attention reads
    mask: torch.Tensor = None       # (n_rows, 1, 1, row_len) bool; None when every row is row_len long
    direct: bool = False            # row_index == arange(B) and n_rows == B: no permutation
    rows: list = None               # the Row handles, advanced after the forward

@dataclass(eq=False, slots=True)
class Row:
    """A running sequence's dense row."""
    index: int           # moves when rows are compacted
    length: int = 0      # tokens in the row
    synced: int = 0      # the first `synced` of them are in the pages too
    blocks: list = None  # the sequence's block table (the engine's list)

class _Node:
    """A cached full block: `tokens` its block_size tokens, the path from the root the prefix before them."""
    __slots__ = ("tokens", "parent", "children", "block", "last_used", "depth")

    def __init__(self, tokens, parent, block, depth):
        self.tokens, self.parent, self.block, self.depth = tokens, parent, block, depth
        self.children, self.last_used = {}, 0

class PagedKVCache:
    """Block pool + free list + refcounts + prefix cache + dense rows. cos, sin: the model's rotary tables (rotary_len,
    head_dim / 2); block_size: 16, 32 or 64 tokens per page (else ValueError); num_blocks: the initial pool."""

    def __init__(self, n_layer, n_kv_head, head_dim, block_size, num_blocks, dtype, device, cos, sin,
                 prefix_caching=True):
        if block_size not in (16, 32, 64):
            raise ValueError(f"PagedKVCache: block_size must be 16, 32 or 64, got {block_size}")
        self.block_size, self.cos, self.sin, self.prefix_caching = block_size, cos, sin, prefix_caching
        shape = (n_layer, num_blocks, block_size, n_kv_head, head_dim)
        self.k, self.v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        self.refcount = [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives low ids first
        self.plan = None  # a PrefillPlan or DecodePlan during a forward
        self.root = _Node((), None, None, 0)
        self.node_of = {}          # block id -> its _Node, for every cached block
        self.n_evictable = self.evictions = 0  # cached blocks with refcount 0; cached blocks freed so far
        self._heap = []            # (last_used, -depth, tiebreak, node): eviction candidates, checked when popped
        self._clock, self._tiebreak = itertools.count(1), itertools.count()
        self.rows = []             # Row handles in use, rows[i].index == i
        self.row_k = self.row_v = None  # (n_layer, row capacity, Hkv, row_len capacity, D), allocated on first use
        self._rot = None           # _rotation()'s table

    @property
    def num_blocks(self):
        return self.k.shape[1]

    def num_free(self):
        """Blocks an allocation can take: free, or cached and unused (evictable)."""
        return len(self.free) + self.n_evictable

    def num_cached(self):
        """Blocks held by the prefix cache (in use or evictable)."""
        return len(self.node_of)

    def _zeros_with(self, old, shape):
        """Zeros of `shape` (the pages' dtype and device) with `old` (if any) copied into its leading corner."""
        t = torch.zeros(shape, dtype=self.k.dtype, device=self.k.device)
        if old is not None:
            t[tuple(map(slice, old.shape))] = old
        return t

    def allocate(self):
        """A free block id with refcount 1: a free one, else the LRU evictable cached one, else the pool doubles."""
        if not self.free and not self._evict():
            old = self.num_blocks
            shape = (self.k.shape[0], 2 * old) + tuple(self.k.shape[2:])
            self.k, self.v = self._zeros_with(self.k, shape), self._zeros_with(self.v, shape)
            self.refcount += [0] * old
            self.free = list(range(2 * old - 1, old - 1, -1)) + self.free
        b = self.free.pop()
        self.refcount[b] = 1
        return b

    def incref(self, b):
        if self.refcount[b] == 0 and b in self.node_of:
            self.n_evictable -= 1
        self.refcount[b] += 1

    def decref(self, b):
        self.refcount[b] -= 1
        assert self.refcount[b] >= 0, f"block {b} freed twice"
        if self.refcount[b] == 0:
            node = self.node_of.get(b)
            if node is None:
                self.free.append(b)
            else:
                self.n_evictable += 1
                self._push(node)

    def writable(self, blocks, pos):
        """Make position `pos` of block table `blocks` writable (a new block, or copy-on-write); True if it copied."""
        j = pos // self.block_size
        if j == len(blocks):
            blocks.append(self.allocate())
        elif self.refcount[blocks[j]] > 1 or blocks[j] in self.node_of:
            new = self.allocate()
            self.k[:, new] = self.k[:, blocks[j]]
            self.v[:, new] = self.v[:, blocks[j]]
            self.decref(blocks[j])
            blocks[j] = new
            return True
        return False

    def _push(self, node):
        """node may now be evictable (refcount 0, no children): queue it, keyed by last use (deeper first on ties)."""
        if not node.children and self.refcount[node.block] == 0:
            heapq.heappush(self._heap, (node.last_used, -node.depth, next(self._tiebreak), node))

    def _evict(self):
        """Move the least recently used evictable leaf's block to the free list. False if there is none."""
        while self._heap:
            last_used, _, _, node = heapq.heappop(self._heap)
            if (node.block is None or node.children or self.refcount[node.block] or last_used != node.last_used
                    or self.node_of.get(node.block) is not node):
                continue  # stale entry: used, grown or evicted since it was queued
            del node.parent.children[node.tokens]
            del self.node_of[node.block]
            self.n_evictable -= 1
            self.evictions += 1
            self.free.append(node.block)
            node.block = None
            if node.parent is not self.root:
                self._push(node.parent)
            return True
        return False

    def clear_prefix_cache(self):
        """Drop every cached block: evictable ones are freed, ones in use stay with their sequences."""
        for b, node in list(self.node_of.items()):
            node.block = None
            if self.refcount[b] == 0:
                self.free.append(b)
        self.node_of.clear()
        self.root.children.clear()
        self.n_evictable = 0
        self._heap = []

    def match_prefix(self, tokens):
        """Blocks (a reference each, the caller's) of the longest cached prefix of `tokens` but its last token."""
        if not self.prefix_caching:
            return []
        bs, node, blocks = self.block_size, self.root, []
        now = next(self._clock)
        for j in range((len(tokens) - 1) // bs):
            node = node.children.get(tuple(tokens[j * bs:(j + 1) * bs]))
            if node is None:
                break
            node.last_used = now
            self.incref(node.block)
            blocks.append(node.block)
        return blocks

    def insert_prefix(self, tokens, blocks, n_tokens):
        """Cache the full blocks of tokens[:n_tokens] (block table `blocks`); an already cached prefix keeps its own."""
        if not self.prefix_caching:
            return
        bs, node = self.block_size, self.root
        now = next(self._clock)
        for j in range(min(n_tokens // bs, len(blocks))):
            key = tuple(tokens[j * bs:(j + 1) * bs])
            child = node.children.get(key)
            if child is None:
                b = blocks[j]
                if b in self.node_of:  # cannot happen for a block holding exactly this prefix; keep the tree sound
                    return
                node.children[key] = self.node_of[b] = child = _Node(key, node, b, node.depth + 1)
                if self.refcount[b] == 0:
                    self.n_evictable += 1
            child.last_used = now
            node = child
        if node is not self.root:  # queue the leaf with its new last use (its parent follows once it goes)
            self._push(node)

    def open_row(self):
        """A dense row for a new running sequence (no memory until the eager path uses it)."""
        row = Row(len(self.rows))
        self.rows.append(row)
        return row

    def close_row(self, row):
        """Flush `row` into its pages (before they are cached or freed), give it back; the last row takes its place."""
        i, last = row.index, self.rows[-1]
        with torch.inference_mode():  # also called outside a step (engine.cancel)
            self._flush(row)
            if last is not row:
                if self.row_k is not None and last.length:
                    for t in (self.row_k, self.row_v):
                        t[:, i, :, :last.length] = t[:, last.index, :, :last.length]
                last.index, self.rows[i] = i, last
        self.rows.pop()
        row.index, row.length, row.synced, row.blocks = -1, 0, 0, None

    def _flush(self, row):
        """Copy row.synced .. row.length - 1 from the row into the pages, all layers."""
        a, b = row.synced, row.length
        if a < b and row.blocks is not None:
            bs, n_layer, _, _, Hkv, D = (self.block_size,) + tuple(self.k.shape)
            slots = torch.tensor([row.blocks[p // bs] * bs + p % bs for p in range(a, b)], device=self.k.device)
            for rows, pages in ((self.row_k, self.k), (self.row_v, self.v)):
                pages.view(n_layer, -1, Hkv, D).index_copy_(1, slots, rows[:, row.index, :, a:b].transpose(1, 2))
        row.synced = b

    def flush_rows(self):
        """Flush every row into the pages (before a step that reads the pages)."""
        for row in self.rows:
            self._flush(row)

    def _table(self, tables):
        """List of B block lists -> (B, max_blocks) int32 (padding 0: never read, seq_lens masks it)."""
        width = max(1, max(len(t) for t in tables))
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=self.k.device)

    def prefill_plan(self, tables, lengths, starts=None):
        """tables: each of R prompts' block list (cached prefix blocks first), lengths: their new-token counts,
        starts: their cached-prefix lengths (default 0) -> PrefillPlan."""
        device, bs = self.k.device, self.block_size
        starts = list(starts) if starts else [0] * len(lengths)
        T = max(lengths)
        rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
        cols = torch.cat([torch.arange(n) for n in lengths]).to(device)
        slots = [t[p // bs] * bs + p % bs for t, s, n in zip(tables, starts, lengths) for p in range(s, s + n)]
        table, prefix = self._table(tables), any(starts)
        return PrefillPlan(rows=rows, cols=cols, token_tables=table[rows], slots=torch.tensor(slots, device=device),
                           token_index=None if min(lengths) == T else rows * T + cols,
                           starts=torch.tensor(starts, device=device) if prefix else None,
                           tables=table if prefix else None)

    def decode_plan(self, tables, positions, rows=None):
        """tables: each of B sequences' block list, positions: where each new token goes, rows: their Row handles
        (eager mode then attends over the dense rows) -> DecodePlan."""
        device = self.k.device
        if rows is None or kernels.use_fused():
            self.flush_rows()  # this step reads the pages
            pos_t = torch.tensor(positions, device=device)
            return DecodePlan(positions=pos_t, tables=self._table(tables), seq_lens=(pos_t + 1).to(torch.int32))
        # The eager rows: few tensors, built once per step (the step is overhead bound at small batch).
        B, n, row_len = len(rows), len(self.rows), max(positions) + 1
        old_n, old_len = (0, 0) if self.row_k is None else (self.row_k.shape[1], self.row_k.shape[3])
        if old_n < n or old_len < row_len:  # grow: rows by doubling, length to a power of two
            L, _, _, Hkv, D = self.k.shape
            shape = (L, old_n if old_n >= n else max(n, 2 * old_n, 8), Hkv,
                     old_len if old_len >= row_len else max(64, 1 << (row_len - 1).bit_length()), D)
            self.row_k, self.row_v = self._zeros_with(self.row_k, shape), self._zeros_with(self.row_v, shape)
        for row, blocks, p in zip(rows, tables, positions):
            row.blocks = blocks
            if row.length < p:  # behind (new, or after a step on the pages alone): copy a .. p-1 from the pages
                a, bs = row.length, self.block_size
                pages = torch.tensor(blocks[a // bs:math.ceil(p / bs)], device=device)
                for src, dst in ((self.k, self.row_k), (self.v, self.row_v)):
                    dst[:, row.index, :, a:p] = src[:, pages].flatten(1, 2)[:, a % bs:a % bs + p - a].transpose(1, 2)
                row.synced = p
            row.length = p      # (never ahead; if it were, position p is simply written again)
        index = [r.index for r in rows]
        Hkv, cap_len = self.k.shape[3], self.row_k.shape[3]
        row_slots = [(i * Hkv + h) * cap_len + p for i, p in zip(index, positions) for h in range(Hkv)]
        ints = torch.tensor(positions + index + row_slots, device=device)  # one host -> device copy
        pos_t, index_t, slots_t = ints[:B], ints[B:2 * B], ints[2 * B:]
        rot = self._rotation()[pos_t]                            # (B, 2, D)
        mask = None
        if n != B or min(positions) + 1 != row_len:  # rows of other lengths (a row no sequence of B uses: 1)
            at = dict(zip(index, positions))
            lens = torch.tensor([at.get(i, 0) + 1 for i in range(n)], device=device)
            mask = (torch.arange(row_len, device=device) < lens[:, None])[:, None, None]
        return DecodePlan(positions=pos_t, tables=None, seq_lens=None, row_index=index_t, row_slots=slots_t,
                          rot_cos=rot[:, :1], rot_sin=rot[:, 1:], n_rows=n, row_len=row_len, mask=mask,
                          direct=n == B and index == list(range(n)), rows=list(rows))

    def _rotation(self):
        """([cos, cos], [sin, -sin]) stacked (rotary_len, 2, D), in the cache dtype: the eager paths' rotary."""
        if self._rot is None or self._rot.dtype != self.k.dtype:
            cos, sin = self.cos.to(self.k.dtype), self.sin.to(self.k.dtype)  # (rotary_len, D/2)
            self._rot = torch.stack([torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1)], 1)
        return self._rot

    @contextlib.contextmanager
    def planned(self, plan):
        """Set `plan` for the forwards inside the block; a decode plan's rows count their new token at the end."""
        self.plan = plan
        try:
            yield
            if isinstance(plan, DecodePlan) and plan.rows is not None:
                for row in plan.rows:  # the new token is in the rows (the pages get it when flushed)
                    row.length += 1
        finally:
            self.plan = None

    def attend(self, layer_idx, q, k, v):
        """q (B, T, H, D), k and v (B, T, Hkv, D) raw, not rotated or normalised -> y (B, T, H, D). Prefill: T
        prompt tokens at positions starts + 0..T-1 (right padded); decode: T = 1 at plan.positions[b]."""
        plan = self.plan
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]  # (num_blocks, block_size, Hkv, D)
        if isinstance(plan, PrefillPlan):
            return self._prefill(plan, k_cache, v_cache, q, k, v)
        if not isinstance(plan, DecodePlan):
            raise RuntimeError("PagedKVCache.attend called outside a planned forward (use `with cache.planned(...)`)")
        if plan.row_index is not None:
            return self._decode_rows(plan, layer_idx, q, k, v)[:, None]
        # Fused: one kernel rotates + normalises q and k and writes k/v into the pages, one attends over them.
        q = rope_norm_write_kv(q[:, 0], k[:, 0], v[:, 0], self.cos, self.sin, k_cache, v_cache, plan.tables,
                               plan.positions, eps=QK_NORM_EPS)   # (B, H, D), the cache dtype
        y = paged_decode_attention(q, k_cache, v_cache, plan.tables, plan.seq_lens)
        return y.to(v.dtype)[:, None]                             # (B, 1, H, D)

    def _decode_rows(self, plan, layer_idx, q, k, v):
        """Eager decode over the dense rows: q, k, v (B, 1, heads, D) raw -> (B, H, D). q and k are rotated as
        x * [cos, cos] + roll(x, D/2) * [sin, -sin] and normalised in one go: few ops, as the step is overhead bound."""
        (_, _, H, D), Hkv = q.shape, k.shape[2]
        qk = torch.cat([q, k], dim=2)[:, 0].to(self.row_k.dtype)  # (B, H + Hkv, D)
        qk = F.rms_norm(torch.addcmul(qk * plan.rot_cos, qk.roll(D // 2, -1), plan.rot_sin), (D,), eps=QK_NORM_EPS)
        q, k, v = qk[:, :H], qk[:, H:], v[:, 0].to(self.row_v.dtype)
        rk, rv = self.row_k[layer_idx], self.row_v[layer_idx]    # (rows, Hkv, row_len, D)
        n, L = plan.n_rows, plan.row_len
        if plan.direct and plan.mask is None:                     # rows 0..B-1 in order, one position: a slice
            rk[:n, :, L - 1] = k
            rv[:n, :, L - 1] = v
        else:
            rk.view(-1, D).index_copy_(0, plan.row_slots, k.reshape(-1, D))
            rv.view(-1, D).index_copy_(0, plan.row_slots, v.reshape(-1, D))
        if not plan.direct:                                       # rows in a different order (or more): scatter q
            q = q.new_zeros(n, H, D).index_copy_(0, plan.row_index, q)
        y = F.scaled_dot_product_attention(q[:, :, None], rk[:n, :, :L], rv[:n, :, :L], attn_mask=plan.mask,
                                           enable_gqa=H != Hkv)[:, :, 0]  # (n, H, D)
        if not plan.direct:
            y = y.index_select(0, plan.row_index)
        return y.to(v.dtype)

    def _prefill(self, plan, k_cache, v_cache, q, k, v):
        rows, cols = plan.rows, plan.cols
        (R, T, H, D), Hkv = q.shape, k.shape[2]
        if plan.starts is None and kernels.use_fused():
            cos, sin = self.cos[:T], self.sin[:T]                 # (T, D/2)
            y = attention(q, k, v, cos, sin, eps=QK_NORM_EPS)     # causal: right padding is never attended
            k = rms_norm(apply_rotary(k, cos, sin), eps=QK_NORM_EPS)  # what the kernel attended with, to cache
            write_kv(k_cache, v_cache, k[rows, cols], v[rows, cols], plan.token_tables, cols)  # (N, Hkv, D) each
            return y
        # Eager, or a cached prefix (then in both modes): q and k rotated + normalised together, once.
        if plan.rot is None:                                      # once per forward, not per layer
            pos = torch.arange(T, device=q.device) if plan.starts is None else \
                plan.starts[:, None] + torch.arange(T, device=q.device)  # (T,) or (R, T)
            rot = self._rotation()[pos]                           # (..., T, 2, D)
            plan.rot = (pos, rot[..., :1, :], rot[..., 1:, :])    # (..., T, 1, D) each
        pos, rot_cos, rot_sin = plan.rot
        qk = torch.cat([q, k], dim=2).to(k_cache.dtype)           # (R, T, H + Hkv, D)
        qk = F.rms_norm(torch.addcmul(qk * rot_cos, qk.roll(D // 2, -1), rot_sin), (D,), eps=QK_NORM_EPS)
        q, k = qk[:, :, :H], qk[:, :, H:]
        k_new, v_new = k.reshape(R * T, Hkv * D), v.reshape(R * T, Hkv * D).to(v_cache.dtype)
        if plan.token_index is not None:                          # right padding: its k/v are not stored
            k_new, v_new = k_new[plan.token_index], v_new[plan.token_index]
        k_cache.view(-1, Hkv * D).index_copy_(0, plan.slots, k_new)
        v_cache.view(-1, Hkv * D).index_copy_(0, plan.slots, v_new)
        if plan.starts is None:                                   # causal: right padding is never attended
            keys, vals, mask = k.transpose(1, 2), v.transpose(1, 2).to(q.dtype), None
        else:  # row r's tokens sit at starts[r] + col and attend to the cached prefix in the pages as well
            keys, vals = (c[plan.tables.long()].flatten(1, 2).transpose(1, 2) for c in (k_cache, v_cache))
            mask = (torch.arange(keys.shape[2], device=q.device)[None, None, :] <= pos[:, :, None])[:, None]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=H != Hkv)
        return y.transpose(1, 2).to(v.dtype)

class DecodeGraphs:
    """CUDA graphs of the fused decode step (launch bound at small batch), one per (batch bucket, block table width),
    captured on first use. The batch is padded to its bucket (BUCKETS up to max_batch; bigger batches run without a
    graph), the block table to a power-of-two width; padded rows write into one scratch page and attend to it alone
    (seq_len 1). A grown pool drops every graph. capture=False runs the same padded step without graphs (CPU tests)."""

    BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

    def __init__(self, model, cache, max_batch=256, capture=True):
        self.model, self.cache, self.capture = model, cache, capture
        self.buckets = [b for b in self.BUCKETS if b < max_batch] + [max_batch]
        self.graphs = {}      # (batch, width) -> dict of the graph and its static tensors
        self.scratch = None   # the page the padded rows write into
        self._storage = None  # cache.k's address the graphs were captured with
        self._pool = None     # one memory pool for all graphs (they never run at the same time)

    def usable(self, n):
        """Whether a step of n sequences goes through run(): a bucket fits, in fused mode (graphs) or capture=False."""
        return self.bucket(n) is not None and (kernels.use_fused() or not self.capture)

    def bucket(self, n):
        """The batch a step of n sequences is padded to, or None if n is bigger than every bucket."""
        return next((b for b in self.buckets if b >= n), None)

    @staticmethod
    def width(n_blocks):
        """The power-of-two block-table width for a longest table of n_blocks pages."""
        return 1 << max(0, n_blocks - 1).bit_length()

    def release(self):
        """Drop the graphs and give the scratch page back."""
        self.graphs.clear()
        if self.scratch is not None:
            self.cache.decref(self.scratch)
            self.scratch = None

    def run(self, tables, positions, tokens):
        """One decode step: tables (B lists of block ids), positions (B,), tokens (B,) ints -> logits (B, V) fp32,
        valid until the next run; None when B is bigger than every bucket."""
        B = len(tables)
        if (batch := self.bucket(B)) is None:
            return None
        cache = self.cache
        cache.flush_rows()  # the graph reads the pages
        if self.scratch is None:
            self.scratch = cache.allocate()
        width = self.width(max(len(t) for t in tables))
        if self._storage != cache.k.data_ptr():  # the pool grew: the graphs point at the old one
            self.graphs.clear()
            self._storage = cache.k.data_ptr()
        pad, sc = batch - B, self.scratch
        inputs = dict(idx=torch.tensor([[t] for t in tokens] + [[0]] * pad),
                      positions=torch.tensor(list(positions) + [0] * pad),
                      tables=torch.tensor([t + [sc] * (width - len(t)) for t in tables] + [[sc] * width] * pad,
                                          dtype=torch.int32),
                      seq_lens=torch.tensor([p + 1 for p in positions] + [1] * pad, dtype=torch.int32))
        if not self.capture:
            return self._forward({k: v.to(cache.k.device) for k, v in inputs.items()})[:B]
        g = self.graphs.get((batch, width))
        if g is None:
            g = self.graphs[(batch, width)] = self._capture(batch, width)
        for name, value in inputs.items():
            g[name].copy_(value, non_blocking=True)
        g["graph"].replay()
        return g["logits"][:B]

    def _forward(self, static):
        plan = DecodePlan(positions=static["positions"], tables=static["tables"], seq_lens=static["seq_lens"])
        with self.cache.planned(plan):
            return self.model(static["idx"], kv_cache=self.cache)[:, 0]

    def _capture(self, batch, width):
        device, sc = self.cache.k.device, self.scratch
        static = dict(idx=torch.zeros(batch, 1, dtype=torch.long, device=device),
                      positions=torch.zeros(batch, dtype=torch.long, device=device),
                      tables=torch.full((batch, width), sc, dtype=torch.int32, device=device),
                      seq_lens=torch.ones(batch, dtype=torch.int32, device=device))
        # Warm up on a side stream (Triton compiles and autotunes there, not during capture): with every row pointed
        # at the scratch page, the warm-up writes nowhere else.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(static)
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static["logits"] = self._forward(static)
        static["graph"] = graph
        return static
