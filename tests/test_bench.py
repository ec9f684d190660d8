"""Smoke test of the benchmark harness (bench/, `deltamem bench`) on a tiny random Qwen3.

It checks that the harness runs end to end — model and adapter generation, worker processes, the
table and the JSON report — never how fast anything is.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


def _load_bench():
    from pydeltamem.bench import bench, make_models   # the installed harness (the repo's bench/ folder)

    return bench, make_models


def bench_args(harness, model, tmp_path, json_out, *extra: str):
    """`deltamem bench` arguments for two quick runs (pp 8, tg 4) of `model`."""
    import argparse

    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    return parser.parse_args(["--model", str(model), "--runs", "2", "--pp", "8", "--tg", "4", "--json", str(json_out),
                              "--cache-dir", str(tmp_path / "cache"), *extra])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    _, mm = _load_bench()
    folder = tmp_path_factory.mktemp("bench")
    return mm.qwen3_model("q8_0", TINY, "tiny", folder, log=lambda *_: None)


def test_adapter_for_model_gguf(tiny_model, tmp_path):
    _, mm = _load_bench()
    from gguf import GGUFReader

    path = mm.adapter_for(tiny_model, tmp_path)
    assert path == mm.adapter_for(tiny_model, tmp_path)   # cached
    fields = GGUFReader(path, "r").fields
    assert fields["adapter.type"].contents() == "delta-mem"
    names = {t.name for t in GGUFReader(path, "r").tensors}
    assert any(n.startswith("blk.1.dmem_") for n in names)


def test_requantize_q4_0(tiny_model, tmp_path):
    _, mm = _load_bench()
    from gguf import GGUFReader, GGMLQuantizationType

    out = mm.requantize(tiny_model, tmp_path / "tiny-q4_0.gguf", "q4_0")
    types = {t.name: t.tensor_type for t in GGUFReader(out, "r").tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q4_0
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32


def test_harness_runs_and_reports_json(tiny_model, tmp_path, capsys):
    harness, _ = _load_bench()
    out = tmp_path / "report.json"
    args = bench_args(harness, tiny_model, tmp_path, out, "--threads", "1", "--no-llamacpp")
    # A harness far larger than its workers: their peak RSS must be their own (fork + exec keeps
    # the parent's in getrusage's ru_maxrss).
    import numpy as np

    ballast = np.ones(512 << 20, dtype=np.uint8)
    assert harness.run_cli(args) == 0
    del ballast
    table = capsys.readouterr().out
    assert "| ours |" in table and "| ours+dmem |" in table and "ours+dmem / ours" in table
    report = json.loads(out.read_text())
    assert report["params"]["pp"] == 8 and report["params"]["tg"] == 4
    (res,) = report["results"]
    assert res["threads"] == 1 and res["order"] == ["ours", "ours+dmem"]
    for name in ("ours", "ours+dmem"):
        c = res["contenders"][name]
        assert c["errors"] == [] and c["runs_ok"] == 2
        assert c["pp_tps_median"] > 0 and c["tg_tps_median"] > 0 and 0 < c["maxrss_mib"] < 400
        assert len(c["tg_tps_runs"]) == 2 and c["tg_max_over_min"] >= 1.0
    for key in ("ours+dmem / ours tg", "ours+dmem / ours tg-token"):
        ratio = res["ratios"][key]
        assert len(ratio["runs"]) == 2 and ratio["median"] > 0
    assert "(median token)" in table


def test_paired_measure_reports_json(tiny_model, tmp_path, capsys):
    harness, _ = _load_bench()
    out = tmp_path / "paired.json"
    args = bench_args(harness, tiny_model, tmp_path, out, "--threads", "2", "--paired", "10")
    assert harness.run_cli(args) == 0
    table = capsys.readouterr().out
    assert "10 token pairs" in table and "| tg range over processes |" in table
    (res,) = json.loads(out.read_text())["results"]
    assert res["threads"] == 2 and res["paired"] == 10 and res["errors"] == [] and res["runs_ok"] == 2
    for run in res["runs"]:
        assert len(run["pp_ratios"]) == harness.PAIRED_PP_PAIRS and run["tg_geomean"] > 0 and run["tg_geomean_se"] > 0
    lo, hi = res["tg_geomean_range"]
    assert lo <= res["tg_geomean_median"] <= hi


def test_paired_measure_needs_the_adapter(tiny_model, tmp_path):
    harness, _ = _load_bench()
    with pytest.raises(ValueError, match="no-dmem"):
        harness.run_bench([str(tiny_model)], [1], 1, 8, 4, [], dmem=False, paired=10, adapter_dir=str(tmp_path))


def test_parallel_measure_reports_json(tiny_model, tmp_path, capsys):
    harness, _ = _load_bench()
    out = tmp_path / "parallel.json"
    args = bench_args(harness, tiny_model, tmp_path, out, "--threads", "1", "--parallel", "1,3", "--no-llamacpp")
    assert harness.run_cli(args) == 0
    table = capsys.readouterr().out
    assert "Aggregate tg t/s of N sequences" in table and "ours+dmem vs N=1" in table
    report = json.loads(out.read_text())
    assert [r["n"] for r in report["results"]] == [1, 3]
    for res in report["results"]:
        assert len(res["tg_tps_runs"]["ours"]) == 2 and len(res["tg_tps_runs"]["ours+dmem"]) == 2
        assert all(v > 0 for v in res["tg_tps_median"].values())


@pytest.mark.parametrize("worker", ["llamacpp_worker.py", "llamacpp_parallel_worker.py"])
def test_llamacpp_worker_is_standalone(worker):
    """The llama.cpp workers run in another venv: they may import nothing from pydeltamem."""
    source = (REPO / "bench" / worker).read_text()
    assert "pydeltamem" not in source.replace("pydeltamem's", "").split('"""', 2)[2]


def test_llamacpp_venvs_found_in_cache(tmp_path, monkeypatch):
    """Both llama.cpp builds --setup-llamacpp makes are benchmarked when present."""
    harness, _ = _load_bench()
    monkeypatch.delenv("PYDELTAMEM_BENCH_LLAMACPP_PYTHON", raising=False)
    monkeypatch.setenv("PYDELTAMEM_BENCH_CACHE", str(tmp_path))
    assert harness.default_llamacpp_pythons() == []
    for venv in ("venv-llamacpp", "venv-llamacpp-avx2"):
        (tmp_path / venv / "bin").mkdir(parents=True)
        (tmp_path / venv / "bin" / "python").write_text("")
    found = harness.default_llamacpp_pythons()
    assert [label for label, _ in found] == ["llama.cpp", "llama.cpp-avx2"]
    assert found[1][1] == str(tmp_path / "venv-llamacpp-avx2" / "bin" / "python")
    monkeypatch.setenv("PYDELTAMEM_BENCH_LLAMACPP_PYTHON", "/opt/x/bin/python")
    assert harness.default_llamacpp_pythons() == [("llama.cpp", "/opt/x/bin/python")]
