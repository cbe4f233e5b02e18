"""Muon's Newton-Schulz orthogonalisation (quintic iteration), batched, with symmetric Triton GEMMs.

Contract (DESIGN.md): newton_schulz(G, steps=5, eps=1e-7): G (m, n) or (batch, m, n) -> same shape and dtype.
X = G / (||G||_F + eps), transposed when m > n so the Gram matrix is the small one; then `steps` times
    A = X X^T;  B = b A + c A A;  X = a X + B X       with (a, b, c) = (3.4445, -4.7750, 2.0315).
On the singular values s of X each step applies p(s) = a s + b s^3 + c s^5 (U and V are untouched), so the result is
U phi(S) V^T with phi = p applied `steps` times to s = sigma / ||G||_F. Measured on that scalar map: after 5 steps,
every s >= 0.01 lands in [0.682, 1.134] and every s >= 0.0015 in [0.68, 1.203] (the maximum of p on [0, 1]);
smaller ones stay small (p'(0) = a, so s grows ~3.44x per step); after 1 step the band is [p(s_min), 1.203].
Tests check the fused result's singular values against phi directly. Like Muon needs, the fused path is not
differentiable (it runs under no_grad); the reference is.

What the kernels do (per step, m <= n, all three in one launch each for the whole batch: grid axis 1 = batch):
  1. `_syrk_kernel`  A = X X^T. A is symmetric, so only the tiles (i, j) with i <= j are computed (T(T+1)/2 of T^2
     programs) and each is stored twice, at (i, j) and mirrored at (j, i): m^2 n FLOPs instead of 2 m^2 n.
     Diagonal tiles store their upper triangle and its mirror, so A is exactly symmetric.
  2. `_syrk_kernel`  B = c A A + b A. Because A is exactly symmetric, A A = A A^T: the same kernel with the scalars
     fused into its epilogue (alpha = c, plus beta = b times the A tile): m^3 FLOPs instead of 2 m^3, and no separate
     A*A buffer or axpby pass.
  3. `_ns_update_kernel`  X' = a X + B X: a plain GEMM whose epilogue adds a times the X tile (2 m^2 n FLOPs). The
     last step writes straight into the transposed output when G was transposed (no extra copy).
All products accumulate in fp32; A, B and X are stored in the input dtype (bf16 on GPU, as the reference's bf16
matmuls do). Per step that is 3 m^2 n + m^3 FLOPs instead of 4 m^2 n + 2 m^3: 1.38x fewer for m = n/4, 1.5x for
square matrices. Launches stay at three per step, as the reference's (its addmm/baddbmm fuse the scalars too): the
win is the halved symmetric products, so it only shows where the Triton GEMMs run near cuBLAS speed.
The Frobenius normalisation is one torch reduction and one elementwise pass written straight into the contiguous
working buffer.
"""
import os

import torch
import triton
import triton.language as tl

import kernels

NS_COEFFS = (3.4445, -4.7750, 2.0315)

if os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreter costs ~ms per program x loop step almost regardless of tile size: one fixed config of 64 tiles
    # (32 still covers the tile-edge masking at the test shapes, but makes a tiny model's Muon step 4x slower)
    _SYRK_CONFIGS = [triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    _UPDATE_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4},
                                     num_warps=4, num_stages=1)]
else:
    # Hopper (H100/H200), bf16 with fp32 accumulation; square tiles for the symmetric product
    _SYRK_CONFIGS = [
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),  # few tiles, long K (1280 x 5120)
    ]
    _UPDATE_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ]


