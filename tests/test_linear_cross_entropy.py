"""kernels.linear_cross_entropy: the chunked cuBLAS + Triton loss vs linear_cross_entropy_reference, loss and both
gradients with the same upstream gradient; torch.library checks; what is saved for backward; torch.compile.

CPU: Triton interpreter, fp32 (+ one fp16 case). GPU (marked gpu): bf16 at the model's shapes.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.linear_cross_entropy import (linear_cross_entropy, linear_cross_entropy_reference,
                                          linear_cross_entropy_triton)

torch.manual_seed(0)

# (dtype, atol, rtol): fp32 GEMMs on both sides; the kernel's exp-based tanh is ~1e-7 off torch.tanh, times the cap
FP32 = (torch.float32, 2e-5, 1e-4)

def _inputs(N, C, V, dtype=torch.float32, ignored=(), device="cpu", w_scale=6.0):
    g = torch.Generator().manual_seed(1000 + N + C + V)
    h = torch.randn(N, C, generator=g)
    w = torch.randn(V, C, generator=g) * (w_scale / C ** 0.5)  # logits ~ N(0, w_scale^2): the cap matters
    targets = torch.randint(0, V, (N,), generator=g)
    targets[list(ignored)] = -1
    return h.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), targets.to(device)

def _run(fn, h, w, targets, upstream=None, **kw):
    """(loss, dh, dw) of fn; upstream: the gradient of the loss (a scalar or (N,)), the same for every fn."""
    h, w = (t.detach().clone().requires_grad_(True) for t in (h, w))
    loss = fn(h, w, targets, **kw)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype))
    return loss.detach(), h.grad, w.grad

def _compare(got, ref, atol, rtol):
    for name, g, r in zip(("loss", "dh", "dw"), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, (name, g.shape, r.shape, g.dtype, r.dtype)
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")

# N not a multiple of the chunk, V not a multiple of the 128-wide interpreter tile, C not a power of two
@pytest.mark.parametrize("N,C,V,chunk", [(37, 48, 200, 16), (20, 80, 130, 7), (1, 48, 129, None)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(N, C, V, chunk, reduction):
    h, w, targets = _inputs(N, C, V, ignored=range(0, N, 5)[1:])  # some ignored (never row 0: N = 1 keeps it)
    g = torch.Generator().manual_seed(7)
    upstream = torch.randn(N, generator=g) if reduction == "none" else torch.tensor(0.7)
    kw = dict(reduction=reduction, chunk_size=chunk)
    ref = _run(linear_cross_entropy_reference, h, w, targets, upstream, **kw)
    got = _run(linear_cross_entropy_triton, h, w, targets, upstream, **kw)
    _compare(got, ref, *FP32[1:])

def test_sum_without_softcap_and_ignore_index():
    # softcap=None takes the online-max branch of the kernel; ignore_index other than -1; logits up to ~+-40
    h, w, targets = _inputs(19, 32, 200, w_scale=12.0)
    targets[3] = targets[11] = -100
    kw = dict(softcap=None, ignore_index=-100, reduction="sum", chunk_size=8)
    _compare(_run(linear_cross_entropy_triton, h, w, targets, **kw),
             _run(linear_cross_entropy_reference, h, w, targets, **kw), 1e-4, 1e-4)

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored(reduction):
    """"mean" of no targets is 0 with zero gradients (F.cross_entropy alone gives nan); the reference agrees."""
    h, w, targets = _inputs(6, 16, 50, ignored=range(6))
    for fn in (linear_cross_entropy_reference, linear_cross_entropy_triton):
        loss, dh, dw = _run(fn, h, w, targets, reduction=reduction, chunk_size=4)
        assert torch.equal(loss, torch.zeros_like(loss)), fn.__name__
        assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw)), fn.__name__
    assert torch.isnan(F.cross_entropy(h @ w.t(), targets, ignore_index=-1))  # what the guard is for

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch(reduction):
    """No rows at all: loss 0 and zero gradients, as the reference (no chunk runs, so dw must still be made)."""
    h, w, targets = _inputs(0, 16, 50)
    _compare(_run(linear_cross_entropy_triton, h, w, targets, reduction=reduction),
             _run(linear_cross_entropy_reference, h, w, targets, reduction=reduction), 0, 0)

def test_fp16():
    # z and dz are rounded to fp16 on both sides at the same points; the fp32 sums differ in order only
    h, w, targets = _inputs(21, 48, 150, dtype=torch.float16, ignored=(4,))
    _compare(_run(linear_cross_entropy_triton, h, w, targets, chunk_size=8),
             _run(linear_cross_entropy_reference, h, w, targets, chunk_size=8), 2e-3, 1e-2)

def test_single_gradients_no_grad_and_non_leaf_weight():
    """w as FSDP2 hands it over: a non-leaf full tensor (here a cast of the parameter) whose .grad is never read;
    only one input needing a gradient; a no-grad forward gives the same loss."""
    h, w, targets = _inputs(13, 32, 90, ignored=(2,))
    grads = {}
    for fn in (linear_cross_entropy_reference, linear_cross_entropy_triton):
        w_param = w.clone().requires_grad_(True)
        fn(h, w_param * 1.0, targets, chunk_size=5).backward()  # only w needs a gradient
        h_only = h.clone().requires_grad_(True)
        fn(h_only, w, targets, chunk_size=5).backward()  # only h
        grads[fn] = (w_param.grad, h_only.grad)
    for got, want in zip(grads[linear_cross_entropy_triton], grads[linear_cross_entropy_reference]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy_triton(h, w, targets),
                                   linear_cross_entropy_reference(h, w, targets), atol=2e-5, rtol=1e-5)

def _saved_numels(fn, h, w, targets, **kw):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(h, w, targets, **kw)
    return numels

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_saved_tensors_have_no_logits(reduction):
    N, C, V = 24, 16, 200  # N*V = 4800 > V*C = 3200 > N*C = 384
    h, w, targets = _inputs(N, C, V)
    h.requires_grad_(True)
    w.requires_grad_(True)
    assert max(_saved_numels(linear_cross_entropy_reference, h, w, targets, reduction=reduction)) == N * V
    saved = _saved_numels(linear_cross_entropy_triton, h, w, targets, reduction=reduction, chunk_size=8)
    assert saved and max(saved) <= V * C, saved

def test_opcheck():
    h, w, targets = _inputs(5, 8, 20, ignored=(3,))
    h.requires_grad_(True)
    w.requires_grad_(True)
    fwd = torch.ops.tritonchat.linear_cross_entropy.default
    torch.library.opcheck(fwd, (h, w, targets, 15.0, -1, "mean", 2, True, True))
    torch.library.opcheck(fwd, (h, w, targets, 15.0, -1, "none", 2, False, False))
    torch.library.opcheck(torch.ops.tritonchat.linear_cross_entropy_backward.default,
                          (h.detach(), w.detach(), targets, torch.randn(5), 0.0, -1, 2, True, True))

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(fused, reduction):
    torch._dynamo.reset()

    def f(h, w, targets):
        return linear_cross_entropy(torch.tanh(h), w, targets, reduction=reduction, chunk_size=4).sum() * 2

    h, w, targets = _inputs(10, 16, 40, ignored=(1,))
    want = _run(f, h, w, targets)
    got = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), h, w, targets)
    _compare(got, want, 1e-6, 1e-6)

def test_bad_inputs():
    h, w, targets = _inputs(4, 16, 30)
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy_triton(h[None], w, targets)
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_cross_entropy_triton(h, w[:, :8], targets)
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_cross_entropy_triton(h, w, targets[:3])
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy_triton(h, w.half(), targets)
    with pytest.raises(TypeError, match="int64"):
        linear_cross_entropy_triton(h, w, targets.int())
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy_triton(h, w, targets, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy_triton(h, w, targets, softcap=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_triton(h, w, targets, chunk_size=0)
    with pytest.raises(RuntimeError, match=r"targets must be in \[0, 30\)"):
        linear_cross_entropy_triton(h, w, torch.tensor([0, 1, 30, 2]))

def test_dispatch_follows_the_mode():
    h, w, targets = _inputs(5, 16, 40)
    prev = kernels.get_mode()
    try:
        kernels.set_mode("eager")
        assert torch.equal(linear_cross_entropy(h, w, targets), linear_cross_entropy_reference(h, w, targets))
        kernels.set_mode("fused")
        assert torch.equal(linear_cross_entropy(h, w, targets), linear_cross_entropy_triton(h, w, targets))
    finally:
        kernels.set_mode(prev)

def _tiny_gpt():
    from model.gpt import GPT, GPTConfig
    torch.manual_seed(3)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=97, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    model.init_weights()
    model.lm_head.weight.data.normal_(0, 0.5)  # init zeroes lm_head: make the logits and the cap matter
    g = torch.Generator().manual_seed(4)
    idx, targets = torch.randint(0, 97, (2, 11), generator=g), torch.randint(0, 97, (2, 11), generator=g)
    targets[0, :4] = -1
    return model, idx, targets

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpt_eager_loss_is_bitwise_unchanged(eager_single_thread, reduction):
    """GPT.forward's eager loss == the formula it used before: lm_head -> .float() -> softcap -> F.cross_entropy."""
    model, idx, targets = _tiny_gpt()
    with torch.no_grad():
        logits = model(idx)  # the targets=None path: lm_head(x).float(), then 15 tanh(. / 15)
        want = F.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-1, reduction=reduction)
        got = model(idx, targets, loss_reduction=reduction)
    assert torch.equal(got.view(-1) if reduction == "none" else got, want)

