"""Training-throughput profiler: the real model + optimizer step, eager vs fused kernels, with and without
torch.compile, side by side.

    python -m bench.train --depth 20 --kernels eager,fused --compile off,on     # one GPU: the four-way table
    torchrun --standalone --nproc_per_node=8 -m bench.train -- --depth 20       # every GPU (FSDP2)
    python -m bench.train --depth 4 --seq-len 128 --kernels eager --compile off,on        # CPU (inductor: C++)
    python -m bench.train --depth 4 --seq-len 128 --compile on --compile-backend aot_eager --build fsdp,plain

Per configuration (kernels x compile x build): build the model as training does (train/distributed.py; `--build
plain`: no FSDP2, compiled whole, bf16 autocast on CUDA: nanochat's way), warm up (the first step compiles), time N
steps with device syncs between forward, backward and optimizer (the breakdown), then N whole steps without syncs
("step"). Rows record torch._dynamo's graphs, graph breaks and recompiles after the warm-up (0 expected), the NCCL
kernels' time in a one-step profiler capture, MFU = tokens/s x GPT.estimate_flops() / (dense bf16 peak, else the
matmul peak measured here, x GPUs), "vs base" = tokens/s over eager+compile's, and NVML telemetry ("unavailable"
without nvidia-ml-py or a GPU). Out of GPU memory is a row marked so. Tokens are random.

Memory at d20 per GPU (arithmetic, not measured on GPU): why the fused preset runs nanochat's 32 x 2048 tokens per GPU
with no accumulation and the eager one 16 x 2048 x 2. d20: C = 1280, 20 layers, V = 65 536, 561 M params (wte and
lm_head 83.9 M each, blocks 393 M); N = B x T tokens; one (N, C) bf16 tensor is 168 MB at B = 32 (N = 65 536).
  fixed (one GPU, the worst case; FSDP2 divides it by the world size): fp32 params 2.24 GB + fp32 grads 2.24 GB +
    AdamW moments of wte/lm_head 1.34 GB + Muon momentum 1.57 GB + bf16 gathered root and 1-2 blocks ~0.4 GB = ~7.8 GB
  saved for backward per block, fused: block input and post-attention residual 2, normed inputs of the q/k/v and
    MLP GEMMs 2, attention's q_hat, k_hat, v and O 4, the MLP's relu(h)^2 (N, 4C) 4 -> 12 (N, C) = 2.0 GB, x 20 = 40 GB
  root, fused: embedding output, final norm's input and output 3 (N, C) = 0.5 GB; linear_cross_entropy computes dh
    and dw in its forward, never the (N, V) logits: dh 1 (N, C) + ~1.2 GiB of buffers                      = ~1.5 GB
  backward transients of one block (dh of the MLP (N, 4C), a few (N, C) gradients)                      = ~1.5 GB
  -> fused at B = 32: ~52 GB of 80 GB (compile can only lower it). Eager at B = 32: the references keep ~21 (N, C)
     per block (70 GB) plus ~4 fp32 (N, V) logit tensors of 17.2 GB at the loss: ~140 GB, so the eager preset keeps
     16 x 2 accumulation (nanochat runs 32 x 2048 compiled on 80 GB - not measured here).
"""
import os
import threading
import time
from contextlib import nullcontext

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

import kernels
from bench import harness
from model.common import ArgumentParser, int_at_least, peak_flops, print0, writable_dir
from model.gpt import GPT, GPTConfig
from train.distributed import build_model, cleanup, init_distributed

def device_peak_flops(name, measured=None):
    """The dense bf16 peak of model.common.PEAK_BF16_FLOPS, else the matmul peak measured in this run."""
    return peak_flops(name) or measured

def mfu(tokens_per_s, flops_per_token, peak, world_size=1):
    """Model FLOPs utilisation, in % (None without a peak)."""
    return 100.0 * tokens_per_s * flops_per_token / (peak * world_size) if peak else None

