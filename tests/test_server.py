"""model/server.py: the official `openai` client and raw sockets against the server on 127.0.0.1 (a tiny random
model + a tiny tokenizer trained here), streaming and not, n=2; malformed requests get OpenAI-style 4xx bodies and
the server keeps answering; stalled bodies hold nothing; a bounded queue, then 429 with Retry-After; a client that
leaves (streaming or not, queued or generating) frees its KV blocks; one request's failure is a 500 for it alone;
stop strings; lengths fit the trained context; /health, /v1/models/{id}, the page; the command line."""
import asyncio
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
from model.server import ChatService, chat_page, create_app, main
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
                          max_n=4, max_body_bytes=20_000, max_queue=2, body_timeout=1.0)
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

# ---------------------------------------------------------------------------------------------------------------
# One client must not hurt another

def _post_raw(url, body, timeout=30):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"},
                      timeout=timeout)

def _slow_engine(engine, monkeypatch, seconds=0.02):
    """Each engine step takes >= `seconds`, so that a request is still generating when the test acts on it."""
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(seconds), step()))

def _wait(cond, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline and not cond():
        time.sleep(0.02)
    return cond()

def test_sampling_parameters_validated_per_request(server, client, tiny):
    service, url = server
    ok = {"messages": MESSAGES, "max_tokens": 4}
    bad = [(b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', "temperature"),
           (b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": Infinity}', "temperature"),
           ({**ok, "temperature": -1}, "temperature"), ({**ok, "top_k": 0}, "top_k"),
           ({**ok, "max_tokens": -5}, "max_tokens"), ({**ok, "max_tokens": 0}, "max_tokens"),
           ({**ok, "seed": 1.5}, "seed"), ({**ok, "stop": 5}, "stop"), ({**ok, "stop": [""]}, "stop"),
           ({**ok, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
           ({**ok, "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
           ({**ok, "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens")]
    for body, param in bad:
        r = _post_raw(url, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = _post_raw(url, {**ok, "max_tokens": 5, "max_completion_tokens": 5})
    assert r.status_code == 200
    # a temperature that underflows to 0 in fp32 samples greedily instead of breaking the shared step
    expected, _ = _greedy(tiny, MESSAGES, 6)
    for t in (1e-300, 5e-324):
        r = client.chat.completions.create(model="x", messages=MESSAGES, temperature=t, max_tokens=6, seed=3)
        assert r.choices[0].message.content == expected
    assert service.in_flight == 0 and service.engine.cache.num_free() == service.engine.cache.num_blocks

def test_one_request_failing_leaves_the_others(server, client, tiny, monkeypatch):
    """A request whose sampling raises gets its 500 (or an in-band error event when streaming); the request
    generating next to it finishes with exactly its greedy answer."""
    service, url = server
    engine = service.engine
    _slow_engine(engine, monkeypatch)
    sample = engine._sample

    def flaky(logits, req):
        if req.seed == 666 and len(req.completions[0]) >= 2:
            raise RuntimeError("this request's sampling broke")
        return sample(logits, req)

    monkeypatch.setattr(engine, "_sample", flaky)
    expected, _ = _greedy(tiny, MESSAGES, 30)
    result = {}
    th = threading.Thread(target=lambda: result.update(r=client.chat.completions.create(
        model="x", messages=MESSAGES, temperature=0, max_tokens=30)))
    th.start()
    assert _wait(lambda: engine.running)
    r = _post_raw(url, {"messages": MESSAGES, "max_tokens": 20, "seed": 666, "temperature": 0})
    assert r.status_code == 500 and "this request's sampling broke" in r.json()["error"]["message"]
    r = _post_raw(url, {"messages": MESSAGES, "max_tokens": 20, "seed": 666, "temperature": 0, "stream": True})
    assert r.status_code == 200 and '"error"' in r.text and "this request's sampling broke" in r.text
    th.join()
    assert result["r"].choices[0].message.content == expected
    assert _wait(lambda: service.in_flight == 0 and not engine.has_work())
    assert engine.cache.num_free() == engine.cache.num_blocks

def _raw_request(url, body, declared=None):
    """A socket that has sent the request line, headers and `body` (bytes), declaring `declared` body bytes."""
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body) if declared is None else declared}\r\n\r\n".encode() + body)
    return sock

def _response(sock):
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    return data.decode(errors="replace")

def test_stalled_bodies_hold_nothing(server, client, capfd):
    """16 clients that stop halfway through their body, and one that trickles it, do not keep anyone out; each
    gets a 408 when the body deadline (1 s here) passes; the log has no traceback."""
    service, url = server
    body = json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode()
    stalled = [_raw_request(url, body[:10], declared=len(body)) for _ in range(16)]
    time.sleep(0.2)
    assert service.in_flight == 0 and service.queued == 0  # they hold no place
    r = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=2)
    assert r.choices
    trickle = _raw_request(url, body[:1], declared=len(body))
    for byte in body[1:4]:  # a byte every 0.25 s: still short of the body when the deadline passes
        time.sleep(0.25)
        trickle.sendall(bytes([byte]))
    for sock in stalled + [trickle]:
        answer = _response(sock)
        assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer, answer[:300]
    assert service.in_flight == 0 and service.queued == 0
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err

def test_overload_queues_then_429_with_retry_after(server, client, tiny):
    """With every place taken, requests wait in a queue (max_queue = 2 here) and are served in turn; only past the
    queue's depth does a request get 429, with Retry-After."""
    service, url = server
    held = [service.try_acquire() for _ in range(service.max_concurrency)]
    assert all(held) and service.try_acquire() is None
    expected, _ = _greedy(tiny, MESSAGES, 5)
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.chat.completions.create(
        model="x", messages=MESSAGES, temperature=0, max_tokens=5))) for _ in range(2)]
    try:
        for th in threads:
            th.start()
        assert _wait(lambda: service.queued == 2)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert int(r.headers["Retry-After"]) >= 1
        with pytest.raises(RateLimitError):
            client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=2)
    finally:
        for slot in held:
            slot.release()
    for th in threads:
        th.join()
    assert [c.choices[0].message.content for c in results] == [expected, expected]
    assert service.in_flight == 0 and service.queued == 0

def test_a_place_freed_while_joining_the_queue_is_not_lost(server):
    """Checking for a free place and joining the queue are one step: a place given back in between (from another
    thread) must reach the request, not leave it queued with nothing left to wake it."""
    service, _ = server
    held = [service.try_acquire() for _ in range(service.max_concurrency)]
    real = service.lock

    class ReleasingLock:  # gives a held place back the first time the lock is let go
        def __enter__(self):
            return real.__enter__()

        def __exit__(self, *exc):
            real.__exit__(*exc)
            if held:
                service.lock = real
                held.pop().release()

    async def admitted():
        service.lock = ReleasingLock()
        return await asyncio.wait_for(service.acquire(), timeout=5)

    try:
        asyncio.run(admitted()).release()
    finally:
        service.lock = real
        for slot in held:
            slot.release()
    assert service.in_flight == 0 and service.queued == 0

def test_client_leaving_cancels_its_request(server, monkeypatch):
    """A non-streaming client that hangs up stops its generation (blocks freed); one that hangs up while queued
    leaves the queue without ever reaching the engine."""
    service, url = server
    engine = service.engine
    submitted, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a, **k: submitted.append(submit(*a, **k)) or submitted[-1])
    _slow_engine(engine, monkeypatch)
    sock = _raw_request(url, json.dumps({"messages": MESSAGES, "max_tokens": 64, "temperature": 0}).encode())
    assert _wait(lambda: submitted and len(submitted[0].completions[0]) >= 2)
    sock.close()
    assert _wait(lambda: submitted[0].done and service.in_flight == 0 and not engine.has_work())
    assert submitted[0].finish_reasons == ["cancelled"] and len(submitted[0].completions[0]) < 64
    assert engine.cache.num_free() == engine.cache.num_blocks
    held = [service.try_acquire() for _ in range(service.max_concurrency)]
    try:
        sock = _raw_request(url, json.dumps({"messages": MESSAGES, "max_tokens": 4}).encode())
        assert _wait(lambda: service.queued == 1)
        sock.close()
        assert _wait(lambda: service.queued == 0)
    finally:
        for slot in held:
            slot.release()
    assert len(submitted) == 1 and service.in_flight == 0

def test_stop_sequences(server, client, tiny):
    """`stop` as OpenAI: a string or a list; the text ends before the first stop string (which is not included),
    found across token boundaries, streaming too; finish_reason "stop"."""
    full, _ = _greedy(tiny, MESSAGES, 40)
    assert len(full) > 12, full
    stop = full[6:9]
    cut = full[:full.index(stop)]
    for stops in (stop, [stop], ["zzzzzz", stop]):
        r = client.chat.completions.create(model="x", messages=MESSAGES, temperature=0, max_tokens=40, stop=stops)
        assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop", (stops, full)
        chunks = list(client.chat.completions.create(model="x", messages=MESSAGES, temperature=0, max_tokens=40,
                                                     stop=stops, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    r = client.chat.completions.create(model="x", messages=MESSAGES, temperature=0, max_tokens=40, stop="\x00never")
    assert r.choices[0].message.content == full

def test_lengths_follow_the_trained_context(server, client, tiny):
    """An unspecified max_tokens is the room left; a history longer than the context (96) loses its oldest turns,
    the system message kept, and the answer is the one for the trimmed conversation."""
    service, url = server
    tok = tiny[1]
    r = client.chat.completions.create(model="x", messages=MESSAGES, temperature=0)
    room = CONTEXT - r.usage.prompt_tokens
    assert r.usage.completion_tokens <= min(room, service.max_tokens_limit)
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(8):
        history += [{"role": "user", "content": f"Hello there! How are you today? ({i})"},
                    {"role": "assistant", "content": "I am fine, thank you."}]
    history.append({"role": "user", "content": "What is the capital of France?"})
    assert len(tok.render_for_completion({"messages": history})) > CONTEXT
    r = _post_raw(url, {"messages": history, "temperature": 0, "max_tokens": 10})
    assert r.status_code == 200, r.text
    dropped = int(r.headers["X-Trimmed-Messages"])
    kept = history[:1] + history[1 + dropped:]
    assert dropped % 2 == 0 and kept[1]["role"] == "user" and len(kept) >= 2
    assert r.json()["usage"]["prompt_tokens"] + 10 <= CONTEXT
    assert r.json()["choices"][0]["message"]["content"] == _greedy(tiny, kept, 10)[0]
    # what cannot fit even alone is refused, clearly
    r = _post_raw(url, {"messages": history[:1] + [{"role": "user", "content": "hello there " * 200}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"

def test_health_models_and_page(server, client):
    service, url = server
    health = httpx.get(url + "/health").json()
    engine = health["engine"]
    assert {"running", "waiting", "free_blocks", "total_blocks"} <= set(engine)
    assert engine["free_blocks"] == engine["total_blocks"] == service.engine.cache.num_blocks
    assert health["queued"] == 0 and health["python_tool"] in ("bwrap", "refused", "unsafe")
    assert client.models.retrieve("tritonchat-test").id == "tritonchat-test"
    r = httpx.get(url + "/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    page = chat_page('<img src=x onerror="alert(1)">')
    assert "<img src=x" not in page and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    page = httpx.get(url + "/").text
    assert '.user::before{content:"You"' in page and ".assistant::before" in page  # bubbles say who speaks
    assert 'id="maxtok" type="number" value=""' in page  # default: the room the context leaves

# ---------------------------------------------------------------------------------------------------------------
# The command line

@pytest.mark.parametrize("flags", [["--port", "99999"], ["--port", "0"], ["--max-concurrency", "0"], ["--max-n", "0"],
                                   ["--max-tokens-limit", "0"], ["--max-queue", "-1"], ["--body-timeout", "nan"],
                                   ["--device", "tpu"]] +
                         ([] if torch.cuda.is_available() else [["--device", "cuda"]]), ids=" ".join)
def test_bad_flag_is_one_line_exit_2(flags, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONCHAT_HOME", str(tmp_path))  # no checkpoint: nothing may get that far
    with pytest.raises(SystemExit) as e:
        main(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"python -m model.server: error: argument {flags[0]}"), err

def test_port_in_use_and_start_banner(capsys, monkeypatch, tmp_path, tiny):
    """A port that cannot be had is one line before the model loads; a good start says how the python tool runs."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with pytest.raises(SystemExit) as e:
        main(["--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "cannot listen on 127.0.0.1:" in err
    taken.close()
    import uvicorn
    monkeypatch.setattr("model.server.load_chat_model", lambda *a: (tiny[0], tiny[1], {"step": 3}))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: sockets[0].close())
    main(["--port", str(_free_port()), "--kernels", "eager"])
    out = capsys.readouterr().out
    assert "tritonchat-sft (step 3" in out and "python tool: " in out

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
