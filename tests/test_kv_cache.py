"""PagedKVCache: the eager dense-row decode path vs the paged reference, the prefix cache across requests (reuse,
prefill of the new tokens only, LRU eviction, every block back to the pool), and the engine on top of both."""
import copy

import pytest
import torch

import kernels
from model.engine import Engine
from model.kv_cache import DecodeGraphs, PagedKVCache
from stand_ins import ByteTokenizer, tiny_model

torch.manual_seed(0)

TOK = ByteTokenizer()

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny shapes: one thread is much faster than two contended ones on a shared CPU.
    n, old = torch.get_num_threads(), kernels.get_mode()
    torch.set_num_threads(1)
    kernels.set_mode("eager")
    yield
    torch.set_num_threads(n)
    kernels.set_mode(old)

@pytest.fixture(scope="module")
def model():
    return tiny_model()

def assert_all_returned(engine):
    """No block in use; every block free or in the evictable prefix cache."""
    cache = engine.cache
    assert not any(cache.refcount)
    assert cache.num_free() == cache.num_blocks
    assert len(cache.free) + cache.num_cached() == cache.num_blocks
    assert not cache.rows and not engine.running and not engine.waiting

def make_cache(n_layer=2, Hkv=2, D=64, block_size=16, num_blocks=12, rotary_len=256):
    t = torch.arange(rotary_len, dtype=torch.float32)[:, None] * 0.37 ** torch.arange(D // 2)[None, :]
    cache = PagedKVCache(n_layer, Hkv, D, block_size, num_blocks, torch.float32, "cpu", t.cos(), t.sin())
    cache.k.normal_()  # whatever the pages hold: the paths must agree on any content
    cache.v.normal_()
    return cache

@torch.inference_mode()
def test_dense_rows_match_paged_reference():
    """Eager decode over the dense rows (compacted, so in a permuted order; one row filled from the pages on first
    use) gives the outputs of write_kv + paged_decode_attention_reference over two steps, and once flushed, the
    same pages."""
    H, Hkv, D = 4, 2, 64
    cache = make_cache(Hkv=Hkv, D=D)
    ref = copy.deepcopy(cache)
    # New tokens at positions 0, 17 and 32 (a page boundary); the last two share their first (full) page, as forked
    # samples do (a shared page is never written: the engine copies it first)
    tables = [[0], [3, 7], [3, 4, 5]]
    positions = [0, 17, 32]
    dummy = cache.open_row()
    rows = [cache.open_row() for _ in tables]
    cache.close_row(dummy)  # the last row moves to index 0: the rows are not in batch order any more
    assert [r.index for r in rows] == [1, 2, 0]
    for step in range(2):
        pos = [p + step for p in positions]
        plan = cache.decode_plan(tables, pos, rows)
        ref_plan = ref.decode_plan(tables, pos)
        assert plan.row_index is not None and not plan.direct and plan.mask is not None
        qkv = [(torch.randn(3, 1, H, D), torch.randn(3, 1, Hkv, D), torch.randn(3, 1, Hkv, D)) for _ in range(2)]
        with cache.planned(plan):  # one forward: both layers
            ys = [cache.attend(layer, *qkv[layer]) for layer in range(2)]
        with ref.planned(ref_plan):
            ys_ref = [ref.attend(layer, *qkv[layer]) for layer in range(2)]
        torch.testing.assert_close(ys, ys_ref, atol=1e-5, rtol=1e-5)
        assert [r.length - r.synced for r in rows] == [step + 1] * 3  # the new k/v wait in the rows
    cache.flush_rows()                                                # the pages as write_kv left them
    torch.testing.assert_close(cache.k, ref.k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache.v, ref.v)
    assert [r.length for r in rows] == [p + 2 for p in positions] and all(r.synced == r.length for r in rows)

@torch.inference_mode()
def test_rows_catch_up_after_a_paged_step():
    """A step on the pages alone (the fused path, or no rows) leaves a row behind: the next row step fills it."""
    H, Hkv, D = 2, 2, 64
    cache = make_cache(n_layer=1, Hkv=Hkv, D=D)
    ref = copy.deepcopy(cache)
    tables, rows = [[1, 2]], [cache.open_row()]
    for pos in (20, 21, 22):
        q, k, v = torch.randn(1, 1, H, D), torch.randn(1, 1, Hkv, D), torch.randn(1, 1, Hkv, D)
        with cache.planned(cache.decode_plan(tables, [pos], rows if pos != 21 else None)):
            y = cache.attend(0, q, k, v)
        with ref.planned(ref.decode_plan(tables, [pos])):
            y_ref = ref.attend(0, q, k, v)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert rows[0].length == 23

def test_prefix_cache_prefills_only_new_tokens(model):
    """A second request starting with the first's prompt (a system prompt) and a third continuing a finished
    conversation (prompt + completion) prefill only their uncached tokens, and their tokens equal an engine
    without caching, token for token."""
    system = list(range(40, 80))                   # 40 tokens: 2 full pages of 16 + 8
    first = system + [5, 6, 7]
    second = system + [9, 8, 7, 6, 5]
    cached, plain = Engine(model, TOK, block_size=16), Engine(model, TOK, block_size=16, prefix_caching=False)
    out = {}
    for name, engine in (("cached", cached), ("plain", plain)):
        a = engine.generate_batch(first, max_tokens=20, temperature=0)[0][0]
        before = engine.stats["prefill_tokens"]
        b = engine.generate_batch(second, max_tokens=12, temperature=0)[0][0]
        new_second = engine.stats["prefill_tokens"] - before
        third_prompt = a + [1, 2, 3]               # the next turn: the whole first exchange, then a new message
        before = engine.stats["prefill_tokens"]
        c = engine.generate_batch(third_prompt, num_samples=2, max_tokens=10, temperature=0)[0]
        out[name] = (a, b, c, new_second, engine.stats["prefill_tokens"] - before)
    assert out["cached"][:3] == out["plain"][:3]
    assert out["plain"][3] == len(second) and out["plain"][4] == len(third_prompt)
    assert out["cached"][3] == len(second) - 32    # the 2 full system-prompt pages came from the cache
    # first + its 20 tokens = 63 cached tokens (3 full pages; the 4th page was still being written)
    assert out["cached"][4] == len(third_prompt) - 48
    assert cached.stats["prefix_hit_tokens"] == 32 + 48
    assert_all_returned(cached)
    assert_all_returned(plain)

def test_prefix_cache_logits_match_full_forward(model):
    """Rows prefilled after a cached prefix (mixed with a row without one in the same padded batch) and decoded from
    there: every emitted token's logits equal a full forward of its sequence."""
    engine = Engine(model, TOK, block_size=16)
    shared = list(range(100, 137))                 # 37 tokens
    engine.generate_batch(shared, max_tokens=1, temperature=0)
    log, sample = [], engine._sample

    def record(logits, req):
        log.append((req, logits.clone()))
        return sample(logits, req)

    engine._sample = record
    prompts = [shared + [1, 2, 3], list(range(7, 29)), shared[:33]]  # hit 32, miss, hit 32 with 1 new token
    reqs = [engine.submit(p, max_tokens=6, temperature=0) for p in prompts]
    while engine.has_work():
        engine.step()
    assert engine.stats["prefix_hit_tokens"] == 64 and engine.stats["prefill_batches"] == 2
    with torch.inference_mode():
        seen = {id(r): 0 for r in reqs}
        for req, logits in log:
            if id(req) not in seen:
                continue
            n = len(req.prompt) + seen[id(req)]
            seq = (req.prompt + req.completions[0])[:n]
            full = model(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(logits[0], full, atol=1e-4, rtol=1e-4)
            seen[id(req)] += 1
    assert [seen[id(r)] for r in reqs] == [len(r.completions[0]) for r in reqs] and seen[id(reqs[0])] > 1
    assert_all_returned(engine)

def test_eviction_is_lru_and_the_pool_does_not_grow():
    cache = make_cache(num_blocks=6, block_size=16)
    A, B = list(range(0, 40)), list(range(1000, 1040))   # 2 full pages each (+8 tokens)
    for toks in (A, B):
        blocks = [cache.allocate() for _ in range(3)]
        cache.insert_prefix(toks, blocks, len(toks))
        for b in blocks:
            cache.decref(b)                                # the sequence ended: 2 pages cached, 1 freed
    assert cache.num_cached() == 4 and cache.num_free() == 6 and len(cache.free) == 2
    for b in cache.match_prefix(A):                        # A is used again: B is now the least recently used
        cache.decref(b)
    taken = [cache.allocate() for _ in range(3)]           # 2 free, then 1 eviction: B's second page (a leaf)
    assert cache.num_blocks == 6 and cache.evictions == 1
    held = cache.match_prefix(B) + cache.match_prefix(A)
    assert len(held) == 1 + 2
    for b in taken + held:
        cache.decref(b)
    assert not any(cache.refcount) and cache.num_free() == 6
    cache.clear_prefix_cache()
    assert cache.num_cached() == 0 and sorted(cache.free) == list(range(6))

def test_engine_under_pool_pressure(model):
    """A pool of 4 pages, distinct prompts then prompts sharing a prefix: cached pages are evicted (LRU) instead of
    the pool growing, outputs equal an engine without caching, and every block comes back."""
    distinct = [list(range(100 + 25 * i, 120 + 25 * i)) for i in range(3)]  # each leaves 1 cached page
    base = list(range(60, 92))                                               # 2 full pages
    prompts = distinct + [base + [i, i + 1] for i in range(3)] + [base[:20]]
    cached = Engine(model, TOK, block_size=16, num_blocks=4)
    plain = Engine(model, TOK, block_size=16, num_blocks=4, prefix_caching=False)
    outs = [[e.generate_batch(p, max_tokens=8, temperature=0)[0][0] for p in prompts] for e in (cached, plain)]
    assert outs[0] == outs[1]
    assert cached.cache.num_blocks == 4 and cached.cache.evictions == 2
    assert cached.stats["prefix_hit_tokens"] == 32 + 32 + 16
    assert_all_returned(cached)
    assert_all_returned(plain)

@torch.inference_mode()
def test_fused_decode_step_matches_reference(fused):
    """The fused decode step (rope_norm_write_kv + paged_decode_attention, Triton under the interpreter) gives the
    outputs and pages of the references and of the eager dense rows."""
    H, Hkv, D = 4, 2, 64
    fused_cache = make_cache(n_layer=1, Hkv=Hkv, D=D)
    ref, rows_cache = copy.deepcopy(fused_cache), copy.deepcopy(fused_cache)
    tables, positions = [[2], [5, 6]], [3, 16]
    rows = [rows_cache.open_row() for _ in tables]
    q, k, v = torch.randn(2, 1, H, D), torch.randn(2, 1, Hkv, D), torch.randn(2, 1, Hkv, D)
    with fused_cache.planned(fused_cache.decode_plan(tables, positions, rows)):  # fused: the rows are not used
        y = fused_cache.attend(0, q, k, v)
    kernels.set_mode("eager")
    try:
        with ref.planned(ref.decode_plan(tables, positions)):
            y_ref = ref.attend(0, q, k, v)
        with rows_cache.planned(rows_cache.decode_plan(tables, positions, rows)):
            y_rows = rows_cache.attend(0, q, k, v)
        rows_cache.flush_rows()
    finally:
        kernels.set_mode("fused")
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_cache.k, ref.k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused_cache.k, rows_cache.k, atol=1e-6, rtol=1e-6)
    assert torch.equal(fused_cache.v, ref.v) and torch.equal(fused_cache.v, rows_cache.v)

def test_fused_engine_with_prefix_cache_matches_full_recompute(model, fused):
    """Fused mode (Triton under the interpreter): greedy tokens of a fresh prompt and of one that hits the prefix
    cache equal a full forward per token (eager, no cache)."""
    engine = Engine(model, TOK, block_size=16)
    prompts = [list(range(30, 50)), list(range(30, 48)) + [7, 8]]  # the second reuses the first's full page
    outs = [engine.generate_batch(p, max_tokens=3, temperature=0)[0][0] for p in prompts]
    assert engine.stats["prefix_hit_tokens"] == 16
    kernels.set_mode("eager")
    refs = [p + list(model.generate(p, 3, temperature=0)) for p in prompts]
    kernels.set_mode("fused")
    assert outs == refs
    assert_all_returned(engine)

def test_decode_graph_buckets_and_padding(model):
    """CUDA graphs run only on a GPU; what the CPU can check: the buckets, the table widths, and that the padded
    step (capture=False: the same padded forward without a graph) gives the tokens and logits of the plain step,
    with the padded rows confined to the scratch page."""
    cache = Engine(model, TOK).cache
    graphs = DecodeGraphs(model, cache, max_batch=40, capture=False)
    assert [graphs.bucket(n) for n in (1, 2, 3, 17, 33, 40, 41)] == [1, 2, 4, 24, 40, 40, None]
    assert [graphs.width(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
    assert graphs.usable(3) and not graphs.usable(41)
    assert not DecodeGraphs(model, cache).usable(1)  # capturing graphs: fused mode only (eager here)
    prompts = [list(range(10, 40)), [1, 2, 3], list(range(50, 67))]  # B = 3: padded to 4, tables of 2 and 1 pages
    plain = Engine(model, TOK, prefix_caching=False)
    padded = Engine(model, TOK, prefix_caching=False)
    padded.graphs = DecodeGraphs(model, padded.cache, max_batch=40, capture=False)
    logs = []
    for engine in (plain, padded):
        log, sample = [], engine._sample
        engine._sample = lambda logits, req, log=log, sample=sample: log.append(logits.clone()) or sample(logits, req)
        logs.append((engine.generate_many(prompts, max_tokens=6, temperature=0), log))
    assert logs[0][0] == logs[1][0]
    for a, b in zip(logs[0][1], logs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    scratch = padded.graphs.scratch
    assert scratch is not None and padded.cache.refcount[scratch] == 1
    padded.graphs.release()
    assert_all_returned(padded)

@pytest.mark.gpu
def test_cuda_graphs_match_the_plain_fused_step(model, fused):
    """On a GPU: the decode step replayed from CUDA graphs gives the tokens of the same fused step run directly,
    across buckets (3 then 2 then 1 running sequences) and a pool that grows mid-run (the graphs are captured
    again)."""
    m = copy.deepcopy(model).cuda()
    prompts = [list(range(10, 40)), [1, 2, 3], list(range(50, 67))]
    outs = []
    for graphs in (False, True):
        engine = Engine(m, TOK, num_blocks=4, prefix_caching=False, cuda_graphs=graphs)
        outs.append([engine.generate_many(prompts[:n], max_tokens=40, temperature=0) for n in (3, 2, 1)])
    assert outs[0] == outs[1]
    assert engine.graphs.graphs and engine.cache.num_blocks > 4
    engine.graphs.release()
    assert_all_returned(engine)
