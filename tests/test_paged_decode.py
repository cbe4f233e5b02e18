"""Paged decode attention + write_kv: Triton (interpreter on CPU, fp32/fp16) vs the PyTorch references."""
import os
import subprocess
import sys

import pytest
import torch

from kernels.paged_decode import (choose_num_splits, paged_decode_attention, paged_decode_attention_reference,
                                  paged_decode_attention_triton, rope_norm_write_kv, rope_norm_write_kv_reference,
                                  rope_norm_write_kv_triton, write_kv, write_kv_reference, write_kv_triton)

torch.manual_seed(0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

def make_case(B, H, Hkv, D, block_size, seq_lens, dtype, extra_blocks=5, garbage=True):
    """A pool with more blocks than needed, each sequence's pages taken from a shuffled permutation (non-contiguous,
    out of order), and unused block-table entries filled with garbage ids that must never be read."""
    g = torch.Generator().manual_seed(sum(seq_lens) * 7 + B + H + D + block_size)
    max_blocks = max(-(-n // block_size) for n in seq_lens) + 1
    num_blocks = B * max_blocks + extra_blocks
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(DEVICE, dtype)
    perm = torch.randperm(num_blocks, generator=g)[:B * max_blocks].view(B, max_blocks)
    table = perm.clone()
    for b, n in enumerate(seq_lens):
        used = -(-n // block_size)
        if garbage:
            table[b, used:] = -1 if b % 2 else 10 ** 6   # out of range: a read would fault or differ
    q = torch.randn(B, H, D, generator=g).to(DEVICE, dtype)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, table.to(DEVICE, torch.int32), seq

def reference(q, k_cache, v_cache, table, seq):
    # The reference gathers every table entry (clamped), so give it the fp32 cache and a clean table.
    table = torch.where(table < 0, 0, table).clamp(max=k_cache.shape[0] - 1)
    return paged_decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), table, seq)

SEQS = {1: [[1], [17], [100]], 3: [[1, 15, 16], [17, 100, 1], [16, 100, 15]]}
CPU_DTYPES = [(torch.float32, 2e-5, 2e-5)]

@pytest.mark.parametrize("dtype,atol,rtol", CPU_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("B,seq_lens", [(B, s) for B in SEQS for s in SEQS[B]])
def test_paged_decode_vs_reference(B, seq_lens, H, Hkv, D, dtype, atol, rtol):
    q, kc, vc, table, seq = make_case(B, H, Hkv, D, 16, seq_lens, dtype)
    out = paged_decode_attention_triton(q, kc, vc, table, seq)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), reference(q, kc, vc, table, seq), atol=atol, rtol=rtol)

@pytest.mark.parametrize("block_size,seq_lens", [(32, [1, 33, 100]), (64, [64, 65, 1]), (16, [7])])
@pytest.mark.parametrize("num_splits", [1, 2, 4])
@pytest.mark.parametrize("dtype,atol,rtol", CPU_DTYPES + [(torch.float16, 2e-3, 2e-3)])
def test_paged_decode_splits_and_block_sizes(block_size, seq_lens, num_splits, dtype, atol, rtol):
    # Explicit split counts, including splits that are empty for the short sequences (combine weight 0).
    q, kc, vc, table, seq = make_case(len(seq_lens), 8, 2, 64, block_size, seq_lens, dtype)
    out = paged_decode_attention_triton(q, kc, vc, table, seq, num_splits=num_splits)
    torch.testing.assert_close(out.float(), reference(q, kc, vc, table, seq), atol=atol, rtol=rtol)

def test_paged_decode_scale_and_odd_group():
    # H / Hkv = 3 (not a power of two), custom scale.
    q, kc, vc, table, seq = make_case(2, 6, 2, 64, 16, [40, 3], torch.float32)
    out = paged_decode_attention_triton(q, kc, vc, table, seq, scale=0.3)
    t = torch.where(table < 0, 0, table).clamp(max=kc.shape[0] - 1)
    ref = paged_decode_attention_reference(q, kc, vc, t, seq, scale=0.3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)

def test_reference_compiles_with_dynamic_shapes():
    """Under torch.compile(dynamic=True) H != Hkv is a SymBool; SDPA's enable_gqa takes a plain bool only."""
    compiled = torch.compile(paged_decode_attention_reference, backend="aot_eager", dynamic=True, fullgraph=True)
    for B in (2, 3):
        args = make_case(B, 8, 2, 64, 16, [40, 3, 17][:B], torch.float32, garbage=False)
        torch.testing.assert_close(compiled(*args), paged_decode_attention_reference(*args))

def test_num_splits_heuristic():
    # More splits for small batch / long context, one split when the batch alone fills the GPU.
    assert choose_num_splits(1, 4, 32768) > choose_num_splits(8, 4, 32768) >= choose_num_splits(256, 16, 32768) == 1
    assert choose_num_splits(1, 4, 256) == 1
    for args in [(1, 1, 10 ** 6), (3, 2, 1000), (64, 4, 4096)]:
        n = choose_num_splits(*args)
        assert n >= 1 and n & (n - 1) == 0

@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_vs_reference(block_size, dtype):
    N, Hkv, D = 7, 3, 64   # Hkv = 3: padded head tile
    num_blocks = 20
    g = torch.Generator().manual_seed(1)
    k = torch.randn(N, Hkv, D, generator=g).to(DEVICE)
    v = torch.randn(N, Hkv, D, generator=g).to(DEVICE)
    table = torch.randperm(num_blocks, generator=g)[:N * 2].view(N, 2).to(DEVICE, torch.int32)
    positions = torch.tensor([0, 1, block_size - 1, block_size, block_size + 5, 2 * block_size - 1, 3],
                             device=DEVICE)
    caches = [torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(DEVICE, dtype) for _ in range(2)]
    ours = [c.clone() for c in caches]
    write_kv_triton(*ours, k, v, table, positions)
    write_kv_reference(*caches, k, v, table, positions)
    assert torch.equal(ours[0], caches[0]) and torch.equal(ours[1], caches[1])

def test_clear_errors():
    q, kc, vc, table, seq = make_case(2, 8, 2, 64, 16, [5, 9], torch.float32)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        paged_decode_attention_triton(q[:, :7], kc, vc, table, seq)
    with pytest.raises(ValueError, match="head dim"):
        paged_decode_attention_triton(q[..., :32], kc, vc, table, seq)
    with pytest.raises(TypeError, match="dtype"):
        paged_decode_attention_triton(q.half(), kc, vc, table, seq)
    with pytest.raises(ValueError, match="block_table"):
        paged_decode_attention_triton(q, kc, vc, table[:1], seq)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention_triton(q, kc, vc, table, seq[:1])
    with pytest.raises(ValueError, match="block_size"):
        paged_decode_attention_triton(q, kc[:, :8], vc[:, :8], table, seq)
    with pytest.raises(ValueError, match="write_kv"):
        write_kv_triton(kc, vc, q[:, :2], q[:, :2, :32], table, seq)

def test_fused_mode_dispatches_to_triton(fused):
    q, kc, vc, table, seq = make_case(2, 8, 2, 64, 16, [20, 3], torch.float32)
    assert torch.equal(paged_decode_attention(q, kc, vc, table, seq),
                       paged_decode_attention_triton(q, kc, vc, table, seq))
    k = v = q[:, :2]
    ours, theirs = [c.clone() for c in (kc, vc)], [c.clone() for c in (kc, vc)]
    write_kv(*ours, k, v, table, seq)
    write_kv_triton(*theirs, k, v, table, seq)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])

