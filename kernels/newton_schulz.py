"""Muon's Newton-Schulz orthogonalisation (quintic iteration), batched, with symmetric Triton GEMMs.

newton_schulz(G, steps=5, eps=1e-7): G (m, n) or (batch, m, n) -> same shape and dtype, contiguous. Triton path
(tritonchat::newton_schulz, not differentiable: Muon needs no graph): fp32/fp16/bf16 (else TypeError), ValueError for
other ranks or steps < 0. The reference is differentiable.
X = G / (||G||_F + eps), transposed when m > n so the Gram matrix is the small one; then `steps` times
    A = X X^T;  B = b A + c A A;  X = a X + B X       with (a, b, c) = NS_COEFFS = (3.4445, -4.7750, 2.0315).
Each step maps the singular values s of X by p(s) = a s + b s^3 + c s^5 (U, V untouched): the result is U phi(S) V^T,
phi = p applied `steps` times to s = sigma / ||G||_F. After 5 steps every s >= 0.01 lands in [0.682, 1.134] and every
s >= 0.0015 in [0.68, 1.203] (max of p on [0, 1]); smaller ones grow ~3.44x per step (p'(0) = a). Tests check phi.

Per step, one launch each for the whole batch: `_syrk_kernel` A = X X^T, again for B = c A A^T + b A (A symmetric),
`_ns_update_kernel` X' = a X + B X; fp32 accumulation: 3 m^2 n + m^3 FLOPs per step instead of 4 m^2 n + 2 m^3.

References:
  * Muon and its Newton-Schulz coefficients (Keller Jordan, 2024): https://kellerjordan.github.io/posts/muon/
  * Triton tutorial 03: https://triton-lang.org/main/getting-started/tutorials/03-matrix-multiplication.html
"""
import torch
import triton
import triton.language as tl

import kernels
from kernels._common import FLOATS, configs, dot_precision, grouped_tile, kernel_op, matmul_tile

NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Hopper bf16, square tiles for the symmetric product; interpreter: 64-wide (32 makes a tiny Muon step 4x slower)
_SYRK_CONFIGS = configs(("BLOCK", "BLOCK_K"), [(128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4),
                                               (64, 128, 4, 3)],  # the last: few tiles, long K (1280 x 5120)
                       (64, 64, 4, 1))
