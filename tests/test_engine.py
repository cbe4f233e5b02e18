"""Engine: paged KV cache vs full recomputation, batching, shared prefixes, block accounting, tools, sampling."""
import os

import pytest
import torch

import kernels
from model import sandbox
from model.engine import Engine
from model.gpt import GPT
from model.tokenizer import SPECIAL_TOKENS
from stand_ins import ByteTokenizer, tiny_model

torch.manual_seed(0)

TOK = ByteTokenizer()
SP = {name: TOK.encode_special(name) for name in SPECIAL_TOKENS}

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: one thread is much faster than two contended ones on a shared CPU.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    old = kernels.get_mode()
    kernels.set_mode("eager")
    yield
    torch.set_num_threads(n)
    kernels.set_mode(old)

@pytest.fixture(scope="module")
def model():
    return tiny_model()

PROMPTS = [[SP["<|bos|>"], 1, 2, 3, 4, 5], list(range(10, 40)), [SP["<|bos|>"]], list(range(50, 66))]  # 6, 30, 1, 16

def assert_all_free(engine):
    assert engine.cache.num_free() == engine.cache.num_blocks
    assert not any(engine.cache.refcount)
    assert not engine.running and not engine.waiting

def test_greedy_matches_full_recompute(model):
    engine = Engine(model, TOK, block_size=16, num_blocks=4)  # small pool: exercises growth too
    for prompt in PROMPTS:
        ref = list(model.generate(prompt, 24, temperature=0))  # full forward every step, no cache
        seqs, masks = engine.generate_batch(prompt, max_tokens=24, temperature=0)
        assert seqs[0] == prompt + ref
        assert masks[0] == [0] * len(prompt) + [1] * 24
    assert_all_free(engine)

def test_mixed_lengths_batch_equals_alone(model):
    engine = Engine(model, TOK, block_size=16)
    alone = [engine.generate_batch(p, max_tokens=12, temperature=0) for p in PROMPTS]
    before = engine.stats["prefill_batches"]
    together = engine.generate_many(PROMPTS, max_tokens=12, temperature=0)
    assert engine.stats["prefill_batches"] == before + 1  # one padded prefill for all four prompts
    assert together == alone
    assert_all_free(engine)

def record_logits(engine):
    """Capture, for every emitted token, (request, sample index, position, the logits it was sampled from)."""
    log, pending = [], []
    sample, emit = engine._sample, engine._emit

    def _sample(logits, req):
        pending.append(logits.clone())
        return sample(logits, req)

    def _emit(req, seqs, sampled):
        logits = pending.pop(0)  # _sample calls come in the same order as the _emit calls
        for row, s in enumerate(seqs):
            log.append((req, s.index, len(s.tokens), logits[row]))
        return emit(req, seqs, sampled)

    engine._sample, engine._emit = _sample, _emit
    return log

