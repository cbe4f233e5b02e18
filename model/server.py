"""Web chat UI + OpenAI-compatible API for a tritonchat checkpoint (FastAPI + uvicorn).

    python -m model.server                          # newest SFT checkpoint, http://127.0.0.1:8000  (make serve)
    python -m model.server --source rl --port 8080 --host 0.0.0.0 --kernels eager

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="tritonchat", messages=[{"role": "user", "content": "Hi"}], stream=True)

Endpoints
- POST /v1/chat/completions: messages (roles system / developer (= system) / user / assistant; content a str or a
  list of {"type": "text", "text": ...} parts; the last message must be the user's), temperature (0..2, 0 = greedy),
  max_tokens or max_completion_tokens (both given: they must agree), n (samples of one prompt share its prefilled KV
  pages), seed, stop (a string or a list of up to 4: the text ends before the first one, finish_reason "stop";
  works across token boundaries and in streams), stream (server-sent events in OpenAI's chat.completion.chunk
  format, then `data: [DONE]`), stream_options.include_usage (a boolean). top_p is accepted and validated but
  IGNORED (the engine samples with temperature + top-k); top_k is an extension. Other OpenAI fields (model,
  presence_penalty, ...) are accepted and ignored. Tool calls of the model (<|python_start|> ... <|python_end|> and
  the forced <|output_start|> ... <|output_end|>) appear in the content as those literal markers.
- GET /v1/models, GET /v1/models/{id}, GET /health (the engine's load: requests running and waiting, free and total
  KV blocks; the queue; the python tool's mode), GET / (the web chat page model/chat.html, served the way nanochat
  serves its ui.html, https://github.com/karpathy/nanochat/blob/master/scripts/chat_web.py).

Lengths: the context is what the model was trained on. An unspecified max_tokens means the room the prompt leaves
(at most --max-tokens-limit). A history too long for the context loses its oldest turns (the system message and the
last user message stay; the response header X-Trimmed-Messages says how many went); a prompt that cannot fit even
so is a 400 (context_length_exceeded).

Robustness: the body is read (within --body-timeout seconds, at most --max-body-bytes) and validated before the
request takes a place: a stalled or slow client gets 408 and holds nothing; every bad request gets a 4xx with
OpenAI's error body {"error": {"message", "type", "param", "code"}}. Up to --max-concurrency requests generate at
once, up to --max-queue more wait for a place in arrival order, and only past that a request gets 429 with a
Retry-After header. A client that goes away (streaming or not, queued or generating) cancels its request and its KV
blocks are freed. A failure while serving one request ends that request alone (a 500, or an in-band error event in
a stream), never the server or another request.

Batching: continuous. Requests are submitted to the Engine, whose background thread lets them join the running
decode batch between steps (Engine.submit / start / Request.stream).
"""
import asyncio
import html
import importlib.resources
import json
import math
import os
import queue
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import kernels
from model import sandbox
from model.chat import (ArgumentParser, context_of, default_reserve, device_type, fit_conversation, float_between,
                        int_at_least, load_chat_model)
from model.engine import Engine
from model.tokenizer import IncrementalDecoder

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # stop strings per request, as OpenAI


class EngineError(RuntimeError):
    pass


class APIError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status = status  # HTTP status
        self.message = message
        self.type = type_     # OpenAI's error type, e.g. "invalid_request_error"
        self.param = param    # the offending request field, if any
        self.code = code      # a machine-readable reason, e.g. "context_length_exceeded"
        self.headers = headers


class _ClientGone(Exception):
    """The client disconnected: nobody reads the answer."""


def error_response(status, message, type_="invalid_request_error", param=None, code=None, headers=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


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
    stop: tuple = ()       # stop strings
    trimmed: int = 0       # oldest messages dropped to fit the context


def _number(body, name, default, lo, hi, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:50]}",
                       param=name, code="invalid_type")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise APIError(400, f"'{name}' must be a finite number between {lo} and {hi}, got {value}", param=name,
                       code="invalid_value")
    return value


