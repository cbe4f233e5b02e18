"""Muon's Newton-Schulz orthogonalisation (quintic iteration).

Contract (DESIGN.md): newton_schulz(G, steps=5, eps=1e-7): G (m, n) or (batch, m, n) -> same shape and dtype.
X = G / (||G||_F + eps), transposed when m > n so the Gram matrix is the small one; then `steps` times
    A = X X^T;  B = b A + c A A;  X = a X + B X       with (a, b, c) = (3.4445, -4.7750, 2.0315).
The Triton kernel lands with its own issue; until then fused mode raises NotImplementedError.
"""
import torch

import kernels

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps=5, eps=1e-7):
    if kernels.use_fused():
        raise NotImplementedError("kernels.newton_schulz: the fused Triton Newton-Schulz kernel is not implemented "
                                  "yet; use --kernels eager")
    return reference_newton_schulz(G, steps=steps, eps=eps)


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
