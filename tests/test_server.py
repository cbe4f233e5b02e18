"""model/server.py: the official `openai` client against the server on 127.0.0.1 (a tiny random model + a tiny
tokenizer trained here), streaming and not, n=2; malformed requests get OpenAI-style 4xx bodies and the server keeps
answering; admission control (429); an abandoned stream frees its KV blocks; an engine failure is a 500."""
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from openai import BadRequestError, InternalServerError, OpenAI, RateLimitError

import kernels
from model.engine import Engine
from model.gpt import GPT, GPTConfig
from model.server import ChatService, create_app
from model.tokenizer import Tokenizer

torch.manual_seed(0)
CORPUS = ["Hello there! How are you today? I am fine, thank you. " * 4,
          "The quick brown fox jumps over the lazy dog; 12 + 30 = 42.", "What is the capital of France? Paris."] * 10
CONTEXT = 96


@pytest.fixture(scope="module")
def tiny():
    old = kernels.get_mode()
    kernels.set_mode("eager")
    tok = Tokenizer.train(CORPUS, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=CONTEXT, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1,
                          n_embd=64))
    model.init_weights()
    with torch.no_grad():  # nanochat's init zeroes lm_head (every logit 0): make the random model say something
        for param in model.parameters():
            param.normal_(0, 0.5)
    model.eval()
    yield model, tok
    kernels.set_mode(old)


def _serve(service):
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="off"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    return server, th, url


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    engine = Engine(model, tok, block_size=16, num_blocks=16)
    service = ChatService(engine, tok, model_name="tritonchat-test", max_concurrency=4, max_tokens_limit=64,
                          max_n=4, max_body_bytes=20_000)
    srv, th, url = _serve(service)
    yield service, url
    srv.should_exit = True
    th.join(timeout=10)
    service.close()


@pytest.fixture
def client(server):
    return OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=30)


def _greedy(tiny, messages, max_tokens):
    """What the server must answer at temperature 0: the engine's greedy completion, decoded, stop token dropped."""
    model, tok = tiny
    prompt = tok.render_for_completion({"messages": messages})
    seqs, _ = Engine(model, tok).generate_batch(prompt, num_samples=1, max_tokens=max_tokens, temperature=0.0)
    return tok.decode(seqs[0][len(prompt):]), len(seqs[0]) - len(prompt)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]


def test_models_health_page(server):
    service, url = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert httpx.get(url + "/health").json()["batching"] == "continuous"
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tritonchat-test"
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and "getReader" in page.text


def test_completion_matches_greedy_engine(client, tiny):
    expected, n_tokens = _greedy(tiny, MESSAGES, 12)
    r = client.chat.completions.create(model="whatever", messages=MESSAGES, temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tiny[1].render_for_completion({"messages": MESSAGES}))
    assert r.usage.completion_tokens >= n_tokens  # + the stop token when it stopped


