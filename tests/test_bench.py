"""The benchmark harness on CPU: schema, ratio arithmetic, the report table, the suite runner's error path."""
import json

import pytest
import torch

from bench import harness, report

def _fake_run(quick):
    rows = [harness.row("fake", {"n": 8}, "eager", "fwd", 2.0, flops=4e9),
            harness.row("fake", {"n": 8}, "fused", "fwd", 0.5, flops=4e9, bytes_=1e9),
            harness.row("fake", {"n": 8}, "fused", "bwd", 1.0)]  # no eager bwd -> no ratio
    return harness.add_ratios(rows, "eager")

def test_row_rates_and_ratios():
    rows = _fake_run(True)
    assert rows[0]["tflops"] == pytest.approx(4e9 / 2e-3 / 1e12)   # 2 TFLOP/s
    assert rows[1]["gbps"] == pytest.approx(1e9 / 0.5e-3 / 1e9)     # 2000 GB/s
    assert rows[0]["ratio"] == pytest.approx(1.0)
    assert rows[1]["ratio"] == pytest.approx(4.0)                   # 2.0 ms / 0.5 ms
    assert rows[2]["ratio"] is None

def test_bench_cpu_timing():
    t = harness.bench(lambda: torch.randn(64, 64) @ torch.randn(64, 64), quick=True)
    assert 0 < t["ms_p20"] <= t["ms"] <= t["ms_p80"]
    assert harness.peak_memory_mb(lambda: None) is None  # no CUDA here

