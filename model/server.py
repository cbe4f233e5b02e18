"""Web chat UI + OpenAI-compatible API for a tritonchat checkpoint (FastAPI + uvicorn).

    python -m model.server                          # newest SFT checkpoint, http://127.0.0.1:8000  (make serve)
    python -m model.server --source rl --port 8080 --host 0.0.0.0 --kernels eager

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="tritonchat", messages=[{"role": "user", "content": "Hi"}], stream=True)

Endpoints
- POST /v1/chat/completions: messages (roles system / developer (= system) / user / assistant; content a str or a
  list of {"type": "text", "text": ...} parts; the last message must be the user's), temperature (0..2, 0 = greedy),
  max_tokens or max_completion_tokens, n (samples of one prompt share its prefilled KV pages), seed, stream
  (server-sent events in OpenAI's chat.completion.chunk format, then `data: [DONE]`), stream_options.include_usage.
  top_p is accepted and validated but IGNORED (the engine samples with temperature + top-k); top_k is an extension.
  Other OpenAI fields (model, stop, presence_penalty, ...) are accepted and ignored. Tool calls of the model
  (<|python_start|> ... <|python_end|> and the forced <|output_start|> ... <|output_end|>) appear in the content
  as those literal markers.
- GET /v1/models, GET /health, GET / (the web chat page model/chat.html, which streams; served the way nanochat
  serves its ui.html, https://github.com/karpathy/nanochat/blob/master/scripts/chat_web.py).

Robustness: every bad request (malformed JSON, wrong types, empty or unknown-role messages, a prompt + max_tokens
beyond the context, a body over --max-body-bytes) gets a 4xx with OpenAI's error body
{"error": {"message", "type", "param", "code"}}; more than --max-concurrency requests in flight get 429; a client
that disconnects mid-stream cancels its request (its KV blocks are freed); an engine failure is a 500, never a dead
server.

Batching: continuous. Requests arriving at any time are submitted to the Engine, whose background thread lets them
join the running decode batch between steps (Engine.submit / start / Request.stream).
"""
import argparse
import asyncio
import importlib.resources
import json
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

import kernels
from model.chat import load_chat_model
from model.engine import Engine
from model.tokenizer import IncrementalDecoder

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class EngineError(RuntimeError):
    pass


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status = status  # HTTP status
        self.message = message
        self.type = type_     # OpenAI's error type, e.g. "invalid_request_error"
        self.param = param    # the offending request field, if any
        self.code = code      # a machine-readable reason, e.g. "context_length_exceeded"


def error_response(status, message, type_="invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


# ------------------------------------------------------------------------------------------------- validation
@dataclass
class ChatParams:
    """A validated chat-completions request."""
    prompt: list[int]      # token ids of the rendered conversation, ending in <|assistant_start|>
    temperature: float     # 0 = greedy
    top_k: int | None
    n: int                 # samples of the one prompt
    seed: int
    max_tokens: int        # per sample; prompt + max_tokens fits the context
    stream: bool
    include_usage: bool    # stream_options.include_usage


def _number(body, name, default, lo, hi, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:50]}",
                       param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name,
                       code="invalid_value")
    return value