def _stop(body):
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP or \
            not all(isinstance(x, str) and x for x in stops):
        raise APIError(400, f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP} non-empty strings",
                       param="stop", code="invalid_value")
    return tuple(stops)


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
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    _number(body, "top_p", 1.0, 0.0, 1.0)  # accepted, validated, ignored (documented)
    top_k = _number(body, "top_k", None, 1, 1 << 30, integer=True)
    n = _number(body, "n", 1, 1, max_n, integer=True)
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    given = {k: _number(body, k, None, 1, max_tokens_limit, integer=True)
             for k in ("max_tokens", "max_completion_tokens")}
    if None not in given.values() and given["max_tokens"] != given["max_completion_tokens"]:
        raise APIError(400, f"'max_tokens' ({given['max_tokens']}) and 'max_completion_tokens' "
                            f"({given['max_completion_tokens']}) disagree: send one", param="max_tokens",
                       code="invalid_value")
    key = "max_completion_tokens" if given["max_completion_tokens"] is not None else "max_tokens"
    max_tokens = given[key]
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    include_usage = (opts or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean", param="stream_options.include_usage",
                       code="invalid_type")
    stop = _stop(body)
    reserve = max_tokens if max_tokens is not None else min(max_tokens_limit, default_reserve(max_context))
    try:
        prompt, trimmed = fit_conversation(tokenizer, conv, max_context, reserve)
    except ValueError as e:  # alternation, misplaced system message, ...
        raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
    room = max_context - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is {max_context}",
                       param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(max_tokens_limit, room)
    elif max_tokens > room:
        raise APIError(400, f"prompt ({len(prompt)} tokens) + {key} ({max_tokens}) exceeds the context "
                            f"({max_context} tokens)", param=key, code="context_length_exceeded")
    return ChatParams(prompt=prompt, temperature=temperature, top_k=top_k, n=n,
                      seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
                      max_tokens=max_tokens, stream=bool(stream), include_usage=bool(include_usage), stop=stop,
                      trimmed=trimmed)


class StopCutter:
    """Text in, text out, for one choice: cuts before the first stop string, holding back any tail that could be the
    start of one (a stop string can arrive split over several pieces). No stop strings: text passes through."""

    def __init__(self, stops):
        self.stops = stops
        self.pending = ""
        self.hit = False  # a stop string was found: everything after it is dropped

    def feed(self, text):
        if self.hit:
            return ""
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self):
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


# ------------------------------------------------------------------------------------------------- generation
class ChatService:
    """Owns the engine (started here, stepping in its background thread) and the admission queue; turns validated
    requests into completions / chunk streams. The limits are the largest values a request may ask for.

    max_concurrency: requests generating at once; max_queue: requests waiting for a place (default 4 x
    max_concurrency), beyond which 429; body_timeout: seconds a client has to send its whole body."""

    def __init__(self, engine, tokenizer, model_name="tritonchat", max_concurrency=8, max_tokens_limit=1024,
                 max_n=8, max_body_bytes=1 << 20, max_queue=None, body_timeout=10.0):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_concurrency = max_concurrency
        self.max_queue = 4 * max_concurrency if max_queue is None else max_queue
        self.max_tokens_limit = max_tokens_limit
        self.max_n = max_n
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.in_flight = 0
        self.waiters = deque()          # (loop, future) of queued requests, oldest first
        self.lock = threading.Lock()    # guards in_flight and waiters (slots may be released from any thread)
        self.service_time = 1.0         # moving average of a request's seconds in its place, for Retry-After
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency + 2, thread_name_prefix="chat-wait")
        self.max_context = context_of(engine)
        engine.start()

    def close(self):
        self.engine.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self):
        return len(self.waiters)

    # admission: max_concurrency places, a FIFO queue of max_queue in front of them, 429 past that
    def try_acquire(self):
        """A place now -> _Slot, or None when all are taken (for tests and tools)."""
        with self.lock:
            if self.in_flight < self.max_concurrency and not self.waiters:
                self.in_flight += 1
                return _Slot(self)
        return None

    async def acquire(self):
        """Wait for a place in arrival order -> _Slot; APIError(429) with Retry-After when the queue is full.
        Cancelling the wait (the client left) gives up the place in the queue."""
        slot = self.try_acquire()
        if slot is not None:
            return slot
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self.lock:
            if len(self.waiters) >= self.max_queue:
                wait = min(60, max(1, math.ceil(self.service_time * (len(self.waiters) + 1) / self.max_concurrency)))
                raise APIError(429, f"the server is busy ({self.in_flight} requests generating, {len(self.waiters)} "
                                    f"waiting); retry in {wait} s", type_="rate_limit_error", code="too_many_requests",
                               headers={"Retry-After": str(wait)})
            self.waiters.append((loop, fut))
        try:
            await fut
        except asyncio.CancelledError:
            with self.lock:
                queued = (loop, fut) in self.waiters
                if queued:
                    self.waiters.remove((loop, fut))
            if not queued and fut.done() and not fut.cancelled():  # a place was handed over just now: pass it on
                self._release()
            raise
        return _Slot(self)

    def _release(self):
        """Give a place back: to the oldest waiter if any (in_flight unchanged), else to the pool."""
        with self.lock:
            if not self.waiters:
                self.in_flight -= 1
                return
            loop, fut = self.waiters.popleft()
        loop.call_soon_threadsafe(self._hand_over, fut)

    def _hand_over(self, fut):
        if fut.done():  # its waiter was cancelled meanwhile
            self._release()
        else:
            fut.set_result(True)

    def start(self, params):
        """Submit a validated request to the engine -> its engine.Request (ValueError if the engine refuses it)."""
        return self.engine.submit(params.prompt, num_samples=params.n, max_tokens=params.max_tokens,
                                  temperature=params.temperature, top_k=params.top_k, seed=params.seed,
                                  stop=list(params.stop))

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

    def health(self):
        return {"status": "ok", "model": self.model_name, "batching": "continuous", "context": self.max_context,
                "in_flight": self.in_flight, "queued": self.queued, "max_concurrency": self.max_concurrency,
                "max_queue": self.max_queue, "engine": {**self.engine.load(), **self.engine.stats},
                "python_tool": sandbox.jail_status().mode}


