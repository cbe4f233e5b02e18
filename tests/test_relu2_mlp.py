"""kernels.relu2_mlp: the fused Triton ReLU^2 MLP vs relu2_mlp_reference, forward and all three gradients.

CPU: Triton interpreter, fp32 (+ one fp16 case). GPU (marked gpu): bf16 at the model's shapes.
"""
import pytest
import torch

import kernels
from kernels.relu2_mlp import relu2_mlp, relu2_mlp_reference, relu2_mlp_triton

torch.manual_seed(0)

FP32 = (torch.float32, 1e-4, 1e-4)  # (dtype, atol, rtol): fp32 accumulation on both sides, only summation order differs

def _inputs(shape, C, Fh, dtype, device="cpu"):
    g = torch.Generator().manual_seed(1234 + C + Fh + shape[0])
    x = torch.randn(*shape, C, generator=g)
    w_fc = torch.randn(Fh, C, generator=g) / C ** 0.5          # nn.Linear-like scale: h ~ N(0, 1)
    w_proj = torch.randn(C, Fh, generator=g) / Fh ** 0.5
    dy = torch.randn(*shape, C, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, w_fc, w_proj, dy)]

def _run(fn, x, w_fc, w_proj, dy):
    x, w_fc, w_proj = (t.detach().clone().requires_grad_(True) for t in (x, w_fc, w_proj))
    y = fn(x, w_fc, w_proj)
    y.backward(dy)
    return y.detach(), x.grad, w_fc.grad, w_proj.grad

def _compare(shape, C, Fh, dtype, atol, rtol):
    x, w_fc, w_proj, dy = _inputs(shape, C, Fh, dtype)
    got = _run(relu2_mlp_triton, x, w_fc, w_proj, dy)
    ref = _run(relu2_mlp_reference, x, w_fc, w_proj, dy)
    for name, g, r in zip(("y", "dx", "dw_fc", "dw_proj"), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")

@pytest.mark.parametrize("C", [32, 64, 96])
@pytest.mark.parametrize("M", [1, 7, 64, 130])
@pytest.mark.parametrize("dtype,atol,rtol", [FP32])
def test_matches_reference(M, C, dtype, atol, rtol):
    _compare((M,), C, 4 * C, dtype, atol, rtol)

@pytest.mark.parametrize("shape,C,Fh", [((37,), 64, 100), ((130,), 96, 200), ((2, 9), 64, 256), ((3, 5, 7), 32, 72)])
def test_odd_hidden_and_nd_inputs(shape, C, Fh):
    # F not a multiple of the 64-wide tile, and (B, T, C) / (B, H, T, C) inputs
    _compare(shape, C, Fh, *FP32)

def test_fp16():
    # fp16 stores a = relu(h)^2 rounded to fp16 (eager stores r and a rounded); tolerance of a few fp16 ulps
    _compare((33,), 64, 256, torch.float16, 2e-2, 2e-2)

def test_only_weight_grads_and_noncontiguous():
    x, w_fc, w_proj, dy = _inputs((16, 8), 64, 256, torch.float32)
    x = x.transpose(0, 1)  # (8, 16, 64), non-contiguous
    dy = dy.transpose(0, 1)
    w_fc.requires_grad_(True)
    w_proj.requires_grad_(True)
    relu2_mlp_triton(x, w_fc, w_proj).backward(dy)
    g_fc, g_proj = w_fc.grad, w_proj.grad
    w_fc.grad = w_proj.grad = None
    relu2_mlp_reference(x, w_fc, w_proj).backward(dy)
    torch.testing.assert_close(g_fc, w_fc.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g_proj, w_proj.grad, atol=1e-4, rtol=1e-4)

def _saved_activation_bytes(fn, x, w_fc, w_proj):
    """Bytes of the distinct non-parameter tensors autograd keeps for backward (what the MLP adds to peak memory)."""
    seen = {}
    params = {w_fc.data_ptr(), w_proj.data_ptr()}

    def pack(t):
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, w_fc, w_proj)
    return sum(seen.values())

def test_saved_tensor_bytes():
    """Eager saves x, r = relu(h) and a = r^2 (M*C + 2*M*F elements); fused saves x and a only (M*C + M*F)."""
    M, C, Fh = 64, 32, 128
    x, w_fc, w_proj, _ = _inputs((M,), C, Fh, torch.float32)
    x.requires_grad_(True)
    w_fc.requires_grad_(True)
    w_proj.requires_grad_(True)
    eager = _saved_activation_bytes(relu2_mlp_reference, x, w_fc, w_proj)
    fused_bytes = _saved_activation_bytes(relu2_mlp_triton, x, w_fc, w_proj)
    assert eager == 4 * (M * C + 2 * M * Fh)
    assert fused_bytes == 4 * (M * C + M * Fh)

