"""Web chat UI + OpenAI-compatible API for a tritonchat checkpoint (FastAPI + uvicorn; make serve).

    python -m model.server --source rl --port 8080 --host 0.0.0.0   # default: the newest SFT, 127.0.0.1:8000
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(
        model="tritonchat", messages=[{"role": "user", "content": "Hi"}], stream=True)

POST /v1/chat/completions reads (ChatRequest) messages (developer = system; content a str or text parts; the last is
the user's), temperature (0 = greedy), max_tokens or max_completion_tokens, n (samples sharing the prompt's KV pages),
seed, stop (up to 4 strings, found across token boundaries), stream (SSE chunks, then `data: [DONE]`),
stream_options.include_usage; top_p is validated but IGNORED, top_k is an extension, other fields are ignored; tool
calls stay in the content as their literal markers. GET /v1/models[/{id}], /health and / (model/chat.html, like
nanochat's https://github.com/karpathy/nanochat/blob/master/scripts/chat_web.py). An unset max_tokens is the room the
prompt leaves in the trained context (at most --max-tokens-limit); a history too long loses its oldest turns (header
X-Trimmed-Messages); a prompt that cannot fit is a 400 context_length_exceeded. The body is read (within
--body-timeout, at most --max-body-bytes: else 408 / 413) and validated (else an OpenAI 4xx) before the request takes
a place: --max-concurrency requests join the Engine's decode batch, --max-queue more wait in arrival order, then 429 +
Retry-After. A client that leaves cancels its request (KV blocks freed); a failure ends its request alone (a 500, or
an in-band error event)."""
import asyncio
import contextlib
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
from collections import deque, namedtuple
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import kernels
from model import sandbox
from model.chat import context_of, default_reserve, device_type, fit_conversation, load_chat_model
from model.common import ArgumentParser, float_between, int_at_least
from model.engine import Engine
from model.tokenizer import IncrementalDecoder

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # stop strings per request, as OpenAI

class EngineError(RuntimeError):
    pass

def error_response(status, message, type_="invalid_request_error", param=None, code=None, headers=None):
    """OpenAI's error body: param the offending request field, code a reason such as "context_length_exceeded"."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)

class APIError(Exception):
    """Answered with error_response(status, message, **kwargs)."""

    def __init__(self, status, message, **kwargs):
        super().__init__(message)
        self.response = error_response(status, message, **kwargs)

class _ClientGone(Exception):
    """The client disconnected: nobody reads the answer."""

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)  # JSON types as sent (no true for 1), no NaN

def _text_parts(content):
    """OpenAI content parts (text only) -> their text; anything else is left to fail as not a string."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return content

class _Message(_Strict):
    role: Literal[tuple(ROLES)]
    content: Annotated[str, BeforeValidator(_text_parts)]

class _StreamOptions(_Strict):
    include_usage: bool | None = None

class ChatRequest(_Strict):
    """The chat-completions fields the server reads (any other is ignored); null is the default."""
    messages: list[_Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # validated, ignored (documented)
    top_k: int | None = Field(None, ge=1, le=1 << 30)
    n: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_STOP),
                    BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] | None = None

# A validated request: prompt ids end in <|assistant_start|>, prompt + max_tokens (per sample) fits the context, stop
# is a tuple of strings, trimmed counts the oldest messages dropped to fit the context.
ChatParams = namedtuple("ChatParams", "prompt temperature top_k n seed max_tokens stream include_usage stop trimmed")

def _invalid(err):
    """pydantic's error -> APIError(400): param as messages[0].role, code invalid_type / invalid_value / empty_array."""
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or None
    param = "stop" if param and param.startswith("stop") else param
    kind = err["type"]
    code = "empty_array" if kind == "too_short" and param == "messages" else "invalid_type" \
        if (kind.endswith("_type") or kind == "missing") and param != "stop" else "invalid_value"
    return APIError(400, f"'{param or 'body'}': {err['msg']}, got {json.dumps(err['input'])[:50]}", param=param,
                    code=code)

