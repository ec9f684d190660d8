"""Shared fixtures: tiny Hugging Face checkpoints (built once per session) and their GGUF conversions."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib, which does not put tests/ on sys.path; the helper
# modules here (tiny_models, dmem_fixtures, ...) are imported by plain name.
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import tiny_models  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds (real model); still part of the default run")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(name) -> folder of the tiny HF checkpoint `name` (a key of tiny_models.TINY_SPECS)."""
    root = tmp_path_factory.mktemp("hf")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tiny_models.build_checkpoint(tiny_models.TINY_SPECS[name], root / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(tiny_checkpoint, tmp_path_factory):
    """tiny_gguf(name, outtype) -> GGUF file converted from the tiny checkpoint `name` (cached per session)."""
    from pydeltamem.convert.hf_to_gguf import convert_hf_to_gguf

    root = tmp_path_factory.mktemp("gguf")
    converted: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str) -> Path:
        key = (name, outtype)
        if key not in converted:
            out = root / f"{name}.{outtype}.gguf"
            convert_hf_to_gguf(tiny_checkpoint(name), out, outtype, progress=False)
            converted[key] = out
        return converted[key]

    return get


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    """tiny_reference(name) -> the transformers float32 model loaded from the saved checkpoint (cached)."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = tiny_models.load_reference(tiny_checkpoint(name))
        return loaded[name]

    return get


@pytest.fixture
def decoded_prompt_lengths(monkeypatch):
    """Records how many prompt tokens each call of the C++ generation loop had to decode."""
    from pydeltamem import _core

    lengths: list[int] = []
    real_generate = _core.generate

    def spy(ctx_ptr, sampler_ptr, prompt, *rest, **kwargs):
        lengths.append(len(prompt))
        return real_generate(ctx_ptr, sampler_ptr, prompt, *rest, **kwargs)

    monkeypatch.setattr(_core, "generate", spy)
    return lengths


@pytest.fixture(autouse=True)
def _run_outside_the_source_tree(monkeypatch, tmp_path_factory):
    """Tests (and the subprocesses they start) run from a scratch folder: from the repository root,
    `python -m pydeltamem...` would import the source folder, which has no compiled extension,
    instead of the installed package under test."""
    monkeypatch.chdir(tmp_path_factory.getbasetemp())