_UPDATE_CONFIGS = configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
    (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 3)], (64, 64, 64, 4, 4, 1))

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
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)  # guard the float sqrt against rounding
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    i = pid - j * (j + 1) // 2
    offs_i = i * BLOCK + tl.arange(0, BLOCK)
    offs_j = j * BLOCK + tl.arange(0, BLOCK)
    x_ptr += bid * stride_xb
    # rows i of X times X^T (strides (stride_xk, stride_xm)) at columns j
    acc = matmul_tile(x_ptr, x_ptr, offs_i, offs_j, M, M, K, stride_xm, stride_xk, stride_xk, stride_xm,
                      BLOCK, BLOCK, BLOCK_K, PRECISION)
    inside = (offs_i[:, None] < M) & (offs_j[None, :] < M)
    acc = acc * alpha
    if HAS_C:
        c = tl.load(c_ptr + bid * stride_cb + offs_i[:, None] * stride_cm + offs_j[None, :] * stride_cn,
                    mask=inside, other=0.0)
        acc += beta * c.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    out_ptr += bid * stride_ob
    # off-diagonal tiles: all, twice; diagonal tiles: the upper triangle and its mirror
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
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    bid = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_ptr += bid * stride_bb
    x_ptr += bid * stride_xb
    acc = matmul_tile(b_ptr, x_ptr, offs_m, offs_n, M, N, M, stride_bm, stride_bk, stride_xm, stride_xn,
                      BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
    acc += a_coef * x.to(tl.float32)
    tl.store(out_ptr + bid * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)

def gram_triton(x, out=None, alpha=1.0, c=None, beta=0.0):
    """alpha x x^T (+ beta c, c symmetric) for x (batch, m, k) -> (batch, m, m) in x's dtype, into `out` if given, by
    the symmetric kernel (upper tiles computed, mirrored)."""
    batch, M, K = x.shape
    if out is None:
        out = torch.empty(batch, M, M, device=x.device, dtype=x.dtype)
    tiles = lambda meta: triton.cdiv(M, meta["BLOCK"])
    grid = lambda meta: (tiles(meta) * (tiles(meta) + 1) // 2, batch)  # the upper tiles only
    cc = out if c is None else c
    _syrk_kernel[grid](x, cc, out, M, K, alpha, beta, *x.stride(), *cc.stride(), *out.stride(),
                       HAS_C=c is not None, PRECISION=dot_precision(x.dtype))
    return out

@kernel_op("tritonchat::newton_schulz")
@torch.no_grad()
def _newton_schulz_op(G: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """The batched symmetric iteration on G (m, n) or (batch, m, n) -> a new contiguous tensor of G's shape."""
    G3 = G.unsqueeze(0) if G.ndim == 2 else G
    transposed = G3.shape[1] > G3.shape[2]
    X0 = G3.mT if transposed else G3  # a view, m <= n
    batch, m, n = X0.shape
    result = torch.empty_like(G3, memory_format=torch.contiguous_format)
    final = result.mT if transposed else result  # the (batch, m, n) view the last step writes into
    X = final if steps == 0 else torch.empty(batch, m, n, device=G.device, dtype=G.dtype)  # a contiguous work buffer
    torch.div(X0, X0.norm(dim=(-2, -1), keepdim=True) + eps, out=X)
    if steps > 0 and G3.numel() > 0:
        a, b, c = NS_COEFFS
        A = torch.empty(batch, m, m, device=G.device, dtype=G.dtype)
        B, X_next = torch.empty_like(A), torch.empty_like(X)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), batch)
        for step in range(steps):
            gram_triton(X, A)  # A = X X^T
            gram_triton(A, B, alpha=c, c=A, beta=b)  # B = c A A^T + b A  (A symmetric)
            out = final if step == steps - 1 else X_next  # X' = a X + B X:
            _ns_update_kernel[grid](B, X, out, m, n, a, *B.stride(), *X.stride(), *out.stride(),
                                    PRECISION=dot_precision(X.dtype))
            X, X_next = out, X
    return result.view(G.shape)

_newton_schulz_op.register_fake(lambda G, steps, eps: torch.empty_like(G, memory_format=torch.contiguous_format))

def newton_schulz(G, steps=5, eps=1e-7):
    """Orthogonalise G (m, n) or (batch, m, n) by `steps` quintic Newton-Schulz iterations, Triton or reference."""
    fn = newton_schulz_triton if kernels.use_fused() else newton_schulz_reference
    return fn(G, steps=steps, eps=eps)

def newton_schulz_triton(G, steps=5, eps=1e-7):
    """tritonchat::newton_schulz (the symmetric Triton kernels) whatever the mode; not differentiable."""
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz: expected a (m, n) or (batch, m, n) tensor, got shape {tuple(G.shape)}")
    if G.dtype not in FLOATS:
        raise TypeError(f"newton_schulz: G must be fp32, fp16 or bf16, got {G.dtype}")
    if steps < 0:
        raise ValueError(f"newton_schulz: steps must be >= 0, got {steps}")
    return torch.ops.tritonchat.newton_schulz(G, int(steps), float(eps))

def newton_schulz_reference(G, steps=5, eps=1e-7):
    """Eager PyTorch in G's dtype (addmm/baddbmm fuse the scalars into the products); differentiable."""
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz: expected a (m, n) or (batch, m, n) tensor, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    transposed = G.size(-2) > G.size(-1)
    X = G.mT if transposed else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    mm = torch.baddbmm if X.ndim == 3 else torch.addmm
    for _ in range(steps):
        A = X @ X.mT
        B = mm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = mm(X, B, X, beta=a)  # a*X + B@X
    return (X.mT if transposed else X).contiguous()
