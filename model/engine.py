"""Inference engine (nanochat's, https://github.com/karpathy/nanochat/blob/master/nanochat/engine.py, batched):
continuous batching over a paged KV cache (model/kv_cache.py). A step prefills the waiting requests (one right-padded
batch of what each prompt does not find in the prefix cache), then decodes one token for every running sequence; a
prompt's num_samples continuations fork from one prefill and share its pages. Sampling: temperature (0 = greedy),
top-k, a torch.Generator per request (seed), so samples do not depend on the batch. A sample ends on Engine.stop_ids
(<|assistant_end|>, <|bos|>), after the token completing a `stop` string in its decoded text, or at max_tokens. Tool
use: code between <|python_start|> and <|python_end|> runs in model.sandbox.run_tool_call's jail during the step; its
answer (a failed call: stdout + "Error: <reason>") is forced, one token a step, as <|output_start|> answer
<|output_end|> with mask 0. One request's failure (its sampling, tool call, stop check, or forward: a failed batched
forward is retried request by request) ends it alone with "error"."""
import math
import queue
import threading
import traceback
from collections import deque

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from model import sandbox
from model.kv_cache import DecodeGraphs, PagedKVCache
from model.tokenizer import IncrementalDecoder

class Request:
    """One prompt with num_samples continuations, filled in by the engine, read from any thread: then .completions,
    .completion_masks (1 sampled, 0 forced), .finish_reasons ("stop" | "length" | "cancelled" | "error"), .error."""

    def __init__(self, prompt_ids, num_samples, max_tokens, temperature, top_k, seed, stop=()):
        self.prompt, self.num_samples, self.max_tokens = list(prompt_ids), num_samples, max_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.stop = tuple(stop)                                   # stop strings: a sample ends once its text has one
        self.stopped_by = [None] * num_samples                    # the stop string that ended each sample
        self.texts = None                                         # per sample: (IncrementalDecoder, recent text)
        self.completions = [[] for _ in range(num_samples)]       # generated tokens (incl. forced, incl. stop)
        self.completion_masks = [[] for _ in range(num_samples)]
        self.finish_reasons = [None] * num_samples
        self.done = self.cancelled = False
        self.error = self.generator = None                        # exception text; torch.Generator at admission
        self.events = queue.Queue()                               # (tokens, masks) columns, then None
        self.seqs = []                                            # one _Sequence per sample, once admitted

    def stream(self, timeout=None, step=None):
        """Blocking iterator over the (token_column, mask_column) steps; step() runs while none is queued."""
        while True:
            while step is not None and self.events.empty():
                step()
            item = self.events.get(timeout=timeout)
            if item is None:
                return
            yield item

class _Sequence:
    """Sample `index` of `req`: prompt + completion `tokens`, block table, num_cached tokens in the cache, dense row."""

    def __init__(self, req, index, tokens, blocks, num_cached, row):
        self.req, self.index, self.tokens, self.blocks, self.num_cached = req, index, tokens, blocks, num_cached
        self.row, self.done = row, False
        self.forced = deque()      # tool output still to be forced, one token per step
        self.python_tokens = None  # inside <|python_start|> ... <|python_end|>: the code's tokens so far

