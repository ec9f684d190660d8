"""Weights in ggml's CPU repack buffer (interleaved for its faster q4_K kernels) give the same model.
(q4_0 stays out of it where the engine's own kernel takes it: tests/test_qmatmul.py.)"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import pydeltamem
import tiny_models
from pydeltamem.convert.hf_to_gguf import convert_hf_to_gguf
from pydeltamem.quantize import quantize_gguf


@pytest.fixture(scope="module")
def q4_k_model(tmp_path_factory):
    """A one-layer Qwen3 256 wide (q4_K's block), quantized Q4_K_S."""
    root = tmp_path_factory.mktemp("repack")
    spec = dataclasses.replace(tiny_models.TINY_SPECS["qwen3-untied"], name="qwen3-256", config=dict(
        tiny_models.TINY_SPECS["qwen3-untied"].config, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=128))
    f32 = root / "qwen3-256.f32.gguf"
    convert_hf_to_gguf(tiny_models.build_checkpoint(spec, root / "hf"), f32, "f32", progress=False)
    out = root / "qwen3-256.Q4_K_S.gguf"
    quantize_gguf(f32, out, "Q4_K_S", progress=False)
    return out


def test_repacked_weights_compute_the_same_logits(q4_k_model):
    tokens = list(range(3, 60))
    logits = {}
    for repack in (True, False):
        with pydeltamem.Model(q4_k_model, use_repack=repack, kv_type="f32") as m:
            logits[repack] = m.context().decode(tokens, logits="all")
            assert (m.n_repacked > 0) == repack
    a, b = logits[True], logits[False]
    # Both paths quantise activations to q8_K blocks, each with its own routine: nearly every position
    # agrees to the last bits, and where a value rounds the other way (measured: one position of 57,
    # 1.6e-2) this random model amplifies it.
    per_position = np.abs(a - b).max(-1) / np.abs(b).max()
    assert int(np.sum(per_position > 1e-5)) <= 2
    assert float(per_position.max()) < 3e-2
    assert float(np.mean(a.argmax(-1) == b.argmax(-1))) > 0.95


def test_types_without_repack_kernels_stay_mapped(tiny_gguf):
    with pydeltamem.Model(tiny_gguf("qwen3-untied", "f32")) as m:
        assert m.n_repacked == 0