def test_bad_inputs():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="shape mismatch"):
        relu2_mlp_triton(x, torch.randn(128, 16), torch.randn(32, 128))
    with pytest.raises(ValueError, match="shape mismatch"):
        relu2_mlp_triton(x, torch.randn(128, 32), torch.randn(128, 32))  # w_proj given transposed
    with pytest.raises(TypeError, match="dtype"):
        relu2_mlp_triton(x, torch.randn(128, 32, dtype=torch.float16), torch.randn(32, 128))

def test_opcheck():
    """torch.library.opcheck (schema, autograd registration, fake vs real outputs, AOT dispatch with dynamic shapes)
    of tritonchat::relu2_mlp on a (B, T, C) input and of its backward GEMM tritonchat::relu2_mlp_dh."""
    x, w_fc, w_proj, dy = _inputs((3, 5), 32, 64, torch.float32)
    torch.library.opcheck(torch.ops.tritonchat.relu2_mlp, (x.requires_grad_(), w_fc.requires_grad_(),
                                                            w_proj.requires_grad_()))
    a = torch.ops.tritonchat.relu2_mlp(x.detach(), w_fc.detach(), w_proj.detach())[1]
    torch.library.opcheck(torch.ops.tritonchat.relu2_mlp_dh, (dy.reshape(15, 32), w_proj.detach(), a))

def test_eager_mode_is_reference():
    prev = kernels.get_mode()
    kernels.set_mode("eager")
    try:
        x, w_fc, w_proj, _ = _inputs((5,), 32, 128, torch.float32)
        assert torch.equal(relu2_mlp(x, w_fc, w_proj), relu2_mlp_reference(x, w_fc, w_proj))
    finally:
        kernels.set_mode(prev)

def test_fused_mode_is_triton(fused):
    x, w_fc, w_proj, _ = _inputs((5,), 32, 128, torch.float32)
    assert torch.equal(relu2_mlp(x, w_fc, w_proj), relu2_mlp_triton(x, w_fc, w_proj))

def test_model_mlp_fused_matches_eager():
    """model.gpt.MLP (nn.Linear weights, (B, T, C) input) in fused vs eager mode: output and all gradients."""
    gpt = pytest.importorskip("model.gpt")
    torch.manual_seed(5)
    mlp = gpt.MLP(gpt.GPTConfig.from_depth(1))             # C = 64, F = 256
    x = torch.randn(2, 11, 64)
    dy = torch.randn(2, 11, 64)
    results = {}
    prev = kernels.get_mode()
    try:
        for mode in ("eager", "fused"):
            kernels.set_mode(mode)
            mlp.zero_grad()
            xs = x.clone().requires_grad_(True)
            y = mlp(xs)
            y.backward(dy)
            results[mode] = (y.detach(), xs.grad, mlp.c_fc.weight.grad.clone(), mlp.c_proj.weight.grad.clone())
    finally:
        kernels.set_mode(prev)
    for e, f in zip(results["eager"], results["fused"]):
        torch.testing.assert_close(f, e, atol=1e-4, rtol=1e-4)

# ---------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("depth", [12, 20, 26])
def test_gpu_bf16_model_shapes(depth):
    """bf16 on the GPU: the fused error vs an fp32 reference must be no worse than eager bf16's (plus slack)."""
    C = 64 * depth  # GPTConfig.from_depth: width 64*depth, F = 4C
    x, w_fc, w_proj, dy = _inputs((4, 1024), C, 4 * C, torch.float32, device="cuda")
    exact = _run(relu2_mlp_reference, x.double(), w_fc.double(), w_proj.double(), dy.double())
    bf = [t.bfloat16() for t in (x, w_fc, w_proj, dy)]
    got = _run(relu2_mlp_triton, *bf)
    ref = _run(relu2_mlp_reference, *bf)
    for name, g, r, e in zip(("y", "dx", "dw_fc", "dw_proj"), got, ref, exact):
        assert g.dtype == torch.bfloat16
        err_fused = (g.double() - e).norm() / e.norm()
        err_eager = (r.double() - e).norm() / e.norm()
        assert err_fused <= 1.25 * err_eager + 1e-3, (name, err_fused.item(), err_eager.item())

@pytest.mark.gpu
def test_gpu_peak_memory_lower():
    C, M = 1280, 8192
    x, w_fc, w_proj, dy = _inputs((M,), C, 4 * C, torch.bfloat16, device="cuda")
    peaks = {}
    for name, fn in (("eager", relu2_mlp_reference), ("fused", relu2_mlp_triton)):
        xs = x.clone().requires_grad_(True)
        fn(xs, w_fc.requires_grad_(True), w_proj.requires_grad_(True)).backward(dy)  # warm-up: autotuning allocates
        w_fc.grad = w_proj.grad = xs.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(xs, w_fc.requires_grad_(True), w_proj.requires_grad_(True)).backward(dy)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        w_fc.grad = w_proj.grad = None
    assert peaks["fused"] < peaks["eager"], peaks
