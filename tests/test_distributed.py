"""train/distributed.py + sharded Muon: one process vs `torchrun --nproc_per_node=2` (gloo, CPU, fp32).

Both runs execute tests/_dist_worker.py: an FSDP2 tiny GPT trained a few steps on the same global batches (each rank
its slice), plus Muon on odd matrix shapes (uneven and empty dim-0 shards). Same forward, same losses, same
parameters; each rank orthogonalises only its share of the matrices."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from model.common import full
from stand_ins import straightforward_muon
from tests._dist_worker import MUON_SHAPES, STEPS

torch.manual_seed(0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_dist_worker.py")

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def start_worker(out, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITONCHAT_KERNELS="eager", PYTHONPATH=ROOT)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if nproc == 1:  # plain single process: the 1-rank process group path
        cmd = [sys.executable, WORKER, out]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", WORKER, out]
    return cmd, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    outs = {n: str(tmp / f"world{n}.pt") for n in (1, 2)}
    procs = {n: start_worker(outs[n], n) for n in outs}  # both at once: the wall time is mostly imports
    for n, (cmd, proc) in procs.items():
        try:
            log, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
            pytest.fail(f"{' '.join(cmd)} timed out:\n{log[-3000:]}")
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-5000:]}"
    return {n: torch.load(out) for n, out in outs.items()}

def test_forward_identical_across_world_sizes(runs):
    torch.testing.assert_close(runs[2]["logits0"], runs[1]["logits0"], atol=0, rtol=0)

def test_training_same_losses_and_params(runs):
    one, two = runs[1], runs[2]
    assert len(one["losses"]) == STEPS
    # fp32; the only difference is the batch split (per-rank means averaged by FSDP's reduce-scatter)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=0, rtol=1e-5)
    assert one["params"].keys() == two["params"].keys()
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, atol=2e-5, rtol=1e-4, msg=name)

def test_each_rank_orthogonalizes_its_share(runs):
    n_matrices = 2 * 6  # tiny config: 2 layers x (c_q, c_k, c_v, c_proj, c_fc, mlp.c_proj)
    assert runs[1]["ns_counts"] == [STEPS * n_matrices]
    assert runs[2]["ns_counts"] == [STEPS * n_matrices // 2] * 2
    assert runs[1]["muon"]["counts"] == [3 * len(MUON_SHAPES)]
    assert runs[2]["muon"]["counts"] == [3 * len(MUON_SHAPES) // 2] * 2

@pytest.mark.parametrize("world", [1, 2])
def test_sharded_muon_matches_straightforward(runs, world):
    m = runs[world]["muon"]
    moms = [0.9] * len(m["grads"])
    want = straightforward_muon(m["init"], m["grads"], 0.1, moms)
    for got, w, shape in zip(m["final"], want, MUON_SHAPES):
        assert got.shape == shape
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)

def test_in_process_fsdp_matches_plain_model_with_eval_forwards(cpu_rank, eager_single_thread):
    """World size 1 in this process: FSDP2 model == plain GPT, even with forwards without backward (eval, sampling)
    between backward and the optimizer step, which go stale if the root keeps its parameters gathered."""
    from model.gpt import GPT, GPTConfig
    from train.distributed import build_model
    from tests._dist_worker import CONFIG
    info = cpu_rank
    assert (info.is_dist, info.rank, info.world_size, info.device.type) == (False, 0, 1, "cpu")
    cfg = GPTConfig(**CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg, info, shard_root=True)  # the managed root, as on CUDA and with more ranks
    assert hasattr(model.lm_head.weight, "device_mesh") and not model.cos.is_meta
    plain = GPT(cfg)
    torch.manual_seed(0)
    plain.init_weights()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.sequence_len + 1))
    with torch.no_grad():
        model(x[:, :-1])  # a forward before setup_optimizers
    pairs = [(model, model.setup_optimizers()), (plain, plain.setup_optimizers())]
    samples = []
    for _ in range(3):
        for m, opts in pairs:
            m(x[:, :-1], x[:, 1:]).backward()
            with torch.no_grad():
                m(x[:, :5])
            for opt in opts:
                opt.step()
            m.zero_grad(set_to_none=True)
            samples.append(list(m.generate([1, 2, 3], max_tokens=3, temperature=0.0)))
    assert samples[0::2] == samples[1::2]
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(full(p), q, atol=1e-6, rtol=1e-5, msg=name)

def test_root_stays_gathered_only_from_forward_to_backward(cpu_rank, eager_single_thread):
    """The FSDP2 root's wte/lm_head: gathered (plain tensors) from a training forward to its backward, sharded
    (DTensors) after the backward and right after any forward without grad; a training forward never followed by a
    backward, then an optimizer step, then a forward: the result still equals the plain model's."""
    from torch.distributed.tensor import DTensor

    from model.gpt import GPT, GPTConfig
    from tests._dist_worker import CONFIG
    from train.distributed import build_model
    info = cpu_rank
    cfg = GPTConfig(**CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg, info, shard_root=True)  # one CPU rank leaves the root plain unless asked
    plain = GPT(cfg)
    torch.manual_seed(0)
    plain.init_weights()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.sequence_len + 1), generator=torch.Generator().manual_seed(5))
    sharded = lambda: all(isinstance(p, DTensor) for p in model.parameters())
    pairs = [(model, model.setup_optimizers()), (plain, plain.setup_optimizers())]
    loss = model(x[:, :-1], x[:, 1:])
    assert not isinstance(model.lm_head.weight, DTensor) and isinstance(model.transformer.h[0].mlp.c_fc.weight,
                                                                         DTensor)
    loss.backward()
    assert sharded()
    with torch.no_grad():
        model(x[:, :-1])
    assert sharded()
    plain(x[:, :-1], x[:, 1:]).backward()
    for m, opts in pairs:
        m(x[:, :-1], x[:, 1:])  # a training forward without backward keeps the root gathered...
        for opt in opts:
            opt.step()  # ...and this step changes the shards under that copy
        m.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, :-1], x[:, 1:]), plain(x[:, :-1], x[:, 1:]), atol=1e-6, rtol=1e-5)
    assert sharded()