def test_gpt_fused_loss_matches_eager():
    """The whole tiny GPT, fused (attention, MLP and this loss on Triton) vs eager: loss and every gradient."""
    model, idx, targets = _tiny_gpt()
    results = {}
    prev = kernels.get_mode()
    try:
        for mode in ("eager", "fused"):
            kernels.set_mode(mode)
            model.zero_grad(set_to_none=True)
            loss = model(idx, targets)
            loss.backward()
            results[mode] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    finally:
        kernels.set_mode(prev)
    for (name, _), e, f in zip([("loss", None)] + list(model.named_parameters()), results["eager"], results["fused"]):
        torch.testing.assert_close(f, e, atol=2e-5, rtol=1e-4, msg=name)

def test_fsdp2_managed_weight(fused, cpu_rank):
    """w as an FSDP2 parameter (world of 1, gloo): read inside the root's forward it is the gathered full tensor;
    the gradient reaches the sharded parameter through autograd alone."""
    from torch.distributed.fsdp import fully_shard

    class Head(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.weight = torch.nn.Parameter(w.clone())

        def forward(self, h, targets, reduction):
            return linear_cross_entropy(h, self.weight, targets, reduction=reduction, chunk_size=8)

    h, w, targets = _inputs(19, 16, 70, ignored=(5,))
    sharded = fully_shard(Head(w))
    upstream = torch.randn(19, generator=torch.Generator().manual_seed(9))
    for reduction in ("mean", "none"):
        sharded.zero_grad(set_to_none=True)
        loss = sharded(h, targets, reduction)
        loss.backward(upstream if reduction == "none" else None)
        ref = _run(linear_cross_entropy_reference, h, w, targets, upstream if reduction == "none" else None,
                   reduction=reduction)
        torch.testing.assert_close(loss.detach(), ref[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(sharded.weight.grad.full_tensor(), ref[2], atol=2e-5, rtol=1e-4)

# ---------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("depth,N", [(20, 4096), (32, 2048)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_bf16_model_shapes(depth, N, reduction):
    """bf16 on the GPU at V = 65536: the fused error vs an fp64 reference must be no worse than eager bf16's."""
    from model.gpt import GPTConfig
    cfg = GPTConfig.from_depth(depth)
    h, w, targets = _inputs(N, cfg.n_embd, cfg.vocab_size, ignored=range(0, N, 7), device="cuda", w_scale=3.0)
    upstream = torch.randn(N, device="cuda") if reduction == "none" else torch.tensor(1.0, device="cuda")
    exact = _run(linear_cross_entropy_reference, h.double(), w.double(), targets, upstream, reduction=reduction)
    hb, wb = h.bfloat16(), w.bfloat16()
    got = _run(linear_cross_entropy_triton, hb, wb, targets, upstream, reduction=reduction, chunk_size=1024)
    ref = _run(linear_cross_entropy_reference, hb, wb, targets, upstream, reduction=reduction)
    for name, g, r, e in zip(("loss", "dh", "dw"), got, ref, exact):
        assert g.dtype == r.dtype
        err_fused = (g.double() - e).norm() / e.norm()
        err_eager = (r.double() - e).norm() / e.norm()
        assert err_fused <= 1.25 * err_eager + 1e-3, (name, err_fused.item(), err_eager.item())

@pytest.mark.gpu
def test_gpu_peak_memory_lower():
    N, C, V = 8192, 1280, 65536
    h, w, targets = _inputs(N, C, V, dtype=torch.bfloat16, device="cuda")
    peaks = {}
    for name, fn in (("eager", linear_cross_entropy_reference), ("fused", linear_cross_entropy_triton)):
        _run(fn, h, w, targets)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(fn, h, w, targets)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    # eager holds several fp32 (N, V) tensors (2 GiB each here); fused one (4096, V) bf16 buffer + V x C fp32
    assert peaks["fused"] < peaks["eager"] / 4, peaks
