"""Training-throughput profiler: the real model + optimizer step, eager vs fused, side by side.

    python -m bench.train --depth 20 --kernels eager,fused [--profile]          # one GPU
    torchrun --standalone --nproc_per_node=8 -m bench.train --depth 20          # every GPU (FSDP2)
    python -m bench.train --depth 2 --seq-len 64 --device-batch-size 2 --kernels eager   # CPU smoke

Per mode: build the model the way training does (meta device -> FSDP2 -> init), warm up, then time N steps of
forward / backward / optimizer with device syncs between the phases (so the breakdown is exact, at the cost of
the overlap a real step would get; the "step" row is timed without those syncs). Communication is the time of the
NCCL kernels in a one-step torch.profiler capture (0 on one GPU). MFU = tokens/s x FLOPs/token / (peak x GPUs),
with FLOPs/token from GPT.estimate_flops() and the peak from a table of dense bf16 peaks (else the matmul peak
measured in this run). NVML telemetry (power, SM clock, temperature, memory, utilisation) is sampled in a
background thread; without nvidia-ml-py or a GPU it reports "unavailable". Input tokens are random: throughput does
not depend on the text.

From the d20 step time it projects the nanochat speedrun: 20 tokens per parameter, on 8 GPUs, assuming the
per-GPU tokens/s measured here and perfect scaling (an upper bound on speed; nanochat's 8xH100 run logs ~41-46% MFU).
"""
import argparse
import os
import threading
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kernels
from bench import harness
from model.common import peak_flops, print0
from model.gpt import GPTConfig
from train.distributed import build_model, cleanup, init_distributed


def device_peak_flops(name, measured=None):
    """The dense bf16 peak of model.common.PEAK_BF16_FLOPS, else the matmul peak measured in this run."""
    return peak_flops(name) or measured


def mfu(tokens_per_s, flops_per_token, peak, world_size=1):
    """Model FLOPs utilisation, in %."""
    if not peak:
        return None
    return 100.0 * tokens_per_s * flops_per_token / (peak * world_size)


def project_speedrun(num_params, tokens_per_s_per_gpu, n_gpus=8, tokens_per_param=20):
    """Hours for nanochat's base-training budget (20 tokens/param) on n_gpus at the measured per-GPU speed."""
    tokens = tokens_per_param * num_params
    return {"tokens": tokens, "n_gpus": n_gpus, "hours": tokens / (tokens_per_s_per_gpu * n_gpus) / 3600}


class Telemetry:
    """NVML samples in a background thread: power (W), SM clock (MHz), temperature (C), memory (GiB), util (%)."""

    def __init__(self, interval=0.2):
        self.interval, self.samples, self.error = interval, [], None
        self._stop = threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            index = torch.cuda.current_device() if torch.cuda.is_available() else 0
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # no nvidia-ml-py, no driver, no GPU: telemetry is simply unavailable
            self._nvml, self.error = None, f"{type(e).__name__}: {e}"

    def _loop(self):
        nv, h = self._nvml, self._handle
        while not self._stop.is_set():
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
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    def summary(self):
        if not self.samples:
            return {"status": "unavailable", "reason": self.error or "no samples"}
        out = {"status": "ok", "samples": len(self.samples)}
        for k in self.samples[0]:
            vals = [s[k] for s in self.samples]
            out[k] = {"mean": sum(vals) / len(vals), "max": max(vals)}
        return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_mode(mode, args, dist_info):
    """Warm up, then time args.steps steps in `mode`; returns one result dict."""
    kernels.set_mode(mode)
    device = dist_info.device
    config = GPTConfig.from_depth(args.depth, sequence_len=args.seq_len, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    model = build_model(config, dist_info)
    optimizers = model.setup_optimizers()
    B, T = args.device_batch_size, args.seq_len
    gen = torch.Generator(device="cpu").manual_seed(dist_info.rank)
    x = torch.randint(0, args.vocab_size, (B, T), generator=gen).to(device)
    y = torch.randint(0, args.vocab_size, (B, T), generator=gen).to(device)

    def step():
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # Phase breakdown: syncs between phases make each one exact.
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = model(x, y)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        phases["forward"] += t1 - t0
        phases["backward"] += t2 - t1
        phases["optimizer"] += t3 - t2
    phases = {k: 1e3 * v / args.steps for k, v in phases.items()}

    # Whole steps, no syncs inside: the number that matters.
    with Telemetry() as telemetry:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step().detach()
        _sync(device)
        step_ms = 1e3 * (time.perf_counter() - t0) / args.steps
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None

    comm_ms, top = (0.0 if dist_info.world_size == 1 else None), None
    if args.profile or (device.type == "cuda" and dist_info.world_size > 1):
        comm_ms, top = _profile_one_step(step, mode, args, device)
    flops_tok = model.estimate_flops()
    tok_s = B * T * dist_info.world_size / (step_ms / 1e3)
    return {"mode": mode, "step_ms": step_ms, "phases_ms": phases, "comm_ms": comm_ms,
            "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / dist_info.world_size,
            "flops_per_token": flops_tok, "num_params": model.num_params(), "peak_mem_gib": peak_mem,
            "loss": loss.item(), "telemetry": telemetry.summary(), "top_kernels": top}


def _profile_one_step(step, mode, args, device):
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    cuda = device.type == "cuda"
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    comm = sum(getattr(e, attr, 0) for e in events if "nccl" in e.key.lower()) / 1e3 if cuda else None
    top = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)[:15]
    top = [{"name": e.key[:80], "ms": getattr(e, attr, 0) / 1e3, "calls": e.count} for e in top]
    if args.profile:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"trace-{mode}.json")
        prof.export_chrome_trace(path)
        print0(f"[{mode}] trace: {path}\n[{mode}] top kernels by self {'GPU' if cuda else 'CPU'} time:")
        for t in top:
            print0(f"  {t['ms']:9.3f} ms  x{t['calls']:<5} {t['name']}")
    return comm, top