def parse_request(body, tokenizer, max_context, max_tokens_limit, max_n):
    """A chat-completions JSON body -> ChatParams; APIError(400) naming the offending field otherwise."""
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        raise _invalid(e.errors()[0]) from None
    for name, limit in (("n", max_n), ("max_tokens", max_tokens_limit), ("max_completion_tokens", max_tokens_limit)):
        if (getattr(req, name) or 0) > limit:
            raise APIError(400, f"'{name}' must be at most {limit}, got {getattr(req, name)}", param=name,
                           code="invalid_value")
    if req.messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's", param="messages", code="invalid_value")
    if None not in (req.max_tokens, req.max_completion_tokens) and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, f"'max_tokens' ({req.max_tokens}) and 'max_completion_tokens' ({req.max_completion_tokens})"
                            " disagree: send one", param="max_tokens", code="invalid_value")
    key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = getattr(req, key)
    reserve = max_tokens if max_tokens is not None else min(max_tokens_limit, default_reserve(max_context))
    conv = [{"role": ROLES[m.role], "content": m.content} for m in req.messages]
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
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
    usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatParams(prompt, 1.0 if req.temperature is None else req.temperature, req.top_k, req.n or 1, seed,
                      max_tokens, bool(req.stream), usage, tuple(req.stop or ()), trimmed)

class _Choice:
    """A choice's text: tokens in (stop tokens dropped), text out, cut before a stop string (found across pieces)."""

    def __init__(self, tokenizer, stops, stop_ids):
        self.decoder, self.stops, self.stop_ids = IncrementalDecoder(tokenizer), stops, stop_ids
        self.pending, self.hit = "", False  # hit: a stop string was found, everything after it is dropped

    def _feed(self, text):
        if self.hit:
            return ""
        p = self.pending + text
        cut = min((i for i in (p.find(s) for s in self.stops) if i >= 0), default=-1)
        self.hit = cut >= 0
        if not self.hit:  # hold back the longest tail that starts a stop string
            cut = len(p) - max((k for s in self.stops for k in range(1, len(s)) if p.endswith(s[:k])), default=0)
        self.pending = "" if self.hit else p[cut:]
        return p[:cut]

    def add(self, token):
        return "" if token is None or token in self.stop_ids else self._feed(self.decoder.add(token))

    def close(self):
        """The rest of the text (the held-back tail is empty after a hit)."""
        return self._feed(self.decoder.flush()) + self.pending

    def finish_reason(self, reason):
        """OpenAI's finish_reason, given the engine's."""
        if self.hit or reason in ("stop", "cancelled"):
            return "stop"
        return "length" if reason in (None, "length") else reason