def project_speedrun(num_params, tokens_per_s_per_gpu, n_gpus=8, tokens_per_param=20):
    """Hours for nanochat's base-training budget (20 tokens/param) on n_gpus at a per-GPU speed, perfect scaling."""
    tokens = tokens_per_param * num_params
    return {"tokens": tokens, "n_gpus": n_gpus, "hours": tokens / (tokens_per_s_per_gpu * n_gpus) / 3600}

class Telemetry:
    """NVML samples in a background thread: power (W), SM clock (MHz), temperature (C), memory (GiB), util (%)."""

    def __init__(self, interval=0.2):
        self.interval, self.samples, self.error, self._stop = interval, [], None, threading.Event()
        self._thread, self._nvml, self._handle = threading.Thread(target=self._loop, daemon=True), None, None
        try:
            import pynvml
            pynvml.nvmlInit()
            index = torch.cuda.current_device() if torch.cuda.is_available() else 0
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # no nvidia-ml-py, no driver, no GPU: telemetry is simply unavailable
            self.error = f"{type(e).__name__}: {e}"

    def _loop(self):
        nv, h = self._nvml, self._handle
        while nv is not None and not self._stop.is_set():
            try:
                self.samples.append({"power_w": nv.nvmlDeviceGetPowerUsage(h) / 1e3,
                                     "sm_clock_mhz": nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                                     "temp_c": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                                     "mem_gib": nv.nvmlDeviceGetMemoryInfo(h).used / 2**30,
                                     "util_pct": nv.nvmlDeviceGetUtilizationRates(h).gpu})
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        if not self.samples:
            return {"status": "unavailable", "reason": self.error or "no samples"}
        cols = {k: [s[k] for s in self.samples] for k in self.samples[0]}
        return {"status": "ok", "samples": len(self.samples),
                **{k: {"mean": sum(v) / len(v), "max": max(v)} for k, v in cols.items()}}

def label(mode, compiled, build="fsdp"):
    """Row name: eager, eager+compile, fused, fused+compile; " (plain)" for the build without FSDP2."""
    return mode + ("+compile" if compiled else "") + ("" if build == "fsdp" else f" ({build})")

def profile_mode(mode, args, dist_info, compiled=False, build="fsdp"):
    """Warm up, then time args.steps steps in kernel `mode`, compiled or not, FSDP2 or plain build; returns one
    result dict (a CUDA out-of-memory gives {"mode", "compiled", "build", "error"})."""
    kernels.set_mode(mode)
    torch._dynamo.reset()  # each configuration compiles from scratch and counts its own graphs
    counters.clear()
    try:
        return _profile(mode, args, dist_info, compiled, build)
    except torch.OutOfMemoryError as e:
        print0(f"[{label(mode, compiled, build)}] out of memory: {str(e).splitlines()[0]}")
        return {"mode": mode, "compiled": compiled, "build": build, "error": "out of memory"}
    finally:
        torch.cuda.empty_cache()  # a no-op without CUDA