class _Slot:
    """One admitted request's place under max_concurrency; release() gives it back (once, however often called)."""

    def __init__(self, service):
        self.service = service
        self.held = True
        self.t0 = time.monotonic()

    def release(self):
        with self.service.lock:
            if not self.held:
                return
            self.held = False
            self.service.service_time = 0.8 * self.service.service_time + 0.2 * (time.monotonic() - self.t0)
        self.service._release()


def _finish_reason(reason):
    return "length" if reason in (None, "length") else "stop" if reason in ("stop", "cancelled") else reason


# ------------------------------------------------------------------------------------------------- the app
def create_app(service):
    app = FastAPI(title="tritonchat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(request, e):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

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
        return service.health()

    def model_card():
        return {"id": service.model_name, "object": "model", "created": 0, "owned_by": "tritonchat"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != service.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {service.model_name!r}",
                           type_="not_found_error", param="model", code="model_not_found")
        return model_card()

    page = chat_page(service.model_name)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        s = service
        body = await _read_json(request, s.max_body_bytes, s.body_timeout)  # before taking a place
        params = parse_request(body, s.tokenizer, s.max_context, s.max_tokens_limit, s.max_n)
        headers = {"X-Trimmed-Messages": str(params.trimmed)} if params.trimmed else {}
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=s.model_name)
        if params.stream:
            try:
                slot = await _unless_disconnected(request, s.acquire())
            except _ClientGone:
                return Response(status_code=499)
            try:
                job = s.start(params)
            except BaseException as e:
                slot.release()
                if isinstance(e, ValueError):  # the engine refused the parameters
                    raise APIError(400, str(e)) from None
                raise
            return StreamingResponse(_stream(s, job, slot, params, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
                                     background=BackgroundTask(_cleanup, s, job, slot))
        try:
            result = await _unless_disconnected(request, _complete(s, params, meta))
        except _ClientGone:
            return Response(status_code=499)
        return JSONResponse(result, headers=headers)

    return app


async def _complete(s, params, meta):
    """A non-streaming completion: wait for a place, generate, cut at stop strings -> the response body. Cancelled
    (the client left), it gives up its place or its generation."""
    slot = await s.acquire()
    job = None
    try:
        try:
            job = s.start(params)
        except ValueError as e:  # the engine refused the parameters
            raise APIError(400, str(e)) from None
        decoders = [IncrementalDecoder(s.tokenizer) for _ in range(params.n)]
        cutters = [StopCutter(params.stop) for _ in range(params.n)]
        texts = [""] * params.n
        async for col, _ in s.columns(job):
            for i, t in enumerate(col):
                if t is not None and t not in s.engine.stop_ids:
                    texts[i] += cutters[i].feed(decoders[i].add(t))
        texts = [texts[i] + cutters[i].feed(decoders[i].flush()) + cutters[i].flush() for i in range(params.n)]
    finally:
        if job is not None:
            _cleanup(s, job, slot)
        else:
            slot.release()
    completion_tokens = sum(len(c) for c in job.completions)
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                "finish_reason": "stop" if cutters[i].hit else _finish_reason(job.finish_reasons[i])}
               for i in range(params.n)]
    usage = {"prompt_tokens": len(params.prompt), "completion_tokens": completion_tokens,
             "total_tokens": len(params.prompt) + completion_tokens}
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage}


