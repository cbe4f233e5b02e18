"""Runtime helpers every part shares (as https://github.com/karpathy/nanochat/blob/master/nanochat/common.py): where
artifacts live, this process's place in the process group, rank-0 printing, collectives on a few numbers, the GPU
peak table, downloads with retries, and the versions and hardware a number was made with."""
import argparse
import datetime
import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import dataclass

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 peak FLOP/s per GPU (no sparsity), for MFU. Longest matching name wins ("H100 PCIe" before "H100").
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "GH200": 989e12,
                   "B200": 2250e12, "B100": 1750e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                   "RTX 4090": 165e12, "RTX 3090": 71e12}

class UserError(RuntimeError):
    """Bad input the user can fix (unknown preset, missing checkpoint, no disk space, ...): entry points print its
    message alone, without a traceback, and exit with status 2."""

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: ...`, exit code 2), whose help shows each default once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": _DefaultsOnce, **kwargs})

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

class _DefaultsOnce(argparse.HelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        described = action.default in (None, False, argparse.SUPPRESS) or "default" in text
        return text if described else text + " (default: %(default)s)"

def _bounded(cast, what, lo, hi, bounds):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not lo <= value <= hi:  # nan fails it too
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value if cast is int else text}")
        return value
    return parse

def int_at_least(lo, hi=math.inf):
    """argparse type: an int in [lo, hi]."""
    return _bounded(int, "an integer", lo, hi, f">= {lo}" if hi == math.inf else f"between {lo} and {hi}")

def float_between(lo, hi):
    """argparse type: a finite float in [lo, hi] (nan / inf refused)."""
    return _bounded(float, "a number", lo, hi, f"a finite number between {lo:g} and {hi:g}")

def writable_dir(text):
    """argparse type: a folder results can be written to, created if missing (checked before any work is done)."""
    try:
        os.makedirs(text, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {e.strerror}") from None
    if not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    return text

def run_main(main):
    """Call main(); a UserError prints one 'error: ...' line (rank 0) and exits 2, no traceback."""
    try:
        return main()
    except UserError as e:
        if dist_info().rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)

class DownloadError(UserError):
    """A download that failed for good. `status`: the HTTP status of a refused request (404, 403, ...), else None."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status

def home_dir():
    """$TRITONCHAT_HOME (default ~/.cache/tritonchat): tokenizer/, data/, checkpoints/<stage>/<run>/, reports/."""
    path = os.environ.get("TRITONCHAT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tritonchat")
    os.makedirs(path, exist_ok=True)
    return path

@dataclass
class DistInfo:
    is_dist: bool          # launched by torchrun (RANK/WORLD_SIZE set)
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

def dist_info():
    """This process's place -> DistInfo: rank and world size of the default group (0 and 1 while there is none),
    LOCAL_RANK, and device (cuda:LOCAL_RANK under NCCL or, without a group, when a GPU is visible; else cpu)."""
    group = _group()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and (not group or "nccl" in dist.get_backend())
    return DistInfo(is_dist="RANK" in os.environ and "WORLD_SIZE" in os.environ,
                    rank=dist.get_rank() if group else 0, local_rank=local_rank,
                    world_size=dist.get_world_size() if group else 1,
                    device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"))

def rank_share(n):
    """This rank's share of n items, as evaluation splits them: [i for i in range(n) if i % world_size == rank]."""
    info = dist_info()
    return list(range(info.rank, n, info.world_size))

def _group():
    return dist.is_available() and dist.is_initialized()

def is_rank0():
    return not _group() or dist.get_rank() == 0

def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)

def barrier():
    """Wait for every rank (nothing to wait for in a single process)."""
    if _group() and dist.get_world_size() > 1:
        dist.barrier()

def all_reduce_sum(values):
    """A few numbers summed over all ranks (collective) -> list of floats (float64)."""
    t = torch.tensor(values, dtype=torch.float64)
    if _group() and dist.get_world_size() > 1:
        if "nccl" in dist.get_backend():  # NCCL reduces CUDA tensors only
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(t)
    return t.tolist()

def local(t):
    """The local shard of an FSDP2 DTensor (a plain tensor is returned as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t

def full(t):
    """The whole tensor of an FSDP2 DTensor (a collective: every rank must call it); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t

def peak_flops(device):
    """Dense bf16 peak FLOP/s of one GPU (a torch device or a name like "NVIDIA H100 80GB HBM3"); None for the CPU
    or a GPU missing from PEAK_BF16_FLOPS."""
    if not isinstance(device, str) or device.startswith(("cuda", "cpu")):
        if torch.device(device).type != "cuda":
            return None
        device = torch.cuda.get_device_name(device)
    return next((PEAK_BF16_FLOPS[k] for k in sorted(PEAK_BF16_FLOPS, key=len, reverse=True) if k in device), None)

def versions():
    """What a measurement was made with -> dict: date (UTC, ISO 8601), git_commit (short, "-dirty" with uncommitted
    changes; None outside git), python, torch, triton, cuda, host, cpu (model name), cpu_cores, gpus, kind ("cuda" |
    "cpu"), device (GPU 0's name, or "cpu (<model>, <cores> cores)"), driver (None on the CPU; "unavailable" without
    nvidia-ml-py); on CUDA also sm_count, memory_gb and capability."""
    triton_version = commit = None
    with suppress(importlib.metadata.PackageNotFoundError):  # importing triton would fix TRITON_INTERPRET too early
        triton_version = importlib.metadata.version("triton")
    with suppress(OSError, subprocess.SubprocessError):  # --exclude='*': never a tag name, always the commit
        commit = subprocess.check_output(["git", "describe", "--always", "--dirty", "--exclude=*"], text=True,
                                         timeout=10, cwd=ROOT, stderr=subprocess.DEVNULL).strip()
    cpu = platform.processor() or platform.machine()
    with suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "host": platform.node(), "cpu": cpu,
            "cpu_cores": os.cpu_count(), "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(kind="cuda", device=p.name, sm_count=p.multi_processor_count,
                    memory_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
        try:
            import pynvml  # optional (nvidia-ml-py)
            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001 - nvidia-ml-py missing or NVML unusable: say so, don't fail the run
            info["driver"] = "unavailable"
    else:
        info.update(kind="cpu", device=f"cpu ({cpu}, {os.cpu_count()} cores)", driver=None)
    return info

def download(url, path, retries=5, backoff=1.0, timeout=60, resume=False, progress=False):
    """Fetch url into path via a temp file renamed when complete -> path. Connection errors, timeouts, short reads and
    HTTP 429/5xx are retried `retries` times, after backoff·2^attempt s. resume=True keeps the temp file (path + ".tmp")
    across attempts and runs and continues it with an HTTP Range request (only for files one process downloads); else
    the temp file is this process's own. progress=True prints (rank 0) size and seconds per file.
    Raises DownloadError: at once for HTTP 4xx other than 429 (.status = the code), else after the last retry."""
    tmp = path + ".tmp" if resume else f"{path}.tmp{os.getpid()}"
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        try:
            have = os.path.getsize(tmp) if resume and os.path.exists(tmp) else 0
            req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                mode = "ab" if have and resp.status == 206 else "wb"  # 200 = server ignored Range: start over
                with open(tmp, mode) as f:
                    shutil.copyfileobj(resp, f, 1 << 20)
            os.replace(tmp, path)
            if progress:
                print0(f"downloaded {url} ({os.path.getsize(path) / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
            return path
        except (urllib.error.URLError, OSError, TimeoutError) as e:  # HTTP error, connection reset, timeout, short read
            err = e
        code = err.code if isinstance(err, urllib.error.HTTPError) else 0
        # 416 with a partial file: it is already complete (or bogus): start over
        fatal = 400 <= code < 500 and code != 429 and not (code == 416 and os.path.exists(tmp))
        if os.path.exists(tmp) and (not resume or code == 416):
            os.remove(tmp)
        if fatal:
            raise DownloadError(f"downloading {url} failed: HTTP {code} {err.reason}", status=code)
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise DownloadError(f"downloading {url} failed after {retries + 1} attempts: {err}")