@pytest.mark.parametrize("scale,num_splits", [(None, None), (0.3, 2)])
def test_opcheck(scale, num_splits):
    """torch.library.opcheck (schema incl. the declared cache mutation, fake vs real outputs, AOT dispatch with
    dynamic shapes) of tritonchat::paged_decode_attention and tritonchat::write_kv."""
    q, kc, vc, table, seq = make_case(2, 4, 2, 64, 16, [20, 3], torch.float32)
    torch.library.opcheck(torch.ops.tritonchat.paged_decode_attention, (q, kc, vc, table, seq, scale, num_splits))
    k, v = q[:, :2].contiguous(), q[:, 2:].contiguous()
    torch.library.opcheck(torch.ops.tritonchat.write_kv, (kc, vc, k, v, table, seq.long()))

def make_prologue_case(B, H, Hkv, D, block_size, dtype):
    """Raw q, k, v as strided views of one packed (B, 1, H + 2 Hkv, D) projection (as the model hands them over),
    rotary tables, caches, a shuffled block table and positions at and around page boundaries."""
    g = torch.Generator().manual_seed(B * 100 + H * 10 + D + block_size)
    x = torch.randn(B, 1, H + 2 * Hkv, D, generator=g).to(DEVICE, dtype)
    q, k, v = x[:, 0, :H], x[:, 0, H:H + Hkv], x[:, 0, H + Hkv:]
    t = torch.arange(4 * block_size, dtype=torch.float32)[:, None] * 0.3 ** torch.arange(D // 2)[None, :]
    cos, sin = t.cos().to(DEVICE), t.sin().to(DEVICE)
    num_blocks = 4 * B + 3
    caches = [torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(DEVICE, dtype) for _ in range(2)]
    table = torch.randperm(num_blocks, generator=g)[:B * 4].view(B, 4).to(DEVICE, torch.int32)
    positions = torch.tensor([0, block_size, 3 * block_size - 1, block_size - 1, 5][:B], device=DEVICE)
    return q, k, v, cos, sin, caches, table, positions

@pytest.mark.parametrize("B,H,Hkv,D", [(3, 4, 2, 64), (5, 6, 3, 128), (1, 2, 2, 64)])  # Hkv = 3, H = 6: padded tiles
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype,atol,rtol", CPU_DTYPES + [(torch.float16, 2e-3, 2e-3)])
def test_rope_norm_write_kv_vs_reference(B, H, Hkv, D, block_size, dtype, atol, rtol):
    q, k, v, cos, sin, caches, table, positions = make_prologue_case(B, H, Hkv, D, block_size, dtype)
    ours, theirs = [c.clone() for c in caches], [c.clone() for c in caches]
    q_hat = rope_norm_write_kv_triton(q, k, v, cos, sin, *ours, table, positions, eps=1e-6)
    q_ref = rope_norm_write_kv_reference(q, k, v, cos, sin, *theirs, table, positions, eps=1e-6)
    assert q_hat.shape == (B, H, D) and q_hat.dtype == dtype
    torch.testing.assert_close(q_hat, q_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(ours[0], theirs[0], atol=atol, rtol=rtol)  # k: only the B new slots differ
    assert torch.equal(ours[1], theirs[1])                                  # v: copied as is
    # the new k rows are unit-RMS, and nothing but the B new slots changed
    blocks = table.long()[torch.arange(B), positions // block_size]
    rms = ours[0][blocks, positions % block_size].float().pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=2e-3, rtol=0)
    changed = (ours[0] != caches[0]).any(-1).any(-1).nonzero().tolist()
    assert sorted(map(tuple, changed)) == sorted(zip(blocks.tolist(), (positions % block_size).tolist()))

def test_rope_norm_write_kv_errors_dispatch_and_opcheck(fused):
    q, k, v, cos, sin, caches, table, positions = make_prologue_case(2, 4, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        rope_norm_write_kv_triton(q[:, :3], k, v, cos, sin, *caches, table, positions)
    with pytest.raises(ValueError, match="cos and sin"):
        rope_norm_write_kv_triton(q, k, v, cos[:, :8], sin[:, :8], *caches, table, positions)
    with pytest.raises(TypeError, match="share"):
        rope_norm_write_kv_triton(q.half(), k, v, cos, sin, *caches, table, positions)
    ours, theirs = [c.clone() for c in caches], [c.clone() for c in caches]
    assert torch.equal(rope_norm_write_kv(q, k, v, cos, sin, *ours, table, positions),
                       rope_norm_write_kv_triton(q, k, v, cos, sin, *theirs, table, positions))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    torch.library.opcheck(torch.ops.tritonchat.rope_norm_write_kv,
                          (q, k, v, cos, sin, *caches, table, positions, 1e-6))

HOPPER_COMPILE = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.paged_decode import _paged_decode_split as fn
sig = dict(Q="*bf16", K="*bf16", V="*bf16", BT="*i32", SL="*i32", OUT="*bf16", OP="*fp32", LSE="*fp32")
sig.update({n: "i32" for n in fn.arg_names[8:20]}, sm_scale="fp32")
consts = dict(GROUP=4, GROUP_PAD=16, D=128, D_PAD=128, BLOCK_SIZE=16, BLOCK_N=64, SINGLE_SPLIT=False, PRECISION="tf32")
sig.update({k: "constexpr" for k in consts})
# What a real launch knows: pointers and (specialised) strides divisible by 16; stride_btb, num_splits are not.
div = [n for n in fn.arg_names[:20] if n not in ("stride_btb", "num_splits")]
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=4, num_stages=2))
ptx = k.asm["ptx"]
patterns = ("cp.async.cg.shared.global", "mma.sync", "ld.local")
print(json.dumps({p: len(re.findall(re.escape(p), ptx)) for p in patterns}))
"""

@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the real thing")
def test_split_kernel_compiles_for_hopper():
    """No GPU needed: compile the bf16 split kernel for sm_90 (Triton's bundled ptxas) in a process without the
    interpreter, and check the K/V tiles stream through shared memory with async 16-byte copies, P.V and Q.K^T run
    on tensor cores (mma), and nothing spills to local memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert out.returncode == 0, out.stderr[-3000:]
    counts = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert counts["cp.async.cg.shared.global"] > 0 and counts["mma.sync"] > 0 and counts["ld.local"] == 0, counts

@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("H,Hkv,D,dtype", [(16, 16, 128, torch.bfloat16), (16, 4, 128, torch.bfloat16),
                                           (8, 2, 64, torch.bfloat16), (16, 4, 128, torch.float16)])
@pytest.mark.parametrize("seq_lens", [[1, 15, 17, 100], [4096, 1, 777], [32768]])
def test_paged_decode_gpu(dtype, block_size, H, Hkv, D, seq_lens):
    q, kc, vc, table, seq = make_case(len(seq_lens), H, Hkv, D, block_size, seq_lens, dtype)
    out = paged_decode_attention_triton(q, kc, vc, table, seq)
    # bf16 inputs, fp32 accumulation; the partial P is rounded to bf16 before P.V (as flash attention does).
    torch.testing.assert_close(out.float(), reference(q, kc, vc, table, seq), atol=2e-2, rtol=2e-2)