def main(argv=None):
    ap = argparse.ArgumentParser(description="training throughput profiler (eager vs fused)")
    ap.add_argument("--depth", type=int, default=20, help="model depth (width 64*depth)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device-batch-size", type=int, default=None, help="default 16 on CUDA (the d20 preset), 2 on CPU")
    ap.add_argument("--vocab-size", type=int, default=65536)
    ap.add_argument("--kernels", default=None, help="comma list of modes (default eager,fused on CUDA, eager on CPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="torch.profiler trace + top kernels by time")
    ap.add_argument("--out", default=os.environ.get("OUT") or harness.RESULTS_DIR)
    args = ap.parse_args(argv)
    if args.depth < 1:
        raise SystemExit("bench.train: --depth must be >= 1")
    dist_info = init_distributed()
    cuda = dist_info.device.type == "cuda"
    args.device_batch_size = args.device_batch_size or (16 if cuda else 2)
    modes = (args.kernels or ("eager,fused" if cuda else "eager")).split(",")
    for m in modes:
        if m not in ("eager", "fused"):
            raise SystemExit(f"bench.train: unknown kernel mode {m!r} in --kernels (use eager and/or fused)")

    results = [profile_mode(m, args, dist_info) for m in modes]
    info = harness.device_info()
    peaks = harness.measure_peaks(quick=True)
    peak = device_peak_flops(info["device"], peaks["matmul_tflops"] * 1e12) if cuda else None
    rows = []
    for r in results:
        r["mfu_pct"] = mfu(r["tokens_per_s"], r["flops_per_token"], peak, dist_info.world_size)
        r["projection_8gpu"] = project_speedrun(r["num_params"], r["tokens_per_s_per_device"])
        case = {"depth": args.depth, "T": args.seq_len, "B": args.device_batch_size, "gpus": dist_info.world_size}
        flops_step = r["flops_per_token"] * args.device_batch_size * args.seq_len * dist_info.world_size
        rows.append(harness.row("train", case, r["mode"], "step", r["step_ms"], flops=flops_step,
                                **{k: v for k, v in r.items() if k not in ("mode", "step_ms")}))
    harness.add_ratios(rows, "eager")
    if dist_info.rank == 0:
        print(f"{'mode':6} {'step ms':>9} {'fwd':>8} {'bwd':>8} {'opt':>8} {'comm':>7} {'tok/s':>10} {'MFU%':>6} "
              f"{'mem GiB':>8} {'vs eager':>8} {'speedrun h':>10}")
        for r in rows:
            p, f = r["phases_ms"], lambda v, s: "n/a" if v is None else format(v, s)
            print(f"{r['provider']:6} {r['ms']:9.1f} {p['forward']:8.1f} {p['backward']:8.1f} {p['optimizer']:8.1f} "
                  f"{f(r['comm_ms'], '7.1f'):>7} {r['tokens_per_s']:10.0f} {f(r['mfu_pct'], '6.1f'):>6} "
                  f"{f(r['peak_mem_gib'], '8.1f'):>8} {f(r['ratio'], '8.2f'):>8} "
                  f"{r['projection_8gpu']['hours']:10.2f}")
        print(f"speedrun projection: {rows[0]['projection_8gpu']['tokens'] / 1e9:.2f} B tokens (20/param) on 8 GPUs at "
              "the per-GPU tokens/s above, perfect scaling, no eval time")
        print("telemetry:", rows[-1]["telemetry"].get("status"), rows[-1]["telemetry"].get("reason", ""))
        print("wrote", harness.write_results("train", rows, info, peaks, args.out, png=True))
    cleanup()
    return rows


if __name__ == "__main__":
    main()
