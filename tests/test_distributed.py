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


def test_in_process_fsdp_matches_plain_model_with_eval_forwards():
    """World size 1 in this process: FSDP2 model == plain GPT, even with forwards without backward (eval, sampling)
    between backward and the optimizer step, which go stale if the root keeps its parameters gathered."""
    import kernels
    from model.gpt import GPT, GPTConfig
    from train.distributed import build_model, cleanup, init_distributed
    from tests._dist_worker import CONFIG
    prev, threads = kernels.get_mode(), torch.get_num_threads()
    kernels.set_mode("eager")
    torch.set_num_threads(1)  # tiny shapes; spinning OpenMP threads on a shared 2-core box cost 10x
    import torch.distributed as dist
    owned = not dist.is_initialized()  # another test may have left its group up: reuse it, leave it up
    info = init_distributed("cpu")
    try:
        assert (info.is_dist, info.rank, info.world_size, info.device.type) == (False, 0, 1, "cpu")
        cfg = GPTConfig(**CONFIG)
        torch.manual_seed(0)
        model = build_model(cfg, info)
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
            torch.testing.assert_close(p.full_tensor(), q, atol=1e-6, rtol=1e-5, msg=name)
    finally:
        if owned:
            cleanup()
        kernels.set_mode(prev)
        torch.set_num_threads(threads)


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