class ChatService:
    """Owns the engine (stepping in its background thread) and the admission queue: max_concurrency requests generate
    at once, max_queue (default 4 x max_concurrency) wait, more get 429. max_tokens_limit, max_n, max_body_bytes: the
    largest a request may ask for or send; body_timeout: seconds a client has to send its whole body."""

    def __init__(self, engine, tokenizer, model_name="tritonchat", max_concurrency=8, max_tokens_limit=1024,
                 max_n=8, max_body_bytes=1 << 20, max_queue=None, body_timeout=10.0):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_concurrency, self.max_queue = max_concurrency, 4 * max_concurrency if max_queue is None else max_queue
        self.max_tokens_limit, self.max_n = max_tokens_limit, max_n
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        self.in_flight, self.waiters = 0, deque()  # waiters: futures of queued requests, oldest first
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

    def _take_place(self):
        """With self.lock held: a place now -> _Slot, or None when all are taken or others wait."""
        if self.in_flight < self.max_concurrency and not self.waiters:
            self.in_flight += 1
            return _Slot(self)
        return None

    def try_acquire(self):
        """A place now -> _Slot, or None when all are taken or others wait."""
        with self.lock:
            return self._take_place()

    async def acquire(self):
        """Wait for a place in arrival order -> _Slot; APIError(429) with Retry-After when the queue is full.
        Cancelling the wait (the client left) gives up the place in the queue."""
        fut = asyncio.get_running_loop().create_future()
        with self.lock:  # one step: a place freed between "is one free?" and "join the queue" would be lost
            if slot := self._take_place():
                return slot
            if len(self.waiters) >= self.max_queue:
                wait = min(60, max(1, math.ceil(self.service_time * (len(self.waiters) + 1) / self.max_concurrency)))
                raise APIError(429, f"the server is busy ({self.in_flight} requests generating, {len(self.waiters)} "
                                    f"waiting); retry in {wait} s", type_="rate_limit_error", code="too_many_requests",
                               headers={"Retry-After": str(wait)})
            self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            with self.lock:
                if queued := fut in self.waiters:
                    self.waiters.remove(fut)
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
            fut = self.waiters.popleft()
        fut.get_loop().call_soon_threadsafe(self._hand_over, fut)

    def _hand_over(self, fut):
        if fut.done():  # its waiter was cancelled meanwhile
            self._release()
        else:
            fut.set_result(True)

    async def admit(self, params):
        """Wait for a place, then submit a validated request to the engine -> (_Slot, engine.Request); the place is
        given back if the engine refuses it (APIError(400))."""
        slot = await self.acquire()
        try:
            return slot, self.engine.submit(params.prompt, num_samples=params.n, max_tokens=params.max_tokens,
                                            temperature=params.temperature, top_k=params.top_k, seed=params.seed,
                                            stop=list(params.stop))
        except BaseException as e:
            slot.release()
            if isinstance(e, ValueError):
                raise APIError(400, str(e)) from None
            raise

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
        """The job's (token_column, mask_column) steps, read off the event loop; EngineError if the engine failed it."""
        loop = asyncio.get_running_loop()
        while (item := await loop.run_in_executor(self.pool, self._next, job)) is not None:
            yield item
        if job.error:
            raise EngineError(job.error)

    def health(self):
        return {"status": "ok", "model": self.model_name, "batching": "continuous", "context": self.max_context,
                "in_flight": self.in_flight, "queued": self.queued, "max_concurrency": self.max_concurrency,
                "max_queue": self.max_queue, "engine": {**self.engine.load(), **self.engine.stats},
                "python_tool": sandbox.jail_status().mode}

class _Slot:
    """One admitted request's place under max_concurrency; release() gives it back (once, however often called)."""

    def __init__(self, service):
        self.service, self.held, self.t0 = service, True, time.monotonic()

    def release(self):
        with self.service.lock:
            if not self.held:
                return
            self.held = False
            self.service.service_time = 0.8 * self.service.service_time + 0.2 * (time.monotonic() - self.t0)
        self.service._release()

def create_app(service):
    app = FastAPI(title="tritonchat", docs_url=None, redoc_url=None, openapi_url=None)
    card = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "tritonchat"}
    page = chat_page(service.model_name)

    async def _error(request, e):
        if isinstance(e, APIError):
            return e.response
        if isinstance(e, StarletteHTTPException):
            return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404
                                  else "invalid_request_error")
        if isinstance(e, EngineError):
            return error_response(500, f"generation failed: {e}", "server_error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    for cls in (APIError, StarletteHTTPException, EngineError, Exception):
        app.add_exception_handler(cls, _error)

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != service.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {service.model_name!r}",
                           type_="not_found_error", param="model", code="model_not_found")
        return card

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
        try:
            slot, job = await _unless_disconnected(request, s.admit(params))
            if params.stream:
                return StreamingResponse(_stream(s, job, slot, params, meta), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
                                         background=BackgroundTask(_cleanup, s, job, slot))
            try:
                body = await _unless_disconnected(request, _complete(s, job, params, meta))
            finally:
                _cleanup(s, job, slot)
        except _ClientGone:
            return Response(status_code=499)
        return JSONResponse(body, headers=headers)

    return app

def _usage(params, job):
    completion_tokens = sum(len(c) for c in job.completions)
    return {"prompt_tokens": len(params.prompt), "completion_tokens": completion_tokens,
            "total_tokens": len(params.prompt) + completion_tokens}

