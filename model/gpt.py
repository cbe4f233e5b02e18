"""The GPT model: nanochat's architecture (first release), with attention, MLP and loss on our kernels.

Token embedding untied from lm_head; no biases; weightless RMSNorm after the embedding, pre-norm in every block, before
lm_head and on q, k (QK-norm, after RoPE: base 10 000, half-split); grouped-query attention; ReLU^2 MLP of width 4C;
logits soft-capped in fp32, 15 * tanh(logits / 15); cross-entropy ignores targets == -1 (all ignored: mean 0, not nan).
Init: linears N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in))), embedding N(0, 1), lm_head and both output
projections zero. kernels.set_mode flips the model between Triton and eager. Built on the meta device, sharded with
FSDP2 (train/distributed.py), then `to_empty` + `init_weights()` (weights independent of the world size).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import attention
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.relu2_mlp import relu2_mlp
from model.common import local
from model.optim import Muon, make_adamw

SOFTCAP = 15.0

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10      # query heads
    n_kv_head: int = 10   # key/value heads (GQA when < n_head)
    n_embd: int = 1280

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig: n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"GPTConfig: head dim n_embd/n_head = {self.head_dim} must be even for rotary")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth, **overrides):
        """nanochat's one-knob size: n_layer = depth, width 64*depth, head dim 128 (64 at odd depths); d20: 10 heads."""
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"GPTConfig.from_depth: depth must be an integer >= 1, got {depth!r}")
        n_head = depth if depth % 2 else depth // 2
        kv = overrides.get("n_head", n_head)  # n_head overridden alone: n_kv_head follows it
        return cls(**{**dict(n_layer=depth, n_embd=64 * depth, n_head=n_head, n_kv_head=kv), **overrides})

def norm(x):
    """RMSNorm without a learned weight."""
    return F.rms_norm(x, (x.size(-1),))

def precompute_rotary(seq_len, head_dim, base=10000, device=None):
    """cos, sin of shape (seq_len, head_dim/2), fp32: angle[t, i] = t * base^(-2i/head_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()

def embed(idx, wte):
    """Token ids (B, T) int64, embedding table (V, C) -> normalised embeddings (B, T, C)."""
    return norm(F.embedding(idx, wte))

def head_logits(x, w):
    """Last hidden states (B, T, C), lm_head weight (V, C) -> soft-capped logits (B, T, V) in fp32."""
    return SOFTCAP * torch.tanh(F.linear(norm(x), w).float() / SOFTCAP)

def head_loss(x, w, targets, reduction="mean"):
    """Hidden states (B, T, C), lm_head weight (V, C), targets (B, T) int64 (-1 = no loss) -> mean loss over targets
    != -1 ("mean") or per token (B, T) ("none"); one op, so the fused path never holds the (B*T, V) logits."""
    loss = linear_cross_entropy(norm(x).flatten(0, 1), w, targets.reshape(-1), softcap=SOFTCAP, ignore_index=-1,
                                reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss

class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # one kernel does rotary + QK-norm + causal flash attention; the cache rotates at its own positions
        y = attention(q, k, v, cos, sin) if kv_cache is None else kv_cache.attend(self.layer_idx, q, k, v)
        return self.c_proj(y.reshape(B, T, C))

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return relu2_mlp(x, self.c_fc.weight, self.c_proj.weight)

class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # 10x the training length, so the engine can generate past it; recomputed in init_weights (after to_empty)
        self.rotary_len = 10 * config.sequence_len
        for name, table in zip(("cos", "sin"), precompute_rotary(self.rotary_len, config.head_dim)):
            self.register_buffer(name, table, persistent=False)
        # train.distributed.apply_compile swaps in compiled versions
        self.embed, self.head_logits, self.head_loss = embed, head_logits, head_loss

    @torch.no_grad()
    def init_weights(self):
        """nanochat's first-release init, on plain tensors or FSDP2 DTensors."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                _fill_normal(module.weight, 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in)))
            elif isinstance(module, nn.Embedding):
                _fill_normal(module.weight, 1.0)
        self.lm_head.weight.zero_()
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        device = local(self.transformer.wte.weight).device
        self.cos, self.sin = precompute_rotary(self.rotary_len, self.config.head_dim, device=device)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # DTensor.numel() is the global count

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul weight (fwd + bwd; the embedding is a lookup, not a matmul) plus
        the attention scores and values: 12 * n_layer * n_head * head_dim * T (causality ignored, as nanochat)."""
        c = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0):
        """[AdamW(lm_head, wte), Muon(block matrices)]; Adam lrs x (n_embd/768)^-0.5 as nanochat; every group carries
        "initial_lr" (the loop scales lr from it)."""
        scale = (self.config.n_embd / 768) ** -0.5
        adamw = make_adamw([dict(params=list(self.lm_head.parameters()), lr=unembedding_lr * scale),
                            dict(params=list(self.transformer.wte.parameters()), lr=embedding_lr * scale)],
                           weight_decay=weight_decay)
        muon = Muon(list(self.transformer.h.parameters()), lr=matrix_lr, momentum=0.95)
        for group in adamw.param_groups + muon.param_groups:
            group["initial_lr"] = group["lr"]
        return [adamw, muon]

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        if T > self.rotary_len:
            raise ValueError(f"GPT: sequence of {T} tokens exceeds the rotary table ({self.rotary_len})")
        cos, sin = self.cos[:T], self.sin[:T]
        # The root's weights are read directly: under FSDP2 gathered tensors here, so torch.compile sees no FSDP module
        x = self.embed(idx, self.transformer.wte.weight)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        if targets is None:
            return self.head_logits(x, self.lm_head.weight)
        return self.head_loss(x, self.lm_head.weight, targets, loss_reduction)

    @torch.no_grad()  # not inference_mode: FSDP2 cannot gather its parameters into inference tensors
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive sampling (full forward per token, no cache) -> yields token ids. Under FSDP every rank must call it
        with the same arguments (each forward gathers parameters)."""
        device = local(self.transformer.wte.weight).device
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            # eager even after apply_compile: each new length would recompile
            with torch.compiler.set_stance("force_eager"):
                logits = self(ids[:, -self.rotary_len:])[:, -1, :]
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            next_id = (torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng) if temperature > 0
                       else logits.argmax(dim=-1, keepdim=True))
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()

def _fill_normal(p, std):
    """p ~ N(0, std^2); a DTensor keeps its slice of the full tensor each rank draws (same for any world size)."""
    if not hasattr(p, "device_mesh"):
        return p.normal_(0.0, std)
    from torch.distributed.tensor import distribute_tensor
    full = torch.empty(p.shape, dtype=p.dtype, device=local(p).device).normal_(0.0, std)
    p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