def parse_request(body, tokenizer, max_context, max_tokens_limit, max_n):
    """A chat-completions JSON body -> ChatParams; APIError(400) naming the offending field otherwise."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content}", param="messages",
                       code="invalid_type" if not isinstance(messages, list) else "empty_array")
    conv = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role {json.dumps(role)[:50]} is not supported: use one of "
                                f"{', '.join(ROLES)}", param=f"messages[{i}].role", code="invalid_value")
        if isinstance(content, list):  # OpenAI content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": str}}",
                               param=f"messages[{i}].content", code="invalid_type")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or an array of text parts",
                           param=f"messages[{i}].content", code="invalid_type")
        conv.append({"role": ROLES[role], "content": content})
    if conv[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages", code="invalid_value")
    try:
        prompt = tokenizer.render_for_completion({"messages": conv})
    except ValueError as e:  # alternation, misplaced system message, ...
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    _number(body, "top_p", 1.0, 0.0, 1.0)  # accepted, validated, ignored (documented)
    top_k = _number(body, "top_k", None, 1, 1 << 30, integer=True)
    n = _number(body, "n", 1, 1, max_n, integer=True)
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, None, 1, max_tokens_limit, integer=True)
    room = max_context - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is {max_context}",
                       param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(max_tokens_limit, room)
    elif max_tokens > room:
        raise APIError(400, f"prompt ({len(prompt)} tokens) + {key} ({max_tokens}) exceeds the context "
                            f"({max_context} tokens)", param=key, code="context_length_exceeded")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    return ChatParams(prompt=prompt, temperature=temperature, top_k=top_k, n=n,
                      seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
                      max_tokens=max_tokens, stream=bool(stream), include_usage=bool(opts.get("include_usage")))


# ------------------------------------------------------------------------------------------------- generation
class ChatService:
    """Owns the engine (started here, stepping in its background thread) and the admission control; turns validated
    requests into completions / chunk streams. The limits are the largest values a request may ask for."""

    def __init__(self, engine, tokenizer, model_name="tritonchat", max_concurrency=8, max_tokens_limit=1024,
                 max_n=8, max_body_bytes=1 << 20):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_concurrency = max_concurrency
        self.max_tokens_limit = max_tokens_limit
        self.max_n = max_n
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0
        self.slots = threading.Lock()  # guards in_flight
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency + 2, thread_name_prefix="chat-wait")
        # the context the model was trained at (the engine's rotary tables reach further, the model's skill not)
        self.max_context = min(engine.model.config.sequence_len, engine.max_context)
        engine.start()

    def close(self):
        self.engine.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # admission control: a fixed number of requests in flight, the rest are told to come back (429)
    def acquire(self):
        with self.slots:
            if self.in_flight >= self.max_concurrency:
                raise APIError(429, f"the server is busy ({self.in_flight} requests in flight); retry shortly",
                               type_="rate_limit_error", code="too_many_requests")
            self.in_flight += 1
        return _ConcurrencySlot(self)

    def start(self, params):
        """Submit a validated request to the engine -> its engine.Request (ValueError if the engine refuses it)."""
        return self.engine.submit(params.prompt, num_samples=params.n, max_tokens=params.max_tokens,
                                  temperature=params.temperature, top_k=params.top_k, seed=params.seed)

    def cancel(self, job):
        if not job.done:
            self.engine.cancel(job)

    def _next(self, job):
        """Blocking: the job's next column, None at the end; raises if the engine died."""
        while True:
            try:
                return job.events.get(timeout=0.5)
            except queue.Empty:
                thread = self.engine.thread
                if thread is None or not thread.is_alive():
                    raise EngineError("the engine stopped") from None

    async def columns(self, job):
        """The job's (token_column, mask_column) steps, read without blocking the event loop; EngineError if the
        engine failed it."""
        loop = asyncio.get_running_loop()
        while True:
            item = await loop.run_in_executor(self.pool, self._next, job)
            if item is None:
                if job.error:  # the engine failed this request (e.g. out of GPU memory)
                    raise EngineError(job.error)
                return
            yield item


class _ConcurrencySlot:
    """One admitted request's place under max_concurrency; release() gives it back (once, however often called)."""

    def __init__(self, service):
        self.service = service
        self.held = True

    def release(self):
        with self.service.slots:
            if self.held:
                self.held = False
                self.service.in_flight -= 1


def _finish_reason(reason):
    return "length" if reason in (None, "length") else "stop" if reason in ("stop", "cancelled") else reason