def test_fsdp_compiled_matches_uncompiled(cpu_rank, eager_single_thread):
    """build_model(compile="on") at world size 1 in this process (gloo): every block and the root's embedding and head
    compiled (aot_eager), then sharded. Three graphs (embedding, the block - shared by both blocks -, head + loss), no
    graph break, nothing compiled after the first step; evaluation without grad compiles its own three, generate()
    none (it runs uncompiled); losses and parameters equal the uncompiled FSDP2 build; parameter names unchanged."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from model.gpt import GPTConfig
    from tests._dist_worker import CONFIG
    from train.distributed import build_model
    info = cpu_rank
    cfg = GPTConfig(**CONFIG)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.sequence_len + 1), generator=torch.Generator().manual_seed(3))
    runs = {}
    try:
        for compiled in (False, True):
            torch._dynamo.reset()
            counters.clear()
            backend = CompileCounterWithBackend("aot_eager")
            torch.manual_seed(0)
            model = build_model(cfg, info, compile="on" if compiled else "off", compile_backend=backend,
                                shard_root=True)  # the managed root (one CPU rank would leave it plain)
            assert hasattr(model.lm_head.weight, "device_mesh")
            opts = model.setup_optimizers()
            losses, frames = [], []
            for step in range(3):
                loss = model(x[:, :-1], x[:, 1:])
                loss.backward()
                for opt in opts:
                    opt.step()
                model.zero_grad(set_to_none=True)
                losses.append(loss.item())
                frames.append(backend.frame_count)
                if step == 1:  # evaluation and sampling between steps, as the training loop runs them
                    with torch.no_grad():
                        per_token = model(x[:, :-1], x[:, 1:], loss_reduction="none")
                    frames.append(backend.frame_count)
                    sample = list(model.generate([1, 2, 3], max_tokens=3, temperature=0.0))
                    frames.append(backend.frame_count)
            runs[compiled] = dict(losses=losses, per_token=per_token, sample=sample, frames=frames,
                                  breaks=sum(counters["graph_break"].values()),
                                  params={n: full(p) for n, p in model.named_parameters()})
    finally:
        torch._dynamo.reset()
    plain, comp = runs[False], runs[True]
    assert plain["frames"] == [0] * 5
    # step 0: 3 graphs; step 1; eval without grad: 3 more; generate: none; step 2: none
    assert comp["frames"] == [3, 3, 6, 6, 6] and comp["breaks"] == 0
    assert comp["params"].keys() == plain["params"].keys()
    torch.testing.assert_close(torch.tensor(comp["losses"]), torch.tensor(plain["losses"]), atol=0, rtol=1e-5)
    torch.testing.assert_close(comp["per_token"], plain["per_token"], atol=1e-5, rtol=1e-5)
    assert comp["sample"] == plain["sample"]
    for name, p in plain["params"].items():
        torch.testing.assert_close(comp["params"][name], p, atol=1e-5, rtol=1e-4, msg=name)

@pytest.mark.parametrize("stage", ["base", "mid", "sft", "rl"])
def test_compile_flag_parses_and_defaults_per_preset(stage):
    """--compile auto|on|off (default auto: on with CUDA, off on CPU; off for RL, whose shapes change every step)
    and --compile-backend on every stage, every preset; base's d20 batch per GPU follows the kernels (32 fused,
    16 eager) unless given."""
    import importlib

    from train.distributed import compile_enabled
    from train.stage import compile_setting
    mod = importlib.import_module(f"train.{stage}")
    for preset in mod.PRESETS:
        args = mod.parse_args(["--preset", preset])
        assert (args.compile, args.compile_backend) == ("auto", "inductor"), preset
        value = compile_setting(stage, args.compile)
        assert compile_enabled(value, "cuda") == (stage != "rl") and not compile_enabled(value, "cpu")
    args = mod.parse_args(["--compile", "off"])
    assert not compile_enabled(args.compile, "cuda")
    args = mod.parse_args(["--compile", "on", "--compile-backend", "aot_eager"])
    assert compile_enabled(compile_setting(stage, args.compile), "cpu") and args.compile_backend == "aot_eager"
    with pytest.raises(SystemExit):
        mod.parse_args(["--compile", "yes"])
    if stage == "base":
        batch = lambda *a: mod.parse_args(["--preset", "d20", *a]).device_batch_size
        assert (batch("--kernels", "fused"), batch("--kernels", "eager"), batch("--device-batch-size", "8")) == \
            (32, 16, 8)
        assert batch() == (32 if torch.cuda.is_available() else 16)  # auto: fused with CUDA
        assert mod.parse_args(["--preset", "tiny"]).device_batch_size == 8

def test_compile_enabled_rejects_unknown_values():
    from train.distributed import compile_enabled
    assert compile_enabled(True, "cpu") and not compile_enabled(False, "cuda")
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_enabled("maybe", "cpu")

@pytest.mark.gpu
def test_cuda_bf16_fsdp_single_process():
    """CUDA: 1-rank NCCL group, bf16 MixedPrecisionPolicy, Muon in bf16: trains and stays close to a plain fp32 model
    for the first step (bf16 compute: loose tolerance)."""
    import torch.distributed as dist

    import kernels
    from model.gpt import GPT, GPTConfig
    from train.distributed import build_model, cleanup, init_distributed
    owned = not dist.is_initialized()
    info = init_distributed("cuda")
    try:
        cfg = GPTConfig(sequence_len=256, vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, n_embd=512)
        torch.manual_seed(0)
        model = build_model(cfg, info)
        plain = GPT(cfg).cuda()
        torch.manual_seed(0)
        plain.init_weights()
        x = torch.randint(0, cfg.vocab_size, (4, cfg.sequence_len + 1), device="cuda")
        prev = kernels.get_mode()
        kernels.set_mode("eager")  # the fp32 reference on the references (fp32 Triton is FMA-only on Hopper)
        try:
            losses, want = [], plain(x[:, :-1], x[:, 1:]).item()
        finally:
            kernels.set_mode(prev)
        opts = model.setup_optimizers()
        for _ in range(10):
            loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            for opt in opts:
                opt.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[0] == pytest.approx(want, rel=2e-2)  # bf16 activations
        assert losses[-1] < 0.8 * losses[0]
    finally:
        if owned:
            cleanup()

def test_one_cpu_rank_leaves_the_root_plain_with_the_same_training(cpu_rank, eager_single_thread):
    """At one CPU rank build_model leaves wte and lm_head plain tensors (FSDP2 would only copy them) and shards the
    blocks; three clipped steps (train.loop.optimizer_step, DTensor blocks beside a plain root) give the same
    losses, gradient norms and parameters as the build whose root FSDP2 manages."""
    from torch.distributed.tensor import DTensor

    from model.gpt import GPTConfig
    from tests._dist_worker import CONFIG
    from train.distributed import build_model
    from train.loop import optimizer_step
    info = cpu_rank
    cfg = GPTConfig(**CONFIG)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.sequence_len + 1), generator=torch.Generator().manual_seed(7))
    runs = {}
    for shard_root in (None, True):
        torch.manual_seed(0)
        model = build_model(cfg, info, shard_root=shard_root)
        kinds = {n: isinstance(p, DTensor) for n, p in model.named_parameters()}
        opts = model.setup_optimizers()
        out = []
        for _ in range(3):
            loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            out.append((loss.item(), optimizer_step(model, opts, grad_clip=0.05).item()))
        runs[shard_root] = (kinds, out, {n: full(p).detach().clone() for n, p in model.named_parameters()})
    kinds, out, params = runs[None]
    assert [n for n, d in kinds.items() if not d] == ["transformer.wte.weight", "lm_head.weight"]
    assert all(runs[True][0].values())
    assert out == runs[True][1] and out[0][1] > 0.05  # the clip was active
    for name, p in params.items():
        torch.testing.assert_close(p, runs[True][2][name], atol=0, rtol=0, msg=name)
