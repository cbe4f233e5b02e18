"""model/gpt.py: reference formulas, shapes (MHA/GQA), init, FLOPs by hand, overfitting, meta build, the kv_cache
hook."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.attention import attention, attention_reference
from model.gpt import GPT, GPTConfig, precompute_rotary

torch.manual_seed(0)

pytestmark = pytest.mark.usefixtures("eager_single_thread")

def tiny(**kw):
    cfg = dict(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    cfg.update(kw)
    return GPTConfig(**cfg)

def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.init_weights()
    return model

# -- reference formulas --------------------------------------------------------------------------------------------

def explicit_attention(q, k, v, base=10000, eps=1e-6):
    """RoPE by complex multiplication (pairs (x_i, x_{i+D/2}) rotated by -t*theta_i), RMS norm, softmax(QK^T)V."""
    B, T, H, D = q.shape
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = -torch.arange(T, dtype=torch.float64)[:, None] * theta
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), angles)

    def rope(x):
        z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double()) * rot[None, :, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    def rms(x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    q, k = rms(rope(q)), rms(rope(k))
    rep = H // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.double().repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)

@pytest.mark.parametrize("B,T,H,Hkv,D", [(2, 17, 4, 4, 16), (1, 33, 6, 2, 32), (2, 5, 4, 1, 64)])
def test_attention_reference_vs_explicit(B, T, H, Hkv, D):
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    cos, sin = precompute_rotary(T, D)
    want = explicit_attention(q, k, v).float()
    torch.testing.assert_close(attention_reference(q, k, v, cos, sin), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(attention(q, k, v, cos, sin), want, atol=2e-5, rtol=1e-4)  # eager dispatch

def test_rotary_tables():
    cos, sin = precompute_rotary(40, 8)
    assert cos.shape == sin.shape == (40, 4) and cos.dtype == torch.float32
    t, i = 7, 3
    angle = t * 10000 ** (-2 * i / 8)
    assert cos[t, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sin[t, i].item() == pytest.approx(math.sin(angle), abs=1e-6)

# -- config ----------------------------------------------------------------------------------------------------------

def test_config_from_depth():
    c = GPTConfig.from_depth(20)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (20, 1280, 10, 10, 128)
    assert GPTConfig.from_depth(5).head_dim == 64  # width 320 is not a multiple of 128
    c = GPTConfig.from_depth(4, vocab_size=300, sequence_len=64, n_head=4)
    assert (c.vocab_size, c.sequence_len, c.n_head, c.n_kv_head) == (300, 64, 4, 4)

@pytest.mark.parametrize("kw,msg", [
    (dict(n_head=3), "divisible by n_head"),
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_head=64, n_kv_head=64), "even"),  # head dim 64 / 64 = 1 cannot be rotated
])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)

def test_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        GPTConfig.from_depth(0)

# -- shapes, loss, init, flops -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
def test_shapes_and_loss(n_head, n_kv_head):
    cfg = tiny(n_head=n_head, n_kv_head=n_kv_head)
    model = make_model(cfg)
    model.lm_head.weight.data.normal_(0, 0.5)  # non-zero logits so the softcap and loss are exercised
    idx = torch.randint(0, cfg.vocab_size, (3, 19))
    targets = torch.randint(0, cfg.vocab_size, (3, 19))
    targets[0, :5] = -1
    logits = model(idx)
    assert logits.shape == (3, 19, cfg.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() < 15
    per_tok = model(idx, targets, loss_reduction="none")
    assert per_tok.shape == (3, 19)
    want = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-1,
                           reduction="none").view(3, 19)
    torch.testing.assert_close(per_tok, want)
    assert (per_tok[0, :5] == 0).all()
    torch.testing.assert_close(model(idx, targets), want[targets != -1].mean())

def test_softcap():
    model = make_model(tiny())
    model.lm_head.weight.data.normal_(0, 10.0)
    idx = torch.randint(0, 64, (1, 8))
    raw = model.lm_head(F.rms_norm(model.transformer.h[1](model.transformer.h[0](
        F.rms_norm(model.transformer.wte(idx), (64,)), model.cos[:8], model.sin[:8]), model.cos[:8], model.sin[:8]),
        (64,)))
    torch.testing.assert_close(model(idx), 15 * torch.tanh(raw / 15))

def test_init():
    cfg = tiny(vocab_size=512, n_embd=128, n_head=4, n_kv_head=4)
    model = make_model(cfg)
    assert (model.lm_head.weight == 0).all()
    for block in model.transformer.h:
        assert (block.attn.c_proj.weight == 0).all() and (block.mlp.c_proj.weight == 0).all()
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    fc = model.transformer.h[0].mlp.c_fc.weight  # fan_out 512 > fan_in 128: std 1/sqrt(128)
    assert fc.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.05)
    ck = model.transformer.h[0].attn.c_q.weight
    assert ck.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.05)

def test_num_params_and_flops_by_hand():
    cfg = tiny(vocab_size=100, n_embd=64, n_head=4, n_kv_head=2, n_layer=3, sequence_len=48)
    model = GPT(cfg)
    C, D, Hkv, L, V, T, H = 64, 16, 2, 3, 100, 48, 4
    per_layer = C * C + 2 * C * Hkv * D + C * C + 2 * 4 * C * C
    assert model.num_params() == V * C + L * per_layer + V * C
    assert model.estimate_flops() == 6 * (L * per_layer + V * C) + 12 * L * H * D * T

def test_setup_optimizers():
    model = make_model(tiny(n_embd=192, n_head=3, n_kv_head=3))
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    scale = (192 / 768) ** -0.5
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.004 * scale, 0.2 * scale])
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-10
    assert all("initial_lr" in g for opt in (adamw, muon) for g in opt.param_groups)
    assert all(g["momentum"] == 0.95 and g["lr"] == 0.02 for g in muon.param_groups)
    seen = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(map(id, seen))) == len(list(model.parameters()))
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])

# -- training, meta build, kv cache, generate ------------------------------------------------------------------------

def test_overfits_one_batch():
    cfg = tiny()
    model = make_model(cfg)
    opts = model.setup_optimizers()
    idx = torch.randint(0, cfg.vocab_size, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    first = None
    for _ in range(30):
        loss = model(x, y)
        loss.backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        first = first if first is not None else loss.item()
    assert first == pytest.approx(math.log(cfg.vocab_size), rel=0.05)  # zero lm_head: uniform at init
    assert model(x, y).item() < 0.1 * first

def test_meta_build_then_init():
    cfg = tiny()
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.cos.is_meta
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    ref = GPT(cfg)
    torch.manual_seed(0)
    ref.init_weights()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(model.cos, ref.cos) and torch.equal(model.sin, ref.sin)
    assert model.cos.shape == (10 * cfg.sequence_len, cfg.head_dim // 2)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.equal(model(idx), ref(idx))

class RecordingCache:
    """A stand-in for the engine's KV cache: full-sequence attention at positions 0..T-1, recording each call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def attend(self, layer_idx, q, k, v):
        self.calls.append((layer_idx, q.shape, k.shape, v.shape))
        T = q.shape[1]
        return attention_reference(q, k, v, self.model.cos[:T], self.model.sin[:T])