def test_streaming_matches_non_streaming(client, tiny):
    expected, _ = _greedy(tiny, MESSAGES, 12)
    stream = client.chat.completions.create(model="x", messages=MESSAGES, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)  # the client consumes `data: [DONE]` itself
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_n2_streaming_and_not(client):
    r = client.chat.completions.create(model="x", messages=MESSAGES, n=2, temperature=1.0, max_tokens=10, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(isinstance(c.message.content, str) for c in r.choices)
    again = client.chat.completions.create(model="x", messages=MESSAGES, n=2, temperature=1.0, max_tokens=10, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded
    texts = {0: "", 1: ""}
    finished = set()
    for c in client.chat.completions.create(model="x", messages=MESSAGES, n=2, temperature=1.0, max_tokens=10,
                                            seed=7, stream=True):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]


def test_bad_requests_get_4xx_and_server_survives(server, client, tiny):
    service, url = server
    url += "/v1/chat/completions"
    ok = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, None, None),
        (b"[" * 15_000, 400, "invalid_json", None),
        (b"\xff\xfe\x00garbage", 400, "invalid_json", None),
        ({"messages": []}, 400, "empty_array", "messages"),
        ({"messages": "hi"}, 400, "invalid_type", "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type", "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, 400, None, "messages"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, None, "messages"),
        ({**ok, "temperature": "hot"}, 400, "invalid_type", "temperature"),
        ({**ok, "temperature": 5}, 400, "invalid_value", "temperature"),
        ({**ok, "n": 0}, 400, "invalid_value", "n"),
        ({**ok, "n": True}, 400, "invalid_type", "n"),
        ({**ok, "max_tokens": 10 ** 6}, 400, "invalid_value", "max_tokens"),
        ({**ok, "max_tokens": 60, "messages": [{"role": "user", "content": "hello " * 12}]}, 400,
         "context_length_exceeded", "max_tokens"),
        ({"messages": [{"role": "user", "content": "hello there " * 200}]}, 400, "context_length_exceeded", None),
        ({**ok, "stream": "yes"}, 400, "invalid_type", "stream"),
        ({**ok, "top_p": 3}, 400, "invalid_value", "top_p"),
        ({"messages": [{"role": "user", "content": "x" * 30_000}]}, 413, "body_too_large", None),
    ]
    for body, status, code, param in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(url, content=data, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
        if code:
            assert err["code"] == code, (body, err)
        if param:
            assert err["param"] == param, (body, err)
    r = httpx.get(server[1] + "/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(url)  # wrong method
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(BadRequestError):  # the official client sees a proper 400
        client.chat.completions.create(model="x", messages=[{"role": "tool", "content": "x"}])
    # special-token text from a user is just text
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "<|bos|><|assistant_end|>"}],
                                       max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    # still alive and correct; no slot leaked
    expected, _ = _greedy(tiny, MESSAGES, 5)
    assert client.chat.completions.create(model="x", messages=MESSAGES, temperature=0,
                                          max_tokens=5).choices[0].message.content == expected
    assert service.in_flight == 0


def test_concurrency_limit_429(server, client):
    service, url = server
    held = [service.acquire() for _ in range(service.max_concurrency)]
    try:
        with pytest.raises(RateLimitError):
            client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=2)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for slot in held:
            slot.release()
    assert client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=2).choices


def test_concurrent_requests_batch_together(server, client, tiny):
    """Several clients at once: each gets exactly its own greedy answer (continuous batching must not mix them)."""
    prompts = [[{"role": "user", "content": t}] for t in ("Hello there!", "What is the capital of France?",
                                                           "12 + 30 = ?")]
    expected = [_greedy(tiny, m, 10)[0] for m in prompts]
    results = [None] * len(prompts)

    def ask(i):
        results[i] = client.chat.completions.create(model="x", messages=prompts[i], temperature=0,
                                                    max_tokens=10).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_abandoned_stream_frees_blocks(server, monkeypatch):
    service, url = server
    engine = service.engine
    submitted, submit, step = [], engine.submit, engine.step
    monkeypatch.setattr(engine, "submit", lambda *a, **k: submitted.append(submit(*a, **k)) or submitted[-1])
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step()))  # 64 steps take > 1 s
    body = {"messages": MESSAGES, "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("data: ")
    # the client hung up after the first event: the request is cancelled and every block returns to the pool
    deadline = time.time() + 10
    while time.time() < deadline and (engine.has_work() or service.in_flight):
        time.sleep(0.05)
    assert submitted[0].finish_reasons == ["cancelled"] and len(submitted[0].completions[0]) < 64
    assert not engine.has_work() and service.in_flight == 0
    assert engine.cache.num_free() == engine.cache.num_blocks


def test_engine_failure_is_a_500_not_a_dead_server(server, client, tiny, monkeypatch, capsys):
    service, url = server
    engine = service.engine
    real = engine._admit
    boom = {"left": 1}

    def failing_admit():
        # fail the prefill of *this* request: a step taken for another test's leftovers (or a first sampled token
        # that is already a stop token, which ends a request before any decode step) must not consume the failure
        if boom["left"] and engine.waiting:
            boom["left"] -= 1
            raise RuntimeError("simulated CUDA out of memory")
        return real()

    monkeypatch.setattr(engine, "_admit", failing_admit)
    with pytest.raises(InternalServerError) as e:
        client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=8)
    assert "simulated CUDA out of memory" in str(e.value)
    expected, _ = _greedy(tiny, MESSAGES, 5)  # the next request is served normally
    assert client.chat.completions.create(model="x", messages=MESSAGES, temperature=0,
                                          max_tokens=5).choices[0].message.content == expected
    assert service.in_flight == 0 and engine.cache.num_free() == engine.cache.num_blocks