def test_run_suite_json_schema_and_report(tmp_path):
    path = harness.run_suite("fake", _fake_run, quick=True, out_dir=str(tmp_path), png=True)
    data = json.load(open(path))
    assert data["suite"] == "fake" and len(data["rows"]) == 3
    info = data["info"]
    for key in ("device", "kind", "torch", "triton", "git_commit", "date", "driver", "cuda"):
        assert key in info
    assert info["kind"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert data["peaks"]["matmul_tflops"] > 0 and data["peaks"]["copy_gbps"] > 0
    assert (tmp_path / (path.split("/")[-1][:-5] + ".png")).exists()
    md = report.to_markdown(report.load_newest(str(tmp_path)))
    assert "| n=8 | fwd | fused | 0.5 | 8 | 2e+03 | 4.00 |" in md

def test_report_keeps_newest_per_suite_and_device(tmp_path):
    for date, ms in (("2026-01-01T00:00:00Z", 1.0), ("2026-02-01T00:00:00Z", 3.0)):
        info = {"device": "gpu-x", "date": date, "kind": "cuda"}
        rows = [harness.row("s", {"n": 1}, "eager", "fwd", ms)]
        (tmp_path / f"s-{date[:10]}.json").write_text(json.dumps({"suite": "s", "info": info, "rows": rows}))
    (tmp_path / "junk.json").write_text("{not json")
    newest = report.load_newest(str(tmp_path))
    assert len(newest) == 1 and newest[0]["rows"][0]["ms"] == 3.0

def test_mfu_and_projection_arithmetic():
    from bench.train import device_peak_flops, mfu, project_speedrun
    # 500 tok/s x 1e9 FLOP/tok = 5e11 FLOP/s on a 1e12 peak = 50 %; two devices halve it.
    assert mfu(500, 1e9, 1e12) == pytest.approx(50.0)
    assert mfu(500, 1e9, 1e12, world_size=2) == pytest.approx(25.0)
    assert mfu(500, 1e9, None) is None
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("Some New GPU", measured=123.0) == 123.0
    # d20 (561 M params) at 20 tokens/param = 11.22 B tokens; 8 GPUs at 50 k tok/s each = 400 k tok/s -> 7.79 h
    p = project_speedrun(561e6, 50_000)
    assert p["tokens"] == pytest.approx(11.22e9)
    assert p["hours"] == pytest.approx(11.22e9 / 400_000 / 3600)

def test_telemetry_unavailable_is_reported_not_raised(monkeypatch):
    import builtins
    from bench.train import Telemetry
    real_import = builtins.__import__

    def no_pynvml(name, *a, **k):
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    with Telemetry(interval=0.01) as t:
        pass
    s = t.summary()
    assert s["status"] == "unavailable" and "pynvml" in s["reason"]

def test_train_profiler_runs_on_cpu(tmp_path):
    import json as _json
    from bench import train as bench_train
    rows = bench_train.main(["--depth", "1", "--seq-len", "32", "--device-batch-size", "2", "--vocab-size", "256",
                             "--steps", "1", "--warmup", "1", "--kernels", "eager", "--out", str(tmp_path)])
    (r,) = rows
    assert r["provider"] == "eager" and r["ratio"] == pytest.approx(1.0)
    assert r["tokens_per_s"] == pytest.approx(2 * 32 / (r["ms"] / 1e3))
    assert set(r["phases_ms"]) == {"forward", "backward", "optimizer"}
    assert r["telemetry"]["status"] in ("ok", "unavailable")
    assert _json.load(open(next(tmp_path.glob("train-*.json"))))["rows"][0]["flops_per_token"] > 0

def test_train_profiler_four_way_and_plain_build_on_cpu(tmp_path, eager_single_thread):
    """--compile off,on x --build fsdp,plain (aot_eager: traced, no C++ build): four rows named as the table names
    them, ratios to eager+compile, compiled rows with graphs but no graph break and no recompile after warm-up."""
    from bench import train as bench_train
    rows = bench_train.main(["--depth", "1", "--seq-len", "32", "--device-batch-size", "2", "--vocab-size", "256",
                             "--steps", "1", "--warmup", "1", "--kernels", "eager", "--compile", "off,on",
                             "--compile-backend", "aot_eager", "--build", "fsdp,plain", "--out", str(tmp_path)])
    by = {r["provider"]: r for r in rows}
    assert list(by) == ["eager", "eager+compile", "eager (plain)", "eager+compile (plain)"]
    assert by["eager+compile"]["ratio"] == pytest.approx(1.0)
    for name, r in by.items():
        assert r["tokens_per_s"] > 0 and r["ratio"] > 0 and r["graph_breaks"] == 0 and r["recompiles"] == 0, name
        assert r["graphs"] == {"eager": 0, "eager+compile": 3, "eager (plain)": 0, "eager+compile (plain)": 1}[name]

def test_report_prefers_a_full_run_over_a_newer_quick_one(tmp_path):
    for name, date, quick, ms in (("full", "2026-01-01T00:00:00Z", False, 1.0),
                                  ("q", "2026-02-01T00:00:00Z", True, 9.0)):
        info = {"device": "gpu-x", "date": date, "kind": "cuda"}
        rows = [harness.row("s", {"n": 1}, "eager", "fwd", ms)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"suite": "s", "quick": quick, "info": info, "rows": rows}))
    (newest,) = report.load_newest(str(tmp_path))
    assert newest["rows"][0]["ms"] == 1.0

@pytest.mark.parametrize("module, argv, words", [
    ("kernels", ["--suite", "nope"], "unknown suite"),
    ("attention", ["--out", "/proc/no/such/dir"], "cannot create"),
    ("train", ["--build", "bogus"], "unknown value 'bogus'"),
    ("train", ["--depth", "0"], "must be >= 1"),
    ("train", ["--compile", "maybe"], "unknown value 'maybe' in --compile"),
    ("train", ["--warmup", "0"], "must be >= 1"),
    ("engine", ["--peer", "/nonexistent"], "not a nanochat checkout"),
    ("engine", ["--samples", "1,x"], "expected an integer"),
    ("serve", ["--clients", "0"], "must be >= 1"),
    ("serve", ["--width", "100"], "multiple of 64"),
])
def test_bad_flags_are_one_line_and_exit_2(module, argv, words, capsys):
    """Every benchmark entry point answers a bad flag with one line on stderr and status 2, before any work."""
    mod = __import__(f"bench.{module}", fromlist=["main"])
    main = mod.main if module != "attention" else lambda a: harness.main("attention", mod.run, a)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err
