"""Official δ-mem releases from the Hub: Model.from_pretrained(..., adapter_repo=...) and the CLI's
--adapter REPO_ID, served offline by a Hugging Face cache the test builds (release files as the
official code saves them: delta_mem_config.json + delta_mem_adapter.pt)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pydeltamem
from dmem_fixtures import VARIANTS, make_adapter, write_adapter
from pydeltamem import hub
from pydeltamem.convert.adapter import convert_adapter
from test_hub import build_hub_cache, offline  # noqa: F401  (offline is a fixture)

MODEL_REPO = "example-org/tiny-qwen3-GGUF"
ADAPTER_REPO = "example-org/tiny-delta-mem"


@pytest.fixture(scope="module")
def release(tiny_gguf, tiny_reference, tmp_path_factory):
    """(backbone GGUF, release folder written as the official code saves it, the same release converted directly)."""
    gguf_path = tiny_gguf("qwen3-untied", "f32")
    root = tmp_path_factory.mktemp("hub_release")
    config, tensors = make_adapter(tiny_reference("qwen3-untied").config, VARIANTS["released"])
    folder = write_adapter(root / "release", config, tensors)
    direct = convert_adapter(folder, root / "direct.gguf", base=gguf_path)
    return Path(gguf_path), folder, direct


@pytest.fixture
def cache(tmp_path, release):
    gguf_path, folder, _ = release
    root = build_hub_cache(tmp_path / "hub", MODEL_REPO, {"tiny-qwen3-f32.gguf": gguf_path})
    return build_hub_cache(root, ADAPTER_REPO, {name: folder / name for name in os.listdir(folder)})


def _conversions(monkeypatch) -> list:
    """Counts the conversions hub.adapter_gguf_from_hub runs (it imports convert_adapter at call time)."""
    from pydeltamem.convert import adapter as adapter_module

    calls = []
    real = adapter_module.convert_adapter

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(adapter_module, "convert_adapter", counting)
    return calls


def test_from_pretrained_with_an_adapter_repo(offline, cache, release, monkeypatch):
    _, _, direct = release
    conversions = _conversions(monkeypatch)
    kwargs = dict(cache_dir=cache, adapter_repo=ADAPTER_REPO, n_ctx=64, n_threads=1)
    with pydeltamem.Model.from_pretrained(MODEL_REPO, "*.gguf", **kwargs) as m, \
            pydeltamem.Model(m.model_path, adapter=direct, n_ctx=64, n_threads=1) as ref:
        assert m.adapter["fingerprint"] == ref.adapter["fingerprint"]
        tokens = [5, 17, 33, 2, 40]
        np.testing.assert_array_equal(m.context().decode(tokens), ref.context().decode(tokens))
    assert len(conversions) == 1
    converted = Path(conversions[0][1])
    # The converted GGUF lives in the release's own cache folder.
    assert converted.is_file() and (cache / ("models--" + ADAPTER_REPO.replace("/", "--"))) in converted.parents

    # Once converted, later loads reuse the file.
    with pydeltamem.Model.from_pretrained(MODEL_REPO, "*.gguf", **kwargs) as m:
        assert m.adapter["fingerprint"] == ref_fingerprint(direct)
    assert len(conversions) == 1


def ref_fingerprint(path) -> str:
    from gguf import GGUFReader

    return GGUFReader(path, "r").fields["deltamem.fingerprint"].contents()


def test_adapter_repo_for_another_model_is_refused(offline, cache, tiny_gguf):
    other = tiny_gguf("llama-gqa", "f32")   # other widths and layer count than the release's backbone
    with pytest.raises(ValueError):
        hub.adapter_gguf_from_hub(ADAPTER_REPO, other, cache_dir=cache)


def test_a_repo_that_is_no_release_is_refused(offline, cache):
    with pytest.raises(ValueError, match="not a δ-mem adapter release"):
        hub.adapter_gguf_from_hub(MODEL_REPO, cache / "unused.gguf", cache_dir=cache)


def test_uncached_adapter_repo_offline_is_a_clear_error(offline, cache, release):
    gguf_path, _, _ = release
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        hub.adapter_gguf_from_hub("example-org/never-downloaded", gguf_path, cache_dir=cache)


def test_both_adapter_and_adapter_repo_is_an_error(offline, cache, release):
    _, _, direct = release
    with pytest.raises(ValueError, match="not both"):
        pydeltamem.Model.from_pretrained(MODEL_REPO, "*.gguf", cache_dir=cache, adapter=direct, adapter_repo=ADAPTER_REPO)


def test_cli_adapter_repo_id(cache, release, tmp_path):
    gguf_path, _, _ = release
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    run = subprocess.run([sys.executable, "-m", "pydeltamem.cli", "chat", "-m", f"{MODEL_REPO}:*.gguf",
                          "--adapter", ADAPTER_REPO, "-n", "2", "--temp", "0", "-c", "128", "-t", "1"],
                         input="hello\n/memory\n", capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "memory norms per layer:" in run.stderr
