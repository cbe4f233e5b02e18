"""Model-level check: a tiny GPT trained a few steps with every kernel fused (attention, ReLU^2 MLP, Newton-Schulz
inside Muon, linear + cross-entropy) gives the same losses and weights as the same model on the eager references,
uncompiled and compiled part by part (train.distributed.apply_compile, backend aot_eager: traced and differentiated
by torch.compile, run op by op, no C++ build).

CPU: the Triton kernels run under the interpreter in fp32, so the two runs differ only by summation order:
tolerance 1e-4 relative on the losses. GPU (bf16 autocast through FSDP2's mixed precision): a looser 2e-2.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import kernels
from model.gpt import GPT, GPTConfig
from train.distributed import apply_compile

torch.manual_seed(0)

def _train(mode, config, steps, device, dtype=torch.float32, backend=None):
    """-> (losses, state dict); with `backend`, the model is compiled by apply_compile first, and the dynamo caches
    are cleared before and after."""
    kernels.set_mode(mode)
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        model = GPT(config).to(device=device, dtype=dtype)
        model.init_weights()
        if backend is not None:
            apply_compile(model, backend)
        optimizers = model.setup_optimizers()
        gen = torch.Generator().manual_seed(1)
        x = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=gen).to(device)
        y = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=gen).to(device)
        y[0, :5] = -1  # some ignored targets, as SFT masks produce
        losses = []
        for _ in range(steps):
            loss = model(x, y)
            loss.backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, model.state_dict()
    finally:
        kernels.set_mode("auto")
        torch._dynamo.reset()

# GQA (2 query heads share 1 KV head), head dim 64, an odd sequence length (not a multiple of the attention tile).
# One block keeps the interpreter's cost (~ms per program step) at ~15 s; the kernel tests cover the rest.
TRAIN_CONFIG = GPTConfig(sequence_len=37, vocab_size=97, n_layer=1, n_head=2, n_kv_head=1, n_embd=128)

def test_fused_training_matches_eager_cpu(eager_single_thread):
    eager, w_eager = _train("eager", TRAIN_CONFIG, 3, "cpu")
    fused, w_fused = _train("fused", TRAIN_CONFIG, 3, "cpu")
    assert eager[-1] < eager[0]  # it trains at all
    assert fused == pytest.approx(eager, rel=1e-4)
    for name in w_eager:
        torch.testing.assert_close(w_fused[name], w_eager[name], atol=2e-4, rtol=1e-3, msg=name)

def test_compiled_fused_training_matches_eager_cpu(eager_single_thread):
    """Both modes compiled part by part: fused == eager, both == the uncompiled eager run; per mode three graphs
    (embedding, the block, head + loss), no graph break, nothing compiled after the first step; the fused graphs
    call the tritonchat:: operators, the eager ones do not. Two steps (the interpreter's cost is per step)."""
    eager, w_eager = _train("eager", TRAIN_CONFIG, 2, "cpu")
    runs = {}
    for mode in ("eager", "fused"):
        backend = CompileCounterWithBackend("aot_eager")
        counters.clear()
        runs[mode] = _train(mode, TRAIN_CONFIG, 2, "cpu", backend=backend)
        assert backend.frame_count == 3 and not counters["graph_break"], dict(counters["graph_break"])
        graphs = "\n".join(str(g.graph) for g in backend.graphs)
        for op in ("tritonchat.attention", "tritonchat.relu2_mlp", "tritonchat.linear_cross_entropy"):
            assert (op in graphs) == (mode == "fused"), op
    (eager_c, w_eager_c), (fused_c, w_fused_c) = runs["eager"], runs["fused"]
    assert eager_c == pytest.approx(eager, rel=1e-5)  # compile changes the op order at most
    assert fused_c == pytest.approx(eager_c, rel=1e-4)
    for name in w_eager:
        torch.testing.assert_close(w_eager_c[name], w_eager[name], atol=2e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(w_fused_c[name], w_eager[name], atol=2e-4, rtol=1e-3, msg=name)

def _loss_and_grads(forward, model, x, y):
    model.zero_grad(set_to_none=True)
    loss = forward(x, y)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

@pytest.mark.parametrize("mode", ["fused", "eager"])
def test_compiled_gpt_matches_eager_cpu(mode):
    """torch.compile(fullgraph=True) traces the tiny GPT's forward and backward as one graph (a graph break raises)
    with every kernel a tritonchat:: operator (fused) or the references (eager); loss and every gradient match the
    uncompiled eager model. aot_eager: no C++ compiler needed, the graph runs op by op."""
    config = GPTConfig(sequence_len=17, vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=128)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # the zero-initialised projections would zero most gradients
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=gen)
    y = torch.randint(0, config.vocab_size, (2, config.sequence_len), generator=gen)
    y[0, :3] = -1
    prev = kernels.get_mode()
    try:
        kernels.set_mode("eager")
        loss_ref, grads_ref = _loss_and_grads(model, model, x, y)
        kernels.set_mode(mode)
        torch._dynamo.reset()
        backend = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        loss, grads = _loss_and_grads(compiled, model, x, y)
    finally:
        kernels.set_mode(prev)
        torch._dynamo.reset()
    assert backend.frame_count == 1
    graph = str(backend.graphs[0].graph)
    ops = ("tritonchat.attention", "tritonchat.relu2_mlp", "tritonchat.linear_cross_entropy")
    assert all((op in graph) == (mode == "fused") for op in ops), graph
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")

@pytest.mark.gpu
def test_fused_training_matches_eager_gpu_bf16():
    config = GPTConfig(sequence_len=512, vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, n_embd=512)
    eager, _ = _train("eager", config, 5, "cuda", torch.bfloat16)
    fused, _ = _train("fused", config, 5, "cuda", torch.bfloat16)
    # bf16 weights: the two runs drift by rounding; losses must still agree to ~2 %
    assert fused == pytest.approx(eager, rel=2e-2)
