"""kernels.newton_schulz: the batched symmetric Triton Newton-Schulz vs newton_schulz_reference.

CPU: Triton interpreter, fp32. GPU (marked gpu): bf16 at the model's Muon shapes.
"""
import pytest
import torch

import kernels
from kernels.newton_schulz import (NS_COEFFS, gram_triton, newton_schulz, newton_schulz_reference,
                                   newton_schulz_triton)

torch.manual_seed(0)

FP32 = (torch.float32, 2e-5, 1e-4)  # (dtype, atol, rtol): fp32 both sides; entries are O(1/sqrt(n)), order differs

@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("shape", [(16, 16), (32, 96), (96, 32), (33, 65), (64, 256), (3, 40, 48)])
@pytest.mark.parametrize("dtype,atol,rtol", [FP32])
def test_matches_reference(shape, steps, dtype, atol, rtol):
    G = torch.randn(*shape, dtype=dtype)
    out = newton_schulz_triton(G, steps=steps)
    ref = newton_schulz_reference(G, steps=steps)
    assert out.shape == G.shape and out.dtype == G.dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)

def _phi(s, steps):
    a, b, c = NS_COEFFS
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s

@pytest.mark.parametrize("shape", [(80, 48)])  # transposed path; (48, 80)-like shapes are covered above
def test_singular_values_in_band(shape):
    """G = U diag(sigma) V^T with sigma / ||G||_F spread over [0.01, 0.4]: the result is U phi(s) V^T, and after
    5 steps every phi(s) lies in the band [0.68, 1.135] (module docstring: measured on the scalar map)."""
    m, n = shape
    k = min(m, n)
    g = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.cat([torch.tensor([0.01, 0.4]), torch.rand(k - 2, generator=g) * 0.39 + 0.01]).double()
    s = s / s.norm()                                        # normalised singular values, min >= 0.01-ish
    G = (3.0 * U @ torch.diag(s) @ V.T).float()
    out = newton_schulz_triton(G, steps=5)
    sv = torch.linalg.svdvals(out.double())
    expect = torch.sort(_phi(s, 5), descending=True).values
    torch.testing.assert_close(sv, expect, atol=1e-4, rtol=1e-4)
    assert sv.min() >= 0.68 and sv.max() <= 1.135, (sv.min().item(), sv.max().item())
    ref_sv = torch.linalg.svdvals(newton_schulz_reference(G, steps=5).double())
    torch.testing.assert_close(sv, ref_sv, atol=1e-4, rtol=1e-4)

def test_zero_input():
    G = torch.zeros(2, 24, 40)
    G[1] = torch.randn(24, 40)                              # a zero matrix next to a normal one in the batch
    out = newton_schulz_triton(G)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(24, 40))
    torch.testing.assert_close(out[1], newton_schulz_reference(G[1]), atol=2e-5, rtol=1e-4)

def test_noncontiguous_and_steps0():
    G = torch.randn(40, 70)[:, 3:67]                        # a strided view (40, 64)
    torch.testing.assert_close(newton_schulz_triton(G, steps=2), newton_schulz_reference(G, steps=2),
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(newton_schulz_triton(G.T, steps=0), newton_schulz_reference(G.T, steps=0))

def test_bad_inputs():
    with pytest.raises(ValueError, match="expected a"):
        newton_schulz_triton(torch.randn(8))
    with pytest.raises(TypeError, match="fp32"):
        newton_schulz_triton(torch.randn(8, 8, dtype=torch.float64))

@pytest.mark.parametrize("shape", [(24, 40), (2, 40, 24)])
def test_opcheck(shape):
    """torch.library.opcheck (schema, fake vs real outputs, AOT dispatch with dynamic shapes) of
    tritonchat::newton_schulz, plain and batched-transposed."""
    torch.library.opcheck(torch.ops.tritonchat.newton_schulz, (torch.randn(*shape), 2, 1e-7))

def test_gram_is_symmetric_product():
    X = torch.randn(2, 70, 33)
    A = gram_triton(X)
    assert torch.equal(A, A.mT)                             # exactly symmetric: upper tiles mirrored
    torch.testing.assert_close(A, X @ X.mT, atol=1e-4, rtol=1e-4)

def test_fused_mode_is_triton(fused):
    G = torch.randn(24, 40)
    assert torch.equal(newton_schulz(G), newton_schulz_triton(G))

def _muon_step(mode, params0, grads):
    from model.optim import Muon
    prev = kernels.get_mode()
    kernels.set_mode(mode)
    try:
        params = [torch.nn.Parameter(p.clone()) for p in params0]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = Muon(params, lr=0.02, momentum=0.95)
        opt.step()
        return [p.detach() for p in params]
    finally:
        kernels.set_mode(prev)

def test_muon_step_fused_matches_eager():
    """One Muon step (model/optim.py, which batches same-shaped matrices into one newton_schulz call), fused vs
    eager, fp32 on CPU: updates are lr * O(1/sqrt(n)) so params agree to ~1e-6 absolute; tolerance 1e-5."""
    pytest.importorskip("model.optim")
    g = torch.Generator().manual_seed(3)
    shapes = [(32, 64), (32, 64), (64, 32)]
    params0 = [torch.randn(*s, generator=g) * 0.05 for s in shapes]
    grads = [torch.randn(*s, generator=g) for s in shapes]
    eager = _muon_step("eager", params0, grads)
    fused = _muon_step("fused", params0, grads)
    for e, f, p0 in zip(eager, fused, params0):
        assert not torch.equal(e, p0)                       # the step did something
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)

# ---------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(768, 768), (1280, 5120), (5120, 1280), (20, 1280, 1280), (4096, 4096)])
def test_gpu_bf16_model_shapes(shape):
    """bf16 with fp32 accumulation: the fused result's distance to an fp32 evaluation must be no worse than the
    bf16 reference's (plus slack), and the singular values stay in the bf16 reference's band."""
    G = torch.randn(*shape, device="cuda")
    exact = newton_schulz_reference(G.double()).float()
    out = newton_schulz_triton(G.bfloat16())
    ref = newton_schulz_reference(G.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == G.shape
    err_fused = (out.float() - exact).norm() / exact.norm()
    err_ref = (ref.float() - exact).norm() / exact.norm()
    assert err_fused <= 1.25 * err_ref + 1e-3, (err_fused.item(), err_ref.item())
    sv = torch.linalg.svdvals(out.float())
    sv_ref = torch.linalg.svdvals(ref.float())
    assert sv.max() <= sv_ref.max() + 0.05 and sv.min() >= sv_ref.min() - 0.05
