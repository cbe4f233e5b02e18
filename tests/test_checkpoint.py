"""model/checkpoint.py: round trip (model, both optimizers, meta, loader + RNG states), atomicity when a save fails
midway or the disk is full, find_last_checkpoint, and load_model as a plain single-process GPT."""
import os

import pytest
import torch

import kernels
from model.common import full
from model.gpt import GPTConfig
from model import checkpoint as ck
from train.distributed import build_model, init_distributed

torch.manual_seed(0)
CFG = GPTConfig(sequence_len=16, vocab_size=97, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)

@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONCHAT_HOME", str(tmp_path))
    kernels.set_mode("eager")
    return tmp_path

def trained_model(steps=2, seed=0):
    torch.manual_seed(seed)
    model = build_model(CFG, init_distributed("cpu"))
    opts = model.setup_optimizers()
    for _ in range(steps):
        x = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len))
        model(x, x.roll(-1, 1)).backward()
        for o in opts:
            o.step()
            o.zero_grad()
    return model, opts

def flat_optim_state(opts):
    return [(k, full(v).clone()) for o in opts for s in o.state.values() for k, v in sorted(s.items())
            if isinstance(v, torch.Tensor)]

def test_round_trip(home):
    model, opts = trained_model()
    path = ck.step_dir("base", "r1", 2)
    meta = {"config": vars(CFG), "stage": "base", "kernels": "eager"}
    ck.save_checkpoint(path, 2, model, opts, meta, loader_state={"epoch": 0, "unit": 0, "doc": 5, "offset": 7})
    assert sorted(os.listdir(os.path.dirname(path))) == ["step_000002"]  # no temp dir left
    rng_after_save = torch.rand(3)

    model2, opts2 = trained_model(steps=1, seed=1)  # different weights and optimizer state
    got = ck.load_checkpoint(path, model2, opts2)
    assert got["step"] == 2 and got["stage"] == "base" and got["config"] == vars(CFG) and got["world_size"] == 1
    assert got["loader_states"] == [{"epoch": 0, "unit": 0, "doc": 5, "offset": 7}]
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(full(p), full(q)), n
    a, b = flat_optim_state(opts), flat_optim_state(opts2)
    assert len(a) == len(b) > 0 and all(k1 == k2 and torch.equal(v1, v2) for (k1, v1), (k2, v2) in zip(a, b))
    ck.set_rng_state(got["rng_states"][0])
    assert torch.equal(torch.rand(3), rng_after_save)

    # same step saved again: replaced atomically, still exactly one directory
    ck.save_checkpoint(path, 2, model, opts, meta)
    assert sorted(os.listdir(os.path.dirname(path))) == ["step_000002"]