def _profile(mode, args, dist_info, compiled, build):
    device, cuda = dist_info.device, dist_info.device.type == "cuda"
    config = GPTConfig.from_depth(args.depth, sequence_len=args.seq_len, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    if build == "fsdp":  # compiled part by part before sharding
        model = fwd = build_model(config, dist_info, compile=compiled, compile_backend=args.compile_backend)
    else:  # plain: the GPT on the device, compiled whole, bf16 autocast on CUDA (as FSDP2's bf16 policy there)
        with torch.device(device):
            model = GPT(config)
        model.init_weights()
        fwd = torch.compile(model, fullgraph=True, backend=args.compile_backend) if compiled else model
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if build == "plain" and cuda else nullcontext
    optimizers = model.setup_optimizers()
    B, T = args.device_batch_size, args.seq_len
    gen = torch.Generator(device="cpu").manual_seed(dist_info.rank)
    x, y = (torch.randint(0, args.vocab_size, (B, T), generator=gen).to(device) for _ in range(2))

    def forward():
        with autocast():
            return fwd(x, y)

    def optimize():
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    def step():
        loss = forward()
        loss.backward()
        optimize()
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = harness.now() - t0
    warm_graphs = counters["stats"]["unique_graphs"]  # torch._dynamo's running total of graphs compiled
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}  # syncs between phases make each one exact
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = forward()
        t1 = harness.now()
        loss.backward()
        t2 = harness.now()
        optimize()
        for k, dt in zip(phases, (t1 - t0, t2 - t1, harness.now() - t2)):
            phases[k] += dt
    phases = {k: 1e3 * v / args.steps for k, v in phases.items()}

    with Telemetry() as telemetry:  # whole steps, no syncs inside: the number that matters
        t0 = harness.now()
        for _ in range(args.steps):
            loss = step().detach()
        step_ms = 1e3 * (harness.now() - t0) / args.steps
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())

    comm_ms, top = (0.0 if dist_info.world_size == 1 else None), None
    if args.profile or (cuda and dist_info.world_size > 1):  # one step under torch.profiler
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
            harness.sync()
        events = prof.key_averages()
        attr = "self_device_time_total" if cuda else "self_cpu_time_total"
        comm_ms = sum(getattr(e, attr, 0) for e in events if "nccl" in e.key.lower()) / 1e3 if cuda else None
        top = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)[:15]
        top = [{"name": e.key[:80], "ms": getattr(e, attr, 0) / 1e3, "calls": e.count} for e in top]
        if args.profile:
            name = label(mode, compiled, build).replace(" ", "").replace("(", "-").rstrip(")")
            path = os.path.join(args.out, f"trace-{name}.json")
            prof.export_chrome_trace(path)
            print0(f"[{name}] trace: {path}\n[{name}] top kernels by self {'GPU' if cuda else 'CPU'} time:")
            for t in top:
                print0(f"  {t['ms']:9.3f} ms  x{t['calls']:<5} {t['name']}")
    tok_s = B * T * dist_info.world_size / (step_ms / 1e3)
    return {"mode": mode, "compiled": compiled, "build": build, "step_ms": step_ms, "phases_ms": phases,
            "comm_ms": comm_ms, "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / dist_info.world_size,
            "flops_per_token": model.estimate_flops(), "num_params": model.num_params(), "peak_mem_gib": peak_mem,
            "loss": loss.item(), "warmup_s": warmup_s, "graphs": graphs, "graph_breaks": breaks, "top_kernels": top,
            "recompiles": graphs - warm_graphs, "load_avg": os.getloadavg()[0], "telemetry": telemetry.summary()}

def _csv(ap, value, allowed, flag):
    items = [v.strip() for v in value.split(",") if v.strip()]
    for v in items:
        if v not in allowed:
            ap.error(f"unknown value {v!r} in {flag} (use {' and/or '.join(allowed)})")
    if not items:
        ap.error(f"{flag} is empty")
    return items

