"""What the kernel families share: interpreter detection, log2(e), dot precision, autotune lists, the GEMM tile
order and K loop, input checks and the torch.library registration of a launcher."""
import os

import torch
import triton
import triton.language as tl

# TRITON_INTERPRET=1 (CPU): kernels run in the Triton interpreter, fp32/fp16 only. Read once, as Triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# exp(x) = exp2(x * LOG2E): softmax statistics are kept in base 2. A constexpr: @triton.jit code reads no other globals.
LOG2E = tl.constexpr(1.4426950408889634)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)

def dot_precision(dtype):
    """tl.dot's input_precision: "ieee" for fp32 (exact, no TF32, as eager); bf16/fp16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"

def configs(names, hopper, interpret):
    """Autotune configs from rows (values of `names`, num_warps, num_stages): `hopper`, or one `interpret` row."""
    return [triton.Config(dict(zip(names, r)), num_warps=r[-2], num_stages=r[-1])
            for r in ([interpret] if INTERPRET else hopper)]

def check_floats(name, names, *tensors):
    """TypeError unless `tensors` (called `names`) share one dtype of FLOATS, ValueError unless one device."""
    if len({t.dtype for t in tensors}) > 1 or tensors[0].dtype not in FLOATS:
        raise TypeError(f"{name}: {names} must share one dtype among fp32/fp16/bf16; got "
                        f"{', '.join(str(t.dtype) for t in tensors)}")
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"{name}: {names} on different devices: {', '.join(str(t.device) for t in tensors)}")

@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), GROUP_M row tiles sharing each column panel in L2 (Triton tutorial 03)."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = min(tl.cdiv(M, BLOCK_M) - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m
    return pid_m, pid_n

@triton.jit
def matmul_tile(a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The fp32 (BLOCK_M, BLOCK_N) tile of A (M, K) @ B (K, N) at rows offs_m, columns offs_n, any strides. Rows and
    columns past M, N wrap instead of being masked in the K loop: the caller masks its store."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc

def kernel_op(qualname, mutates_args=()):
    """Register a Triton launcher as the operator `qualname` (typed signature); then .register_fake / _autograd."""
    # custom_op, not triton_op: under TRITON_INTERPRET=1 tracing a triton_op with FakeTensors launches its kernels on
    # data-less tensors. An opaque op traces alike on CPU and GPU (fullgraph); inductor calls it, never inlines it.
    return torch.library.custom_op(qualname, mutates_args=mutates_args)