async def _chunks(s, job, params):
    """The `choices` of OpenAI's stream chunks: a role delta per choice, content deltas, then a finish per choice."""
    choices = [_Choice(s.tokenizer, params.stop, s.engine.stop_ids) for _ in range(params.n)]
    yield [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
           for i in range(params.n)]
    async for col, _ in s.columns(job):
        if out := [{"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
                   for i, text in enumerate(c.add(t) for c, t in zip(choices, col)) if text]:
            yield out
    for i, c in enumerate(choices):
        tail = c.close()
        yield [{"index": i, "delta": {"content": tail} if tail else {}, "logprobs": None,
                "finish_reason": c.finish_reason(job.finish_reasons[i])}]

async def _complete(s, job, params, meta):
    """A non-streaming completion -> the response body: the stream's deltas joined."""
    texts, reasons = [""] * params.n, [None] * params.n
    async for chunk in _chunks(s, job, params):
        for c in chunk:
            texts[c["index"]] += c["delta"].get("content", "")
            reasons[c["index"]] = c["finish_reason"]
    choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(texts, reasons))]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(params, job)}

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
            with contextlib.suppress(BaseException):  # cancelled, or failed on its way out: nobody is there to tell
                await task
    if task.cancelled():
        raise _ClientGone()
    return task.result()

async def _disconnect(request):
    """Returns once the client has disconnected (the body is read: the only message left is http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

def _cleanup(service, job, slot):
    if not job.done:  # an abandoned request: free its KV blocks
        service.engine.cancel(job)
    slot.release()

async def _read_json(request, limit, timeout):
    if (declared := request.headers.get("content-length", "")).isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}", code="body_too_large")

    async def read():
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        return data

    try:
        return json.loads(await asyncio.wait_for(read(), timeout))
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending its request", code="client_disconnected") \
            from None
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise APIError(400, f"the request body is not valid JSON: {type(e).__name__}: {e}"[:300],
                       code="invalid_json") from None

async def _stream(s, job, slot, params, meta):
    """Server-sent events: _chunks, an optional usage chunk, then [DONE]; a client that leaves cancels the job."""
    head = {**meta, "object": "chat.completion.chunk"}
    try:
        async for choices in _chunks(s, job, params):
            yield f"data: {json.dumps({**head, 'choices': choices})}\n\n"
        if params.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(params, job)})}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # the headers are gone: report in-band, as OpenAI does
        error = {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None, "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
    finally:
        _cleanup(s, job, slot)

def chat_page(model_name="tritonchat"):
    """model/chat.html read from the package (a checkout or an install alike), the model's name HTML-escaped in."""
    page = importlib.resources.files(__package__ or "model").joinpath("chat.html").read_text(encoding="utf-8")
    return page.replace("__MODEL__", html.escape(model_name, quote=True))

def main(argv=None):
    parser = ArgumentParser(prog="python -m model.server", description="tritonchat web UI + OpenAI-compatible API")
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint stage")
    parser.add_argument("--run", help="checkpoint run name (default: the newest run)")
    parser.add_argument("--device", type=device_type, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int_at_least(1, 65535), default=8000, help="port to listen on")
    parser.add_argument("--max-concurrency", type=int_at_least(1), default=16, help="requests generating at once")
    parser.add_argument("--max-queue", type=int_at_least(0),
                        help="requests waiting for a place; more get 429 (default: 4 x --max-concurrency)")
    parser.add_argument("--max-tokens-limit", type=int_at_least(1), default=1024, help="the largest max_tokens")
    parser.add_argument("--max-n", type=int_at_least(1), default=8, help="the largest n accepted")
    parser.add_argument("--max-body-bytes", type=int_at_least(1), default=1 << 20, help="the largest request body")
    parser.add_argument("--body-timeout", type=float_between(0.1, 3600), default=10.0, help="seconds to send the body")
    kernels.add_argument(parser)
    args = parser.parse_args(argv)
    kernels.set_mode(args.kernels)
    v6 = ":" in args.host
    try:  # before the slow model load: a bad address is a one-line error, not a traceback after a banner
        sock = socket.create_server((args.host, args.port), family=socket.AF_INET6 if v6 else socket.AF_INET,
                                    backlog=2048, dualstack_ipv6=v6)
    except (OSError, OverflowError, ValueError) as e:
        parser.error(f"argument --host/--port: cannot listen on {args.host}:{args.port}: {e}")

    model, tokenizer, meta = load_chat_model(args.source, args.device, args.run)
    limits = ("max_concurrency", "max_queue", "max_tokens_limit", "max_n", "max_body_bytes", "body_timeout")
    service = ChatService(Engine(model, tokenizer), tokenizer, f"tritonchat-{args.source}",
                          **{k: getattr(args, k) for k in limits})
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