@pytest.mark.parametrize("prompt_len,block_size", [(21, 16), (32, 16), (21, 32)])
def test_shared_prefix_samples(model, prompt_len, block_size):
    """num_samples continuations share the prompt pages (one prefill); after they diverge, every sample's logits
    still equal a full forward of its own sequence (a copy-on-write bug would mix samples)."""
    engine = Engine(model, TOK, block_size=block_size)
    log = record_logits(engine)
    prompt = list(range(100, 100 + prompt_len))
    req = engine.submit(prompt, num_samples=4, max_tokens=10, temperature=1.5, seed=1)
    while not req.done:
        engine.step()
    assert engine.stats["prefill_tokens"] == prompt_len  # the prompt was prefilled once, not 4 times
    # COW: the first write of 3 of the 4 samples copies the shared partial page (none if the prompt fills its pages)
    assert engine.stats["cow_copies"] == (3 if prompt_len % block_size else 0)
    assert len({tuple(c) for c in req.completions}) > 1, "samples should diverge at temperature 1.5"
    with torch.inference_mode():
        for r, i, pos, logits in log:
            seq = (prompt + req.completions[i])[:pos]
            full = model(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    assert len(log) == sum(len(c) for c in req.completions) > 4
    assert_all_free(engine)

def test_greedy_samples_identical(model):
    engine = Engine(model, TOK)
    seqs, _ = engine.generate_batch(PROMPTS[1], num_samples=3, max_tokens=8, temperature=0)
    assert seqs[0] == seqs[1] == seqs[2] == engine.generate_batch(PROMPTS[1], max_tokens=8, temperature=0)[0][0]
    assert_all_free(engine)

def test_seeded_sampling_reproducible(model):
    engine = Engine(model, TOK)
    a = engine.generate_batch(PROMPTS[0], num_samples=2, max_tokens=16, temperature=1.0, top_k=50, seed=7)
    b = engine.generate_batch(PROMPTS[0], num_samples=2, max_tokens=16, temperature=1.0, top_k=50, seed=7)
    c = engine.generate_batch(PROMPTS[0], num_samples=2, max_tokens=16, temperature=1.0, top_k=50, seed=8)
    assert a == b and a != c
    # The generator is per request: batching with another request does not change this one's samples.
    together = engine.generate_many([PROMPTS[0], PROMPTS[1]], num_samples=2, max_tokens=16, temperature=1.0,
                                    top_k=50, seed=7)
    assert together[0] == a
    # top_k = 1 is greedy
    g = engine.generate_batch(PROMPTS[0], max_tokens=16, temperature=1.0, top_k=1, seed=3)
    assert g == engine.generate_batch(PROMPTS[0], max_tokens=16, temperature=0)
    assert_all_free(engine)

def test_continuous_batching_and_streaming(model):
    engine = Engine(model, TOK, block_size=16, num_blocks=2)
    alone = {i: engine.generate_batch(p, max_tokens=10, temperature=0)[0][0] for i, p in enumerate(PROMPTS)}
    reqs = [engine.submit(PROMPTS[0], max_tokens=10, temperature=0)]
    for i in range(1, len(PROMPTS)):  # a newcomer joins every third decode step
        for _ in range(3):
            engine.step()
        reqs.append(engine.submit(PROMPTS[i], max_tokens=10, temperature=0))
    while engine.has_work():
        engine.step()
    for i, r in enumerate(reqs):
        assert r.done and r.prompt + r.completions[0] == alone[i]
        assert r.finish_reasons == ["length"]
    # streaming: one column per step; the columns concatenate to the completion
    cols = list(engine.generate(PROMPTS[1], max_tokens=10, temperature=0))
    assert [c[0][0] for c in cols] == alone[1][len(PROMPTS[1]):] and all(m == [1] for _, m in cols)
    # closing a stream early cancels the request and returns its blocks
    gen = engine.generate(PROMPTS[1], num_samples=2, max_tokens=50, temperature=0)
    next(gen), next(gen)
    gen.close()
    assert_all_free(engine)

def test_background_thread(model):
    engine = Engine(model, TOK)
    expected = engine.generate_batch(PROMPTS[0], max_tokens=8, temperature=0)
    engine.start()
    try:
        reqs = [engine.submit(PROMPTS[0], max_tokens=8, temperature=0) for _ in range(3)]
        for r in reqs:
            toks = [c[0] for c, _ in r.stream(timeout=60)]
            assert PROMPTS[0] + toks == expected[0][0]
        assert engine.generate_batch(PROMPTS[0], max_tokens=8, temperature=0) == expected
    finally:
        engine.stop()
    assert_all_free(engine)

def test_background_failure_ends_requests(model, monkeypatch):
    engine = Engine(model, TOK)

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "_decode", boom)
    engine.start()
    try:
        req = engine.submit(PROMPTS[0], max_tokens=8, temperature=0)
        list(req.stream(timeout=60))  # ends instead of hanging
        assert req.done and req.finish_reasons == ["error"] and "boom" in req.error
        with pytest.raises(RuntimeError, match="boom"):  # generate() raises with the thread stepping, as without
            list(engine.generate(PROMPTS[0], max_tokens=8, temperature=0))
    finally:
        engine.stop()
    assert_all_free(engine)