def test_failure_mid_save_leaves_nothing(home, monkeypatch):
    model, opts = trained_model(steps=1)
    real_save = ck.dcp.save

    def save_then_crash(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # shard files are on disk ...
        raise OSError("disk went away")                # ... then the save dies before meta.json / rename

    monkeypatch.setattr(ck.dcp, "save", save_then_crash)
    path = ck.step_dir("base", "r1", 1)
    with pytest.raises(OSError, match="disk went away"):
        ck.save_checkpoint(path, 1, model, opts, {"config": vars(CFG)})
    assert os.listdir(os.path.dirname(path)) == []
    assert ck.find_last_checkpoint("base", "r1") is None

def test_no_disk_space_is_a_clear_error(home, monkeypatch):
    model, opts = trained_model(steps=1)
    need = ck.estimate_checkpoint_bytes(model, opts)
    assert need > sum(p.numel() * 4 for p in model.parameters())  # weights + Adam/Muon state
    usage = ck.shutil.disk_usage(str(home))
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage._replace(free=need // 2))
    path = ck.step_dir("base", "r1", 1)
    with pytest.raises(ck.UserError, match="not enough disk space .* GiB free"):
        ck.save_checkpoint(path, 1, model, opts, {"config": vars(CFG)})
    assert os.listdir(os.path.dirname(path)) == []

def test_find_last_checkpoint_ignores_partial(home):
    run = ck.checkpoint_dir("sft", "a")
    for d in ("step_000010", "step_000020", ".step_000030.tmp", "step_000040"):
        os.makedirs(os.path.join(run, d))
    for d in ("step_000010", "step_000020", ".step_000030.tmp"):
        open(os.path.join(run, d, "meta.json"), "w").write("{}")
    assert ck.find_last_checkpoint("sft", "a") == os.path.join(run, "step_000020")  # 40 has no meta.json
    assert ck.find_last_checkpoint("sft") == os.path.join(run, "step_000020")        # newest run by default
    assert ck.find_last_checkpoint("sft", "nope") is None and ck.find_last_checkpoint("rl") is None
    with pytest.raises(ck.UserError, match="no rl checkpoint"):
        ck.load_model("rl")

def test_load_model_single_process(home):
    model, opts = trained_model()
    ck.save_checkpoint(ck.step_dir("base", "r1", 2), 2, model, opts, {"config": vars(CFG), "stage": "base"})
    plain, tok, meta = ck.load_model("base")
    assert not any(hasattr(p, "device_mesh") for p in plain.parameters()) and not plain.training
    x = torch.randint(0, CFG.vocab_size, (2, CFG.sequence_len))
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-6, rtol=1e-6)
    assert meta["step"] == 2

class _Effect:
    """A pickle payload: unpickling it writes a file (what a pickle in someone else's checkpoint could do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib
        return pathlib.Path.write_text, (pathlib.Path(self.path), "unpickled")

def test_rng_state_is_data_never_unpickled(home, tmp_path):
    """RNG states are JSON values (torch bytes in base64, python/numpy numbers) that round-trip exactly; a
    meta.json whose rng state is a pickle (the older format) is never unpickled: resume goes on without it."""
    import base64
    import json
    import pickle
    import random

    import numpy as np
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = json.loads(json.dumps(ck.rng_state()))  # as meta.json stores it
    want = (torch.rand(4), random.random(), np.random.rand())
    assert ck.set_rng_state(state) is True
    assert torch.equal(torch.rand(4), want[0]) and random.random() == want[1] and np.random.rand() == want[2]

    marker = tmp_path / "unpickled"
    payload = base64.b64encode(pickle.dumps(_Effect(str(marker)))).decode("ascii")
    model, opts = trained_model(steps=1)
    path = ck.step_dir("base", "planted", 1)
    ck.save_checkpoint(path, 1, model, opts, {"config": vars(CFG)})
    meta = json.load(open(os.path.join(path, "meta.json")))
    meta["rng_states"] = [payload]
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    from train import loop
    saved = loop.resume("base", "planted", model, opts)
    assert saved["step"] == 1 and not marker.exists()
    assert ck.set_rng_state(payload) is False and not marker.exists()

def test_foreign_dcp_metadata_is_refused_before_unpickling(home, tmp_path):
    """DCP unpickles .metadata with plain pickle: a checkpoint whose .metadata names anything but DCP's own types
    is refused (one line) before DCP reads it, so loading never runs code stored in a checkpoint."""
    import pickle
    model, opts = trained_model(steps=1)
    path = ck.step_dir("base", "foreign", 1)
    ck.save_checkpoint(path, 1, model, opts, {"config": vars(CFG)})
    ck.load_model("base", path=path)  # DCP's own metadata passes the check
    marker = tmp_path / "unpickled"
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Effect(str(marker)), f)
    for load in (lambda: ck.load_model("base", path=path), lambda: ck.load_checkpoint(path, model, opts)):
        with pytest.raises(ck.UserError, match=r"\.metadata is not DCP metadata .*names pathlib\.Path\.write_text.* "
                                               r"refusing to unpickle it"):
            load()
        assert not marker.exists()
