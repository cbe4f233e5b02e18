"""model/optim.py: Newton-Schulz output near-orthogonal, Muon vs a straightforward implementation, momentum warmup,
AdamW settings. The sharded (multi-rank) Muon is tested in tests/test_distributed.py."""
import pytest
import torch

from kernels.newton_schulz import newton_schulz_reference
from model.optim import Muon, make_adamw, muon_momentum
from stand_ins import straightforward_muon

torch.manual_seed(0)

pytestmark = pytest.mark.usefixtures("eager_single_thread")

@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 48), (37, 13), (3, 50, 20)])
def test_newton_schulz_singular_values_near_one(shape):
    # G = U diag(s) V^T with known singular vectors and a 10x spread of singular values
    *batch, m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k))[0]
    s = torch.linspace(1.0, 0.1, k).expand(*batch, k)
    G = U @ torch.diag_embed(s) @ V.mT
    X = newton_schulz_reference(G)
    assert X.shape == G.shape and X.dtype == G.dtype
    sv = torch.linalg.svdvals(X)
    # the quintic iteration trades exactness for speed: singular values land in roughly [0.7, 1.2], not at 1
    assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())
    # and it keeps G's singular vectors (X = U p(S) V^T): U^T X V is diagonal
    M = U.mT @ X @ V
    diag = torch.diagonal(M, dim1=-2, dim2=-1)
    assert (diag > 0.6).all() and (diag < 1.25).all()
    assert (M - torch.diag_embed(diag)).abs().max() < 1e-4

@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_straightforward(nesterov):
    shapes = [(32, 16), (32, 16), (16, 48), (7, 5), (32, 16)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    moms = [muon_momentum(step) for step in range(4)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = Muon(params, lr=0.05, momentum=0.95, nesterov=nesterov)
    assert [len(g["params"]) for g in opt.param_groups] == [3, 1, 1]  # grouped by shape, first-seen order
    for step_grads, mom in zip(grads, moms):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["momentum"] = mom
        opt.step()
    want = straightforward_muon(init, grads, 0.05, moms, nesterov)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, atol=1e-5, rtol=1e-5)
    assert opt.ns_matrices == 4 * len(shapes)  # one process orthogonalises every matrix
    for p, g in zip(params, grads[-1]):
        assert torch.equal(p.grad, g)  # the gradient is left untouched

def test_muon_skips_params_without_grad_and_rejects_vectors():
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3, 5))
    opt = Muon([a, b])
    a.grad = torch.randn(4, 4)
    before = b.detach().clone()
    opt.step()
    assert torch.equal(b.detach(), before)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.randn(8))])

def test_muon_momentum_warmup():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)

def test_make_adamw():
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = make_adamw([dict(params=[w], lr=0.1)], weight_decay=0.0)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-10 and not opt.defaults["fused"]

@pytest.mark.gpu
def test_muon_bf16_cuda_close_to_fp32():
    shapes = [(256, 256), (256, 256), (1024, 256), (256, 1024)]
    init = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    params = [torch.nn.Parameter(t.clone().cuda()) for t in init]
    opt = Muon(params, lr=0.02)
    for p, g in zip(params, grads):
        p.grad = g.cuda()
    opt.step()  # Newton-Schulz in bf16 on CUDA
    want = straightforward_muon(init, [grads], 0.02, [0.95])
    for p, w in zip(params, want):
        # bf16 Newton-Schulz: ~1e-2 relative error in the update, times lr
        torch.testing.assert_close(p.detach().cpu(), w, atol=0.02 * 0.05 * 2, rtol=0)