def test_failed_prefill_returns_blocks(model, monkeypatch):
    engine = Engine(model, TOK)
    monkeypatch.setattr(engine, "model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("oom")))
    with pytest.raises(RuntimeError, match="oom"):
        engine.generate_batch(PROMPTS[1], num_samples=2, max_tokens=4)
    assert_all_free(engine)

class ScriptedGPT(GPT):
    """A real GPT (the cache is exercised) whose logits are pushed towards a scripted next token: SCRIPT[last]."""
    SCRIPT = {}

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        logits = super().forward(idx, kv_cache=kv_cache)
        nxt = torch.tensor([self.SCRIPT.get(t, 0) for t in idx.flatten().tolist()]).view(idx.shape)
        return logits + 100.0 * torch.nn.functional.one_hot(nxt, logits.shape[-1]).float()

def test_tool_use_forces_output(monkeypatch):
    # assistant_start -> python_start 1 + 2 python_end -> (forced: output_start 3 output_end) -> assistant_end
    ScriptedGPT.SCRIPT = {SP["<|assistant_start|>"]: SP["<|python_start|>"], SP["<|python_start|>"]: ord("1"),
                          ord("1"): ord("+"), ord("+"): ord("2"), ord("2"): SP["<|python_end|>"],
                          SP["<|output_end|>"]: SP["<|assistant_end|>"]}
    calls = []

    def run_tool_call(code, timeout=5.0, memory_mb=256):
        calls.append((code, timeout, memory_mb))
        return "3"

    monkeypatch.setattr(sandbox, "run_tool_call", run_tool_call)
    engine = Engine(tiny_model(ScriptedGPT), TOK, tool_timeout=2.0, tool_memory_mb=64)
    prompt = [SP["<|bos|>"], SP["<|user_start|>"], ord("x"), SP["<|user_end|>"], SP["<|assistant_start|>"]]
    seqs, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=20, temperature=0)
    body = [SP["<|python_start|>"], ord("1"), ord("+"), ord("2"), SP["<|python_end|>"],
            SP["<|output_start|>"], ord("3"), SP["<|output_end|>"]]
    for s, m in zip(seqs, masks):
        assert s == prompt + body  # <|assistant_end|> ended it and is dropped, as nanochat's generate_batch
        assert m == [0] * len(prompt) + [1, 1, 1, 1, 1, 0, 0, 0]
    assert calls[0] == ("1+2", 2.0, 64) and len(calls) == 2
    cols = list(engine.generate(prompt, max_tokens=20, temperature=0))
    assert cols[-1] == ([SP["<|assistant_end|>"]], [1])  # generate yields the stop token itself
    assert_all_free(engine)

def test_bad_requests(model):
    engine = Engine(model, TOK)
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([])
    with pytest.raises(ValueError, match="sampling parameters"):
        engine.submit([1, 2], temperature=-1)
    with pytest.raises(ValueError, match="context"):
        engine.submit([1] * 10 * 64)
    seqs, _ = engine.generate_batch([1, 2, 3], max_tokens=0)
    assert seqs == [[1, 2, 3]]
    assert_all_free(engine)

@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="fused mode needs CUDA or the Triton interpreter")
def test_fused_engine_matches_eager(model):
    # All Triton kernels (prefill attention, MLP, paged decode, write_kv); under the interpreter: a short run.
    prompts = [PROMPTS[0], PROMPTS[3]]
    eager = Engine(model, TOK).generate_many(prompts, max_tokens=3, temperature=0)
    kernels.set_mode("fused")
    try:
        engine = Engine(model, TOK)
        fused = engine.generate_many(prompts, max_tokens=3, temperature=0)
    finally:
        kernels.set_mode("eager")
    assert fused == eager
    assert_all_free(engine)

@pytest.mark.gpu
def test_fused_engine_gpu_bf16():
    """bf16 on the GPU, all Triton kernels: every emitted token's logits match a full eager forward of its sequence
    (greedy tokens could legitimately differ on near-ties, the logits may not)."""
    model = tiny_model().cuda().to(torch.bfloat16)
    kernels.set_mode("fused")
    try:
        engine = Engine(model, TOK, block_size=16)
        log = record_logits(engine)
        reqs = [engine.submit(p, num_samples=2, max_tokens=40, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)]
        while engine.has_work():
            engine.step()
    finally:
        kernels.set_mode("eager")
    with torch.inference_mode():
        for r, i, pos, logits in log:
            seq = (r.prompt + r.completions[i])[:pos]
            full = model(torch.tensor([seq], device="cuda"))[0, -1]
            torch.testing.assert_close(logits.float(), full.float(), atol=0.1, rtol=0.05)  # bf16 activations
    assert len(log) == sum(len(c) for r in reqs for c in r.completions)
    assert_all_free(engine)

def test_sampling_parameters_checked_at_submit(model):
    engine = Engine(model, TOK)
    for bad in [dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-1),
                dict(temperature="hot"), dict(top_k=0), dict(top_k=2.5), dict(num_samples=0), dict(max_tokens=-5),
                dict(max_tokens=1.5), dict(seed="x"), dict(stop=[""]), dict(stop=[3])]:
        with pytest.raises(ValueError, match="bad sampling parameters"):
            engine.submit(PROMPTS[0], **bad)
    assert not engine.waiting

def test_tiny_temperature_is_greedy(model):
    """1e-300 overflows logits / temperature in fp32 (NaN probabilities): it must behave as the limit, greedy."""
    engine = Engine(model, TOK)
    greedy = engine.generate_batch(PROMPTS[0], max_tokens=8, temperature=0)
    for t in (1e-300, 5e-324, 1e-7):
        assert engine.generate_batch(PROMPTS[0], max_tokens=8, temperature=t, seed=1) == greedy
    assert_all_free(engine)

