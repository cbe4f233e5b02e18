"""Load test: the OpenAI-compatible server (model/server.py) under N concurrent streaming clients, then the same
with stalled clients holding connections open.

    python -m bench.serve                                  # 8 clients x 4 requests of 32 tokens, then + 16 stalled
    python -m bench.serve --clients 32 --requests 8 --max-tokens 64 --stalled 16 --device cuda

The server runs in a child process on 127.0.0.1 with a random-weight model (--layers x --width, a byte-level BPE
trained on a few sentences). Each client streams its requests one after another (stream_options.include_usage),
timing latency (request sent -> [DONE]) and time to first token (-> first content delta). A stalled client sends
headers and part of a body it never finishes, and reconnects when dropped (408 after --body-timeout). Per phase:
requests/s and tokens/s (completion tokens from usage / wall time), p50 / p99 latency and time to first token, errors.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench import harness
from model.common import ArgumentParser, float_between, int_at_least, writable_dir

SUITE = "serve"
CORPUS = ["Hello there! How are you today? I am fine, thank you. " * 4,
          "The quick brown fox jumps over the lazy dog; 12 + 30 = 42.", "What is the capital of France? Paris."] * 10
MESSAGES = [{"role": "user", "content": "Hello there! How are you today?"}]

def serve(args):
    """Child process: build the random model and serve it until killed."""
    import torch
    import uvicorn

    import kernels
    from model.engine import Engine
    from model.gpt import GPT, GPTConfig
    from model.server import ChatService, create_app
    from model.tokenizer import Tokenizer

    kernels.set_mode(args.kernels)
    torch.manual_seed(0)
    tok = Tokenizer.train(CORPUS, 300)
    cfg = GPTConfig(sequence_len=args.context, vocab_size=tok.vocab_size, n_layer=args.layers,
                    n_head=max(1, args.width // 64), n_kv_head=max(1, args.width // 64), n_embd=args.width)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # the init zeroes lm_head (every logit 0): random weights so that text comes out
        for p in model.parameters():
            p.normal_(0, 0.5)
    model = model.to(args.device).eval()
    service = ChatService(Engine(model, tok), tok, model_name="bench", max_concurrency=args.max_concurrency,
                          max_queue=args.max_queue, max_tokens_limit=args.max_tokens, body_timeout=args.body_timeout)
    uvicorn.run(create_app(service), host="127.0.0.1", port=args.port, log_level="warning")

def start_server(args):
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "bench.serve", "--serve-only", "--port", str(port)]
    for name in ("device", "kernels", "layers", "width", "context", "max_tokens", "max_concurrency", "max_queue",
                 "body_timeout"):
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench.serve: the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("bench.serve: the server did not come up within 300 s")

def one_request(client, url, max_tokens, seed):
    """One streaming request -> (latency s, time to first token s or None, completion tokens, error or None)."""
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return time.perf_counter() - t0, None, 0, f"HTTP {r.status_code}"
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return time.perf_counter() - t0, ttft, tokens, event["error"]["message"]
                if ttft is None and any(c["delta"].get("content") for c in event["choices"]):
                    ttft = time.perf_counter() - t0
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return time.perf_counter() - t0, ttft, tokens, f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0, ttft, tokens, None

class Stalled:
    """`n` connections that each send headers and 10 bytes of a body they never finish, reopened when dropped."""

    def __init__(self, url, n):
        self.host, self.port = url.split("//")[1].split(":")
        self.stop, self.dropped = threading.Event(), 0
        self.threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(n)]
        for th in self.threads:
            th.start()

    def _hold(self):
        body = json.dumps({"messages": MESSAGES, "max_tokens": 8}).encode()
        while not self.stop.is_set():
            try:
                with socket.create_connection((self.host, int(self.port)), timeout=60) as s:
                    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                              f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
                    s.settimeout(0.5)
                    while not self.stop.is_set():
                        try:
                            if not s.recv(4096):  # the server gave up on us (408): come back
                                break
                        except socket.timeout:
                            continue
                self.dropped += 1
            except OSError:
                time.sleep(0.1)

    def close(self):
        self.stop.set()
        for th in self.threads:
            th.join(timeout=5)

def phase(url, clients, requests, max_tokens, stalled):
    """Run `clients` threads x `requests` sequential streaming requests -> the phase's metrics."""
    holder = Stalled(url, stalled)
    if stalled:
        time.sleep(0.5)  # they are connected and stalled before the load starts

    def run_client(i):
        with httpx.Client(timeout=600) as client:
            return [one_request(client, url, max_tokens, seed=1000 * i + j) for j in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(run_client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    health = httpx.get(url + "/health", timeout=10).json()
    holder.close()
    ok = [r for r in results if r[3] is None]
    lat = sorted(r[0] * 1e3 for r in ok)
    ttft = sorted(r[1] * 1e3 for r in ok if r[1] is not None)
    p50 = lambda xs: statistics.median(xs) if xs else None
    p99 = lambda xs: xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else None
    return {"requests": len(results), "errors": len(results) - len(ok),
            "error_samples": sorted({r[3] for r in results if r[3]})[:3], "wall_s": wall,
            "requests_s": len(ok) / wall, "tokens_s": sum(r[2] for r in ok) / wall,
            "completion_tokens": sum(r[2] for r in ok), "p50_ms": p50(lat), "p99_ms": p99(lat),
            "ttft_p50_ms": p50(ttft), "ttft_p99_ms": p99(ttft), "stalled_dropped": holder.dropped,
            "engine_after": health["engine"]}

def run(args):
    proc, url = start_server(args)
    rows = []
    try:
        phase(url, args.clients, 1, args.max_tokens, 0)  # warm-up: every batch shape once
        for stalled in (0, args.stalled):
            m = phase(url, args.clients, args.requests, args.max_tokens, stalled)
            case = {"clients": args.clients, "requests": args.clients * args.requests, "max_tokens": args.max_tokens,
                    "stalled": stalled, "model": f"{args.layers}x{args.width}"}
            rows.append(harness.row(SUITE, case, "tritonchat-server", "stream", m["p50_ms"], **m))
            print(f"[serve] stalled={stalled:2d}: {m['requests_s']:.2f} req/s, {m['tokens_s']:.1f} tok/s, "
                  f"latency p50 {m['p50_ms']:.0f} ms p99 {m['p99_ms']:.0f} ms, TTFT p50 {m['ttft_p50_ms']:.0f} ms "
                  f"p99 {m['ttft_p99_ms']:.0f} ms, errors {m['errors']}/{m['requests']}", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows

def main(argv=None):
    ap = ArgumentParser(description="load test of model/server.py")
    ap.add_argument("--clients", type=int_at_least(1), default=8, help="concurrent streaming clients")
    ap.add_argument("--requests", type=int_at_least(1), default=4, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int_at_least(1), default=32, help="completion tokens asked per request")
    ap.add_argument("--stalled", type=int_at_least(0), default=16, help="stalled clients in the second phase")
    ap.add_argument("--layers", type=int_at_least(1), default=2, help="random model: layers")
    ap.add_argument("--width", type=int_at_least(1), default=128, help="random model: width (heads of 64)")
    ap.add_argument("--context", type=int_at_least(1), default=256, help="random model: trained context")
    ap.add_argument("--max-concurrency", type=int_at_least(1), help="server places (default: --clients)")
    ap.add_argument("--max-queue", type=int_at_least(0), default=64, help="server queue depth")
    ap.add_argument("--body-timeout", type=float_between(0.1, 3600), default=2.0, help="server body deadline (s)")
    ap.add_argument("--device", default="cuda" if harness.on_gpu() else "cpu")
    ap.add_argument("--kernels", default="auto", choices=["eager", "fused", "auto"])
    ap.add_argument("--out", type=writable_dir, help="output folder (default $OUT, else bench/results)")
    ap.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.width % 64:
        ap.error(f"--width must be a multiple of 64 (heads of 64), got {args.width}")
    args.max_concurrency = args.max_concurrency or args.clients
    if args.serve_only:
        return serve(args)
    info = harness.header(SUITE)
    harness.write_results(SUITE, run(args), info, out_dir=args.out, png=False, quick=not harness.on_gpu())

if __name__ == "__main__":
    main()