@triton.autotune(configs=_SYRK_CONFIGS, key=["M", "K", "HAS_C"])
@triton.jit
def _syrk_kernel(x_ptr, c_ptr, out_ptr, M, K, alpha, beta,
                 stride_xb, stride_xm, stride_xk, stride_cb, stride_cm, stride_cn, stride_ob, stride_om, stride_on,
                 HAS_C: tl.constexpr, PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b] = alpha X[b] X[b]^T (+ beta C[b], C symmetric), X (M, K): upper tiles computed, mirrored below."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    # pid enumerates the upper tiles column by column: pid = j (j + 1) / 2 + i with 0 <= i <= j
    j = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)          # guard the float sqrt against rounding
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    i = pid - j * (j + 1) // 2

    offs_i = i * BLOCK + tl.arange(0, BLOCK)
    offs_j = j * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptr += bid * stride_xb
    # rows i of X (BLOCK, BLOCK_K) and rows j of X read transposed (BLOCK_K, BLOCK); wrapped rows, masked k
    a_ptrs = x_ptr + (offs_i % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    b_ptrs = x_ptr + offs_k[:, None] * stride_xk + (offs_j % M)[None, :] * stride_xm
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_xk

    inside = (offs_i[:, None] < M) & (offs_j[None, :] < M)
    acc = acc * alpha
    if HAS_C:
        c = tl.load(c_ptr + bid * stride_cb + offs_i[:, None] * stride_cm + offs_j[None, :] * stride_cn,
                    mask=inside, other=0.0)
        acc += beta * c.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    out_ptr += bid * stride_ob
    # off-diagonal tiles: everything, twice; diagonal tiles: the upper triangle, and its mirror
    tl.store(out_ptr + offs_i[:, None] * stride_om + offs_j[None, :] * stride_on, out,
             mask=inside & (offs_i[:, None] <= offs_j[None, :]))
    tl.store(out_ptr + offs_j[None, :] * stride_om + offs_i[:, None] * stride_on, out,
             mask=inside & (offs_i[:, None] < offs_j[None, :]))


@triton.autotune(configs=_UPDATE_CONFIGS, key=["M", "N"])
@triton.jit
def _ns_update_kernel(b_ptr, x_ptr, out_ptr, M, N, a_coef,
                      stride_bb, stride_bm, stride_bk, stride_xb, stride_xm, stride_xn, stride_ob, stride_om, stride_on,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """out[b] = a X[b] + B[b] X[b]; B (M, M), X (M, N), out (M, N) with any strides (e.g. a transposed view)."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n   # grouped tile order: GROUP_M row-tiles share X's column panel in L2
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    b_ptr += bid * stride_bb
    x_ptr += bid * stride_xb
    b_ptrs = b_ptr + (offs_m % M)[:, None] * stride_bm + offs_k[None, :] * stride_bk
    x_ptrs = x_ptr + offs_k[:, None] * stride_xm + (offs_n % N)[None, :] * stride_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(M, BLOCK_K)):
        k_left = M - k * BLOCK_K
        bt = tl.load(b_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        xt = tl.load(x_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(bt, xt, acc, input_precision=PRECISION)
        b_ptrs += BLOCK_K * stride_bk
        x_ptrs += BLOCK_K * stride_xm

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
    acc += a_coef * x.to(tl.float32)
    tl.store(out_ptr + bid * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: no TF32 (as eager); bf16/fp16: tensor cores


def _syrk(x, out, alpha=1.0, c=None, beta=0.0):
    """out = alpha x x^T (+ beta c) for x (batch, M, K), c and out (batch, M, M); c must be symmetric."""
    batch, M, K = x.shape
    tiles = lambda meta: triton.cdiv(M, meta["BLOCK"])
    grid = lambda meta: (tiles(meta) * (tiles(meta) + 1) // 2, batch)  # the upper tiles only
    cc = out if c is None else c
    _syrk_kernel[grid](x, cc, out, M, K, alpha, beta, *x.stride(), *cc.stride(), *out.stride(),
                       HAS_C=c is not None, PRECISION=_precision(x.dtype))
    return out


def _update(b, x, out, a_coef):
    """out = a_coef x + b x for b (batch, M, M), x (batch, M, N); out may be any strided (batch, M, N) view."""
    batch, M, N = x.shape
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), batch)
    _ns_update_kernel[grid](b, x, out, M, N, a_coef, *b.stride(), *x.stride(), *out.stride(),
                            PRECISION=_precision(x.dtype))
    return out


@torch.no_grad()
def _newton_schulz_triton(G, steps, eps):
    squeeze = G.ndim == 2
    G3 = G.unsqueeze(0) if squeeze else G
    batch, rows, cols = G3.shape
    transposed = rows > cols
    X0 = G3.mT if transposed else G3                       # (batch, m, n), m <= n (a view)
    m, n = X0.shape[-2:]
    result = torch.empty_like(G3, memory_format=torch.contiguous_format)
    if G3.numel() == 0:
        return result.squeeze(0) if squeeze else result
    X = torch.empty(batch, m, n, device=G.device, dtype=G.dtype)
    torch.div(X0, X0.norm(dim=(-2, -1), keepdim=True) + eps, out=X)  # one pass into the contiguous work buffer
    if steps == 0:
        result.copy_(X.mT if transposed else X)
        return result.squeeze(0) if squeeze else result
    a, b, c = NS_COEFFS
    A = torch.empty(batch, m, m, device=G.device, dtype=G.dtype)
    B = torch.empty_like(A)
    X_next = torch.empty_like(X)
    final = result.mT if transposed else result            # the (batch, m, n) view the last step writes into
    for step in range(steps):
        _syrk(X, A)                                        # A = X X^T
        _syrk(A, B, alpha=c, c=A, beta=b)                  # B = c A A^T + b A  (A symmetric)
        out = final if step == steps - 1 else X_next
        _update(B, X, out, a)                              # X' = a X + B X
        X, X_next = out, X
    return result.squeeze(0) if squeeze else result


def newton_schulz(G, steps=5, eps=1e-7):
    """Orthogonalise G (m, n) or (batch, m, n) with `steps` quintic Newton-Schulz iterations; same shape and dtype.
    Fused mode: the batched symmetric Triton kernels above; eager: reference_newton_schulz."""
    if not kernels.use_fused():
        return reference_newton_schulz(G, steps=steps, eps=eps)
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz: expected a (m, n) or (batch, m, n) tensor, got shape {tuple(G.shape)}")
    if G.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"newton_schulz: G must be fp32, fp16 or bf16, got {G.dtype}")
    if steps < 0:
        raise ValueError(f"newton_schulz: steps must be >= 0, got {steps}")
    return _newton_schulz_triton(G, steps, eps)


def reference_newton_schulz(G, steps=5, eps=1e-7):
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz: expected a (m, n) or (batch, m, n) tensor, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    mm = torch.baddbmm if X.ndim == 3 else torch.addmm
    for _ in range(steps):
        A = X @ X.mT
        B = mm(A, A, A, beta=b, alpha=c)   # b*A + c*A@A
        X = mm(X, B, X, beta=a)            # a*X + B@X
    if transposed:
        X = X.mT
    return X.contiguous()