def test_kv_cache_hook():
    cfg = tiny(n_head=4, n_kv_head=2)
    model = make_model(cfg)
    model.lm_head.weight.data.normal_(0, 0.5)
    for block in model.transformer.h:
        block.attn.c_proj.weight.data.normal_(0, 0.1)
    idx = torch.randint(0, cfg.vocab_size, (2, 7))
    cache = RecordingCache(model)
    torch.testing.assert_close(model(idx, kv_cache=cache), model(idx))
    assert cache.calls == [(i, (2, 7, 4, 16), (2, 7, 2, 16), (2, 7, 2, 16)) for i in range(cfg.n_layer)]

def test_generate():
    model = make_model(tiny())
    model.lm_head.weight.data.normal_(0, 1.0)
    greedy = list(model.generate([1, 2, 3], max_tokens=6, temperature=0.0))
    ids = [1, 2, 3]
    for _ in range(6):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    assert greedy == ids[3:]
    a = list(model.generate([5], max_tokens=8, temperature=1.0, top_k=5, seed=1))
    b = list(model.generate([5], max_tokens=8, temperature=1.0, top_k=5, seed=1))
    assert a == b and all(0 <= t < 64 for t in a)

def test_sequence_too_long():
    model = make_model(tiny(sequence_len=4))
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros(1, 41, dtype=torch.long))

@pytest.mark.gpu
def test_bf16_cuda_forward_close_to_fp32():
    cfg = GPTConfig(sequence_len=256, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=1, n_embd=256)
    model = make_model(cfg).cuda()
    model.lm_head.weight.data.normal_(0, 0.05)
    idx = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    # fp32 on the eager references: fp32 Triton tiles are FMA-only on Hopper (no tensor cores), slow to compile and
    # run, and no training path uses them; the bf16 side is the fused kernels under autocast
    prev = kernels.get_mode()
    try:
        kernels.set_mode("eager")
        want = model(idx)
        kernels.set_mode("fused")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(idx)
    finally:
        kernels.set_mode(prev)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)  # bf16 activations