def main(argv=None):
    ap = ArgumentParser(description="training throughput profiler (eager vs fused, compiled or not)")
    ap.add_argument("--depth", type=int_at_least(1), default=20, help="model depth (width 64*depth)")
    ap.add_argument("--device-batch-size", type=int_at_least(1), help="default 16 on CUDA (the d20 preset), 2 on CPU")
    ap.add_argument("--kernels", default=None, help="comma list of modes (default eager,fused on CUDA, eager on CPU)")
    ap.add_argument("--compile", default=None, help="comma list of off/on (default off,on on CUDA, off on CPU)")
    ap.add_argument("--compile-backend", default="inductor", help="inductor, or aot_eager (CPU smoke: no C++ build)")
    ap.add_argument("--build", default="fsdp", help="comma list: fsdp and/or plain (no FSDP2, whole-model compile)")
    for flag, default in (("--seq-len", 2048), ("--vocab-size", 65536), ("--steps", 10), ("--warmup", 3)):
        ap.add_argument(flag, type=int_at_least(1), default=default)  # warmup >= 1: the first step compiles
    ap.add_argument("--profile", action="store_true", help="torch.profiler trace + top kernels by time")
    ap.add_argument("--out", type=writable_dir, default=os.environ.get("OUT") or harness.RESULTS_DIR)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()  # as init_distributed picks the device
    args.device_batch_size = args.device_batch_size or (16 if cuda else 2)
    modes = _csv(ap, args.kernels or ("eager,fused" if cuda else "eager"), ("eager", "fused"), "--kernels")
    compiles = [c == "on" for c in _csv(ap, args.compile or ("off,on" if cuda else "off"), ("off", "on"), "--compile")]
    builds = _csv(ap, args.build, ("fsdp", "plain"), "--build")
    if "plain" in builds and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        ap.error("--build plain is one process (no data parallelism); run it without torchrun")
    dist_info = init_distributed()

    results = [profile_mode(m, args, dist_info, c, b) for b in builds for m in modes for c in compiles]
    info = harness.device_info()
    peaks = harness.measure_peaks(quick=True)
    peak = device_peak_flops(info["device"], peaks["matmul_tflops"] * 1e12) if cuda else None
    case = {"depth": args.depth, "T": args.seq_len, "B": args.device_batch_size, "gpus": dist_info.world_size}
    rows = []
    for r in results:
        name, ms = label(r.pop("mode"), r["compiled"], r["build"]), r.pop("step_ms", None)
        flops = None
        if ms is not None:  # not out of memory
            r["mfu_pct"] = mfu(r["tokens_per_s"], r["flops_per_token"], peak, dist_info.world_size)
            r["projection_8gpu"] = project_speedrun(r["num_params"], r["tokens_per_s_per_device"])
            flops = r["flops_per_token"] * args.device_batch_size * args.seq_len * dist_info.world_size
        rows.append(harness.row("train", case, name, "step", ms, flops=flops, **r))
    names = [r["provider"] for r in rows if r["ms"]]
    baseline = "eager+compile" if "eager+compile" in names else (names[0] if names else None)
    harness.add_ratios(rows, baseline)
    if dist_info.rank == 0:
        print_table(rows, baseline)
        projected = next((r for r in rows if r.get("projection_8gpu")), None)
        if projected:
            print(f"speedrun projection: {projected['projection_8gpu']['tokens'] / 1e9:.2f} B tokens (20/param) on 8 "
                  "GPUs at the per-GPU tokens/s above, perfect scaling, no eval time")
        telemetry = rows[-1].get("telemetry") or {}
        print("telemetry:", telemetry.get("status"), telemetry.get("reason", ""))
        harness.write_results("train", rows, info, peaks, args.out, png=True)
    cleanup()
    return rows

def print_table(rows, baseline):
    """The table: one line per configuration; "vs base" = this row's tokens/s over the baseline's."""
    f = lambda v, s: "n/a" if v is None else format(v, s)
    print(f"{'config':22} {'step ms':>9} {'fwd':>8} {'bwd':>8} {'opt':>8} {'comm':>7} {'tok/s':>10} {'MFU%':>6} "
          f"{'mem GiB':>8} {'vs base':>7} {'graphs':>6} {'breaks':>6} {'recomp':>6} {'warmup s':>8} {'speedrun h':>10}")
    for r in rows:
        if r.get("error"):
            print(f"{r['provider']:22} {r['error']}")
            continue
        p = r["phases_ms"]
        print(f"{r['provider']:22} {r['ms']:9.1f} {p['forward']:8.1f} {p['backward']:8.1f} {p['optimizer']:8.1f} "
              f"{f(r['comm_ms'], '7.1f'):>7} {r['tokens_per_s']:10.0f} {f(r['mfu_pct'], '6.1f'):>6} "
              f"{f(r['peak_mem_gib'], '8.1f'):>8} {f(r['ratio'], '7.2f'):>7} {r['graphs']:6d} {r['graph_breaks']:6d} "
              f"{r['recompiles']:6d} {r['warmup_s']:8.1f} {r['projection_8gpu']['hours']:10.2f}")
    print(f"baseline: {baseline}; memory: peak CUDA allocation (n/a on CPU); graphs / breaks: compiled by torch."
          "compile / graph breaks; recomp: graphs compiled after the warm-up")

if __name__ == "__main__":
    main()