class Engine:
    """Continuous-batching generation for `model` (a GPT) with `tokenizer` (model.tokenizer.Tokenizer's surface).
    block_size: tokens per KV page (16, 32 or 64); num_blocks: the initial pool (default: 8 full-length sequences,
    doubled on demand); max_batch: running sequences; max_prefill_tokens: padded tokens per prefill batch;
    tool_timeout (s), tool_memory_mb: a tool call's sandbox limits; cuda_graphs: replay the fused decode step from
    CUDA graphs (model.kv_cache.DecodeGraphs; CUDA and fused mode only, else ignored; off by default: not measured
    on GPU). engine.stats counts prefill/decode tokens, steps, copy-on-write copies and prefix_hit_tokens."""

    def __init__(self, model, tokenizer, block_size=16, num_blocks=None, max_batch=256, max_prefill_tokens=8192,
                 tool_timeout=5.0, tool_memory_mb=256, prefix_caching=True, cuda_graphs=False):
        param, cfg = next(model.parameters()), model.config
        self.model, self.tokenizer, self.device = model, tokenizer, param.device
        self.max_context = min(model.cos.shape[0], 10 * cfg.sequence_len)
        self.cache = PagedKVCache(cfg.n_layer, cfg.n_kv_head, cfg.n_embd // cfg.n_head, block_size,
                                  num_blocks or 8 * math.ceil(cfg.sequence_len / block_size), param.dtype,
                                  self.device, model.cos, model.sin, prefix_caching=prefix_caching)
        self.graphs = DecodeGraphs(model, self.cache, max_batch) if cuda_graphs and self.device.type == "cuda" else None
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.tool_timeout, self.tool_memory_mb = tool_timeout, tool_memory_mb
        special = tokenizer.encode_special
        self.stop_ids = {special("<|assistant_end|>"), tokenizer.bos_token_id}  # also read by the server and chat CLI
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.waiting, self.running = deque(), []           # running: requests with live sequences
        self.lock = threading.RLock()                      # engine state (step, cancel)
        self.cond = threading.Condition(threading.Lock())  # the waiting queue + background wake-ups
        self.thread, self.stopping = None, False           # the background stepping thread (start/stop)
        self._solo = 0  # after a failed batched prefill: prefill this many requests one at a time
        self.stats = dict(prefill_tokens=0, prefill_batches=0, decode_steps=0, decode_tokens=0, cow_copies=0,
                          prefix_hit_tokens=0)

    def submit(self, prompt_ids, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42, stop=None):
        """Queue one prompt -> its Request (thread-safe). ValueError naming the first bad parameter: an empty or too
        long prompt; num_samples >= 1, max_tokens >= 0, seed, top_k >= 1 or None: ints; temperature finite >= 0;
        stop None or a list of non-empty strings."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("Engine: the prompt must hold at least one token")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"Engine: prompt of {len(prompt_ids)} tokens leaves no room in the context "
                             f"({self.max_context})")
        is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
        stop = () if stop is None else tuple(stop)
        for ok, what, value in (
                (is_int(num_samples) and num_samples >= 1, "num_samples must be an int >= 1", num_samples),
                (is_int(max_tokens) and max_tokens >= 0, "max_tokens must be an int >= 0", max_tokens),
                ((is_int(temperature) or isinstance(temperature, float)) and math.isfinite(temperature)
                 and temperature >= 0, "temperature must be a finite number >= 0", temperature),
                (top_k is None or is_int(top_k) and top_k >= 1, "top_k must be None or an int >= 1", top_k),
                (is_int(seed), "seed must be an int", seed),
                (all(isinstance(x, str) and x for x in stop), "stop must be a list of non-empty strings", stop)):
            if not ok:
                raise ValueError(f"Engine: bad sampling parameters: {what}, got {value!r}")
        req = Request(prompt_ids, num_samples, max_tokens, float(temperature), top_k, seed, stop)
        with self.cond:
            self.waiting.append(req)
            self.cond.notify()
        return req

    def cancel(self, req):
        """End `req` (finish reason "cancelled") and free its blocks at the next step: a client went away."""
        req.cancelled = True
        if self.thread is None:
            with self.lock:
                self._reap()

    def has_work(self):
        return bool(self.waiting or self.running)

    def load(self):
        """A snapshot (no step lock) for /health: requests, sequences, free (incl. evictable) and total blocks."""
        running = list(self.running)
        return {"running": len(running), "waiting": len(self.waiting),
                "running_sequences": sum(sum(not s.done for s in r.seqs) for r in running),
                "free_blocks": self.cache.num_free(), "total_blocks": self.cache.num_blocks}

    @torch.inference_mode()
    def step(self):
        """Admit + prefill waiting requests, then one decode step for all running sequences."""
        with self.lock:
            self._reap()
            self._admit()
            self._decode()
            self._reap()

    def start(self):
        """Step in a background thread whenever there is work (for the server)."""
        if self.thread is not None:
            return
        self.stopping = False
        def loop():
            while True:
                with self.cond:
                    while not self.has_work() and not self.stopping:
                        self.cond.wait()
                    if self.stopping:
                        return
                try:
                    self.step()
                except Exception as e:
                    # A request's own failure ends it alone inside step(); what gets here is an engine bug: fail
                    # what is in flight rather than leave clients waiting on a dead loop.
                    traceback.print_exc()
                    self._fail_all(e)
        self.thread = threading.Thread(target=loop, name="engine", daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread is None:
            return
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()
        self.thread = None

    def generate(self, prompt_ids, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42, stop=None):
        """Yields (token_column, mask_column) per step (None: a finished sample); RuntimeError if the request fails."""
        req = self.submit(prompt_ids, num_samples, max_tokens, temperature, top_k, seed, stop)
        try:
            yield from req.stream(step=None if self.thread is not None else self.step)
            if req.error:
                raise RuntimeError(req.error)
        finally:
            if not req.done:
                self.cancel(req)

    def generate_batch(self, prompt_ids, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        """-> (sequences, masks): prompt + completion per sample, without the stop token; mask 0 on the prompt."""
        return self.generate_many([prompt_ids], num_samples, max_tokens, temperature, top_k, seed)[0]

    def generate_many(self, prompts, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, seed=42):
        """Several prompts in one batch -> [(sequences, masks)] per prompt; prompt i is seeded with seed + i."""
        reqs = [self.submit(p, num_samples, max_tokens, temperature, top_k, seed + i) for i, p in enumerate(prompts)]
        for r in reqs:  # to the end of each stream, stepped by the background thread or here
            deque(r.stream(step=None if self.thread is not None else self.step), maxlen=0)
        if errors := [r.error for r in reqs if r.error]:
            raise RuntimeError(errors[0])
        return [self._result(r) for r in reqs]

    def _result(self, req):
        seqs, masks = [], []
        for comp, mask, reason in zip(req.completions, req.completion_masks, req.finish_reasons):
            n = len(comp) - 1 if reason == "stop" and comp and comp[-1] in self.stop_ids else len(comp)
            seqs.append(req.prompt + comp[:n])
            masks.append([0] * len(req.prompt) + mask[:n])
        return seqs, masks

    def _admit(self):
        """Prefill the waiting requests that fit (batch and prefill-token budget) in one padded batch."""
        batch = []
        n_running = sum(sum(not s.done for s in r.seqs) for r in self.running)
        with self.cond:
            while self.waiting:
                req = self.waiting[0]
                longest = max([len(r.prompt) for r in batch] + [len(req.prompt)])
                if ((batch or n_running) and n_running + req.num_samples > self.max_batch) or \
                        (batch and longest * (len(batch) + 1) > self.max_prefill_tokens) or (batch and self._solo):
                    break
                self.waiting.popleft()
                if req.cancelled or req.max_tokens == 0:
                    self._finish_request(req, "cancelled" if req.cancelled else "length")
                    continue
                batch.append(req)
                n_running += req.num_samples
        if not batch:
            return
        self._solo = max(0, self._solo - 1)
        cache, dev = self.cache, self.device
        # Each prompt's longest cached prefix (whole blocks) is reused; only the rest is prefilled.
        prefix, starts = [], []
        for r in batch:
            blocks = cache.match_prefix(r.prompt)
            starts.append(len(blocks) * cache.block_size)
            blocks += [cache.allocate() for _ in range(math.ceil(len(r.prompt) / cache.block_size) - len(blocks))]
            prefix.append(blocks)
        idx = pad_sequence([torch.tensor(r.prompt[s:]) for r, s in zip(batch, starts)], batch_first=True)  # (R, T)
        lens = [len(r.prompt) - s for r, s in zip(batch, starts)]    # right padded with 0 to the longest
        plan = cache.prefill_plan(prefix, lens, starts)
        try:
            with cache.planned(plan):
                logits = self.model(idx.to(dev), kv_cache=cache)     # (R, T, V)
        except Exception as e:                                        # e.g. out of memory: give the blocks back
            for b in sum(prefix, []):
                cache.decref(b)
            if len(batch) > 1:  # which request failed it? prefill them one at a time
                with self.cond:
                    self.waiting.extendleft(reversed(batch))
                self._solo = len(batch)
            else:
                self._fail(batch[0], e)
            return
        last = logits[torch.arange(len(batch), device=dev), torch.tensor(lens, device=dev) - 1]  # (R, V)
        self.stats["prefill_tokens"] += sum(lens)
        self.stats["prefill_batches"] += 1
        self.stats["prefix_hit_tokens"] += sum(starts)
        for i, r in enumerate(batch):
            n = len(r.prompt)
            cache.insert_prefix(r.prompt, prefix[i], n)  # its full blocks serve later requests from now on
            r.generator = torch.Generator(device=dev).manual_seed(r.seed)
            for b in prefix[i] * (r.num_samples - 1):  # sample 0 owns the blocks, the others share them (COW)
                cache.incref(b)
            r.seqs += [_Sequence(r, s, list(r.prompt), prefix[i] if s == 0 else list(prefix[i]), n, cache.open_row())
                       for s in range(r.num_samples)]
            self.running.append(r)
            try:
                self._emit(r, r.seqs, self._sample(last[i:i + 1].expand(r.num_samples, -1), r).tolist())
            except Exception as e:
                self._fail(r, e)

    def _decode(self, requests=None):
        """One decode step for the running sequences of `requests` (default: all running)."""
        requests = list(self.running if requests is None else requests)
        seqs = [s for r in requests for s in r.seqs if not s.done]
        if not seqs:
            return
        cache = self.cache
        for s in seqs:
            self.stats["cow_copies"] += cache.writable(s.blocks, s.num_cached)
        tables, positions, tokens = [s.blocks for s in seqs], [s.num_cached for s in seqs], [s.tokens[-1] for s in seqs]
        graphs = self.graphs if self.graphs is not None and self.graphs.usable(len(seqs)) else None
        plan = None if graphs else cache.decode_plan(tables, positions, [s.row for s in seqs])
        try:
            if graphs:
                logits = graphs.run(tables, positions, tokens)         # (B, V), replayed from a CUDA graph
            else:
                with cache.planned(plan):
                    logits = self.model(torch.tensor(tokens, device=self.device)[:, None], kv_cache=cache)[:, 0]
        except Exception as e:
            # Nothing advanced (rewriting the same k/v is harmless): find the failing request(s), one per forward.
            if len(requests) == 1:
                self._fail(requests[0], e)
            else:
                for r in requests:
                    self._decode([r])
            return
        for s in seqs:
            s.num_cached += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(seqs)
        groups, picks, start, at = [], [], 0, 0
        for r in requests:                                            # rows are grouped by request, in order
            live = [s for s in r.seqs if not s.done]
            if live:
                try:
                    picks.append(self._sample(logits[start:start + len(live)], r))
                    groups.append((r, live, at))
                    at += len(live)
                except Exception as e:
                    self._fail(r, e)
                start += len(live)
        tokens = torch.cat(picks).tolist() if picks else []           # one device->host sync per step
        for r, live, at in groups:
            try:
                self._emit(r, live, tokens[at:at + len(live)])
            except Exception as e:
                self._fail(r, e)

    def _sample(self, logits, req):
        """logits (n, V) fp32 -> n token ids (a tensor), with the request's own generator."""
        if req.temperature < 1e-5:  # greedy: logits / temperature would overflow fp32 (inf - inf = NaN)
            return logits.argmax(-1)
        logits = logits.float()
        if req.top_k is not None and req.top_k < logits.shape[-1]:
            kth = torch.topk(logits, req.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits / req.temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=req.generator)[:, 0]

    def _emit(self, req, seqs, sampled):
        """Append a token to each of `seqs` (forced tool output first), run tool calls, finish, push the column."""
        col, mcol = [None] * req.num_samples, [None] * req.num_samples  # this step's token and mask per sample
        for s, tok in zip(seqs, sampled):
            tok, m = (s.forced.popleft(), 0) if s.forced else (tok, 1)
            s.tokens.append(tok)
            req.completions[s.index].append(tok)
            req.completion_masks[s.index].append(m)
            col[s.index], mcol[s.index] = tok, m
            if tok == self.python_start:
                s.python_tokens = []
            elif tok == self.python_end and s.python_tokens is not None:
                if s.python_tokens:
                    code = self.tokenizer.decode(s.python_tokens)
                    out = sandbox.run_tool_call(code, timeout=self.tool_timeout, memory_mb=self.tool_memory_mb)
                    s.forced.extend([self.output_start] + self.tokenizer.encode(out) + [self.output_end])
                s.python_tokens = None
            elif s.python_tokens is not None:
                s.python_tokens.append(tok)
            if (tok in self.stop_ids and m) or (req.stop and self._hit_stop(req, s.index, tok)):
                self._finish_seq(s, "stop")
            elif len(req.completions[s.index]) >= req.max_tokens or len(s.tokens) >= self.max_context:
                self._finish_seq(s, "length")
        req.events.put((col, mcol))
        if all(s.done for s in req.seqs):
            self._finish_request(req, None)

    def _hit_stop(self, req, i, tok):
        """Does sample i's decoded text now hold a stop string? (A window of the longest one's length is kept.)"""
        if req.texts is None:
            req.texts = [[IncrementalDecoder(self.tokenizer), ""] for _ in range(req.num_samples)]
        state = req.texts[i]
        state[1] += state[0].add(tok)
        if (hit := next((x for x in req.stop if x in state[1]), None)) is not None:
            req.stopped_by[i] = hit
            return True
        keep = max(map(len, req.stop)) - 1
        state[1] = state[1][-keep:] if keep else ""
        return False

    def _fail(self, req, e):
        """End one request with finish reason "error" (the others go on)."""
        req.error = f"{type(e).__name__}: {e}"
        self._finish_request(req, "error")

    def _finish_seq(self, s, reason):
        if s.done:
            return
        s.done = True
        s.req.finish_reasons[s.index] = reason
        if s.row is not None:  # first: its dense row flushes what only it holds into the pages
            self.cache.close_row(s.row)
            s.row = None
        # its full blocks (prompt and completion: a chat's next turn starts with them) go to the prefix cache
        self.cache.insert_prefix(s.tokens, s.blocks, s.num_cached)
        for b in s.blocks:
            self.cache.decref(b)
        s.blocks = []

    def _finish_request(self, req, reason):
        for s in req.seqs:
            self._finish_seq(s, reason)
        req.finish_reasons[:] = [reason if r is None else r for r in req.finish_reasons]
        if not req.done:
            req.done = True
            req.events.put(None)
        if req in self.running:
            self.running.remove(req)

    def _fail_all(self, e):
        with self.lock:
            with self.cond:
                reqs, self.waiting = list(self.running) + list(self.waiting), deque()
            for req in reqs:
                self._fail(req, e)

    def _reap(self):
        """Drop cancelled requests (running or waiting) and return their blocks."""
        for req in [r for r in self.running if r.cancelled]:
            self._finish_request(req, "cancelled")
        with self.cond:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish_request(req, "cancelled")