def test_one_failing_request_ends_alone(model, monkeypatch):
    """A request whose sampling raises ends with "error"; the requests batched with it finish unharmed."""
    engine = Engine(model, TOK)
    expected = [engine.generate_batch(p, max_tokens=8, temperature=0)[0][0] for p in PROMPTS[:3]]
    sample = engine._sample

    def flaky(logits, req):
        if req.seed == 666 and len(req.completions[0]) == 3:
            raise RuntimeError("bad request state")
        return sample(logits, req)

    monkeypatch.setattr(engine, "_sample", flaky)
    engine.start()
    try:
        reqs = [engine.submit(p, max_tokens=8, temperature=0, seed=s) for p, s in zip(PROMPTS[:3], (1, 666, 2))]
        for r in reqs:
            list(r.stream(timeout=60))
    finally:
        engine.stop()
    assert reqs[1].finish_reasons == ["error"] and "bad request state" in reqs[1].error
    for r, want in zip((reqs[0], reqs[2]), (expected[0], expected[2])):
        assert r.error is None and r.prompt + r.completions[0] == want
    assert_all_free(engine)

def test_failed_forward_is_isolated(model, monkeypatch):
    """A forward that fails for one request (a poisoned prompt) fails that request alone; a forward that fails for
    the batch (out of memory) is retried one request at a time and everyone finishes."""
    engine = Engine(model, TOK)
    expected = [engine.generate_batch(p, max_tokens=6, temperature=0)[0][0] for p in PROMPTS[:3]]
    real = engine.model
    poison = 255

    def model_fn(idx, kv_cache=None):
        if (idx == poison).any():
            raise RuntimeError("poisoned input")
        if idx.shape[1] == 1 and idx.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated, batch of %d)" % idx.shape[0])
        return real(idx, kv_cache=kv_cache)

    monkeypatch.setattr(engine, "model", model_fn)
    reqs = [engine.submit(p, max_tokens=6, temperature=0) for p in (PROMPTS[0], PROMPTS[1] + [poison], PROMPTS[2])]
    while engine.has_work():
        engine.step()
    assert reqs[1].finish_reasons == ["error"] and "poisoned input" in reqs[1].error
    assert [r.prompt + r.completions[0] for r in (reqs[0], reqs[2])] == [expected[0], expected[2]]
    assert reqs[0].error is None and reqs[2].error is None
    assert_all_free(engine)

def test_stop_strings():
    """A stop string ends the sample right after the token completing it, across token boundaries, any of a list."""
    ScriptedGPT.SCRIPT = {SP["<|assistant_start|>"]: ord("a"), ord("g"): SP["<|assistant_end|>"],
                          **{ord(c): ord(n) for c, n in zip("abcdef", "bcdefg")}}
    engine = Engine(tiny_model(ScriptedGPT), TOK)
    prompt = [SP["<|bos|>"], SP["<|user_start|>"], ord("x"), SP["<|user_end|>"], SP["<|assistant_start|>"]]
    req = engine.submit(prompt, num_samples=2, max_tokens=20, temperature=0, stop=["zz", "cd"])
    while engine.has_work():
        engine.step()
    assert req.completions == [[ord(c) for c in "abcd"]] * 2
    assert req.finish_reasons == ["stop", "stop"] and req.stopped_by == ["cd", "cd"]
    # the engine keeps the stop text (the server cuts it); without a stop string the script runs to its end
    cols = list(engine.generate(prompt, max_tokens=20, temperature=0, stop=["ef"]))
    assert [c[0][0] for c in cols] == [ord(c) for c in "abcdef"]
    assert engine.generate_batch(prompt, max_tokens=20, temperature=0)[0][0][len(prompt):] == \
        [ord(c) for c in "abcdefg"]
    assert_all_free(engine)

def test_load_reports_queue_and_blocks(model):
    engine = Engine(model, TOK, num_blocks=8)
    assert engine.load() == {"running": 0, "waiting": 0, "running_sequences": 0, "free_blocks": 8, "total_blocks": 8}
    a = engine.submit(PROMPTS[1], num_samples=2, max_tokens=20, temperature=0)
    engine.submit(PROMPTS[0], max_tokens=20, temperature=0)
    assert engine.load()["waiting"] == 2
    engine.step()
    load = engine.load()
    assert load["running"] == 2 and load["waiting"] == 0 and load["running_sequences"] == 3
    assert load["free_blocks"] < load["total_blocks"]
    engine.cancel(a)
    while engine.has_work():
        engine.step()
    assert a.finish_reasons == ["cancelled", "cancelled"]
    assert engine.load()["free_blocks"] == engine.load()["total_blocks"]