# ------------------------------------------------------------------------------------------------- the app
def create_app(service):
    app = FastAPI(title="tritonchat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request, e):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), type_)

    @app.exception_handler(EngineError)
    async def _engine_error(request, e):
        return error_response(500, f"generation failed: {e}", "server_error")

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.get("/health")
    async def health():
        s = service
        return {"status": "ok", "model": s.model_name, "batching": "continuous", "in_flight": s.in_flight,
                "max_concurrency": s.max_concurrency, "context": s.max_context, "engine": dict(s.engine.stats)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "tritonchat"}]}

    page = chat_page().replace("__MODEL__", service.model_name)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        s = service
        slot = s.acquire()  # 429 when full, before reading anything
        try:
            body = await _read_json(request, s.max_body_bytes)
            params = parse_request(body, s.tokenizer, s.max_context, s.max_tokens_limit, s.max_n)
            try:
                job = s.start(params)
            except ValueError as e:  # the engine refused the parameters
                raise APIError(400, str(e)) from None
        except BaseException:
            slot.release()
            raise
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=s.model_name)
        if params.stream:
            return StreamingResponse(_stream(s, job, params, meta, slot), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(_cleanup, s, job, slot))
        try:
            decoders = [IncrementalDecoder(s.tokenizer) for _ in range(params.n)]
            texts = [""] * params.n
            async for col, _ in s.columns(job):
                for i, t in enumerate(col):
                    if t is not None and t not in s.engine.stop_ids:
                        texts[i] += decoders[i].add(t)
            texts = [texts[i] + decoders[i].flush() for i in range(params.n)]
        finally:
            _cleanup(s, job, slot)
        completion_tokens = sum(len(c) for c in job.completions)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": _finish_reason(job.finish_reasons[i])} for i in range(params.n)]
        usage = {"prompt_tokens": len(params.prompt), "completion_tokens": completion_tokens,
                 "total_tokens": len(params.prompt) + completion_tokens}
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage}

    return app


def _cleanup(service, job, slot):
    service.cancel(job)  # no-op when finished; frees the KV blocks of an abandoned stream
    slot.release()


async def _read_json(request, limit):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}", code="body_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise APIError(400, f"the request body is not valid JSON: {type(e).__name__}: {e}"[:300],
                       code="invalid_json") from None


async def _stream(s, job, params, meta, slot):
    """Server-sent events in OpenAI's chunk format: a role chunk per choice, content deltas, a finish chunk per
    choice, an optional usage chunk, then [DONE]."""
    def chunk(choices, **extra):
        return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    n = params.n
    decoders = [IncrementalDecoder(s.tokenizer) for _ in range(n)]
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(n)])
        async for col, _ in s.columns(job):
            out = []
            for i, t in enumerate(col):
                if t is None or t in s.engine.stop_ids:
                    continue
                text = decoders[i].add(t)
                if text:
                    out.append({"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None})
            if out:
                yield chunk(out)
        for i in range(n):
            tail = decoders[i].flush()
            delta = {"content": tail} if tail else {}
            yield chunk([{"index": i, "delta": delta, "logprobs": None,
                          "finish_reason": _finish_reason(job.finish_reasons[i])}])
        if params.include_usage:
            c = sum(len(x) for x in job.completions)
            yield chunk([], usage={"prompt_tokens": len(params.prompt), "completion_tokens": c,
                                   "total_tokens": len(params.prompt) + c})
        yield "data: [DONE]\n\n"
    except Exception as e:  # the headers are gone: report in-band, as OpenAI does
        yield "data: " + json.dumps({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error",
                                               "param": None, "code": None}}) + "\n\n"
    finally:
        _cleanup(s, job, slot)


def chat_page():
    """The web chat page, model/chat.html, read from the package (a source checkout or an install alike)."""
    return importlib.resources.files(__package__ or "model").joinpath("chat.html").read_text(encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description="tritonchat web UI + OpenAI-compatible API",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint stage")
    parser.add_argument("--run", default=None, help="checkpoint run name (default: the newest run)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-concurrency", type=int, default=16, help="requests in flight; more get 429")
    parser.add_argument("--max-tokens-limit", type=int, default=1024, help="the largest max_tokens accepted")
    parser.add_argument("--max-n", type=int, default=8, help="the largest n accepted")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    kernels.add_argument(parser)
    args = parser.parse_args(argv)
    kernels.set_mode(args.kernels)

    model, tokenizer, meta = load_chat_model(args.source, args.device, args.run)
    service = ChatService(Engine(model, tokenizer), tokenizer, model_name=f"tritonchat-{args.source}",
                          max_concurrency=args.max_concurrency, max_tokens_limit=args.max_tokens_limit,
                          max_n=args.max_n, max_body_bytes=args.max_body_bytes)
    import uvicorn  # only the server process needs it; importing this module (tests, tools) does not
    print(f"tritonchat-{args.source} (step {meta.get('step')}, kernels {kernels.get_mode()}, "
          f"continuous batching) on http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    finally:
        service.close()


if __name__ == "__main__":
    main()