async def _unless_disconnected(request, coro):
    """Await `coro` unless the client disconnects first: then cancel it (its cleanup runs) and raise _ClientGone."""
    task = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # cancelled, or it failed on its way out: nobody is there to tell
                pass
    if task.cancelled():
        raise _ClientGone()
    return task.result()


async def _disconnect(request):
    """Returns once the client has disconnected (the body is read: the only message left is http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cleanup(service, job, slot):
    service.cancel(job)  # no-op when finished; frees the KV blocks of an abandoned request
    slot.release()


async def _read_json(request, limit, timeout):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}", code="body_too_large")

    async def read():
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        return data

    try:
        data = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending its request", code="client_disconnected") \
            from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise APIError(400, f"the request body is not valid JSON: {type(e).__name__}: {e}"[:300],
                       code="invalid_json") from None


async def _stream(s, job, slot, params, meta):
    """Server-sent events in OpenAI's chunk format: a role chunk per choice, content deltas, a finish chunk per
    choice, an optional usage chunk, then [DONE]. The job is cancelled when the client goes (the response's
    background task and this generator's cleanup)."""
    def chunk(choices, **extra):
        return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    n = params.n
    decoders = [IncrementalDecoder(s.tokenizer) for _ in range(n)]
    cutters = [StopCutter(params.stop) for _ in range(n)]
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(n)])
        async for col, _ in s.columns(job):
            out = []
            for i, t in enumerate(col):
                if t is None or t in s.engine.stop_ids:
                    continue
                text = cutters[i].feed(decoders[i].add(t))
                if text:
                    out.append({"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None})
            if out:
                yield chunk(out)
        for i in range(n):
            tail = cutters[i].feed(decoders[i].flush()) + cutters[i].flush()
            delta = {"content": tail} if tail else {}
            reason = "stop" if cutters[i].hit else _finish_reason(job.finish_reasons[i])
            yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}])
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


def chat_page(model_name="tritonchat"):
    """The web chat page, model/chat.html read from the package (a source checkout or an install alike), with the
    model's name HTML-escaped into it."""
    page = importlib.resources.files(__package__ or "model").joinpath("chat.html").read_text(encoding="utf-8")
    return page.replace("__MODEL__", html.escape(model_name, quote=True))


def _listen(host, port):
    """A bound, listening socket for (host, port); OSError if the address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def main(argv=None):
    parser = ArgumentParser(prog="python -m model.server", description="tritonchat web UI + OpenAI-compatible API")
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint stage")
    parser.add_argument("--run", default=None, help="checkpoint run name (default: the newest run)")
    parser.add_argument("--device", type=device_type, default=None,
                        help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int_at_least(1, 65535), default=8000, help="port to listen on")
    parser.add_argument("--max-concurrency", type=int_at_least(1), default=16, help="requests generating at once")
    parser.add_argument("--max-queue", type=int_at_least(0), default=None,
                        help="requests waiting for a place; more get 429 (default: 4 x --max-concurrency)")
    parser.add_argument("--max-tokens-limit", type=int_at_least(1), default=1024, help="the largest max_tokens")
    parser.add_argument("--max-n", type=int_at_least(1), default=8, help="the largest n accepted")
    parser.add_argument("--max-body-bytes", type=int_at_least(1), default=1 << 20, help="the largest request body")
    parser.add_argument("--body-timeout", type=float_between(0.1, 3600), default=10.0,
                        help="seconds a client has to send its request body")
    kernels.add_argument(parser)
    args = parser.parse_args(argv)
    kernels.set_mode(args.kernels)
    try:  # before the slow model load: a bad address is a one-line error, not a traceback after a banner
        sock = _listen(args.host, args.port)
    except (OSError, OverflowError) as e:
        parser.error(f"argument --host/--port: cannot listen on {args.host}:{args.port}: {e}")

    model, tokenizer, meta = load_chat_model(args.source, args.device, args.run)
    service = ChatService(Engine(model, tokenizer), tokenizer, model_name=f"tritonchat-{args.source}",
                          max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                          max_tokens_limit=args.max_tokens_limit, max_n=args.max_n,
                          max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout)
    import uvicorn  # only the server process needs it; importing this module (tests, tools) does not
    print(f"tritonchat-{args.source} (step {meta.get('step')}, kernels {kernels.get_mode()}, continuous batching, "
          f"context {service.max_context}) on http://{args.host}:{args.port}\n{sandbox.jail_status().banner}",
          flush=True)
    try:
        uvicorn.Server(uvicorn.Config(create_app(service), log_level="info")).run(sockets=[sock])
    finally:
        service.close()


if __name__ == "__main__":
    main()
