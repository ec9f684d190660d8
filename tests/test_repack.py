"""Weights in ggml's CPU repack buffer (interleaved for its faster q4_0 kernels) give the same model."""
from __future__ import annotations

import numpy as np
import pytest

import pydeltamem
from pydeltamem.quantize import quantize_gguf


@pytest.fixture(scope="module")
def q4_0_model(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("repack") / "qwen3-untied.Q4_0.gguf"
    quantize_gguf(tiny_gguf("qwen3-untied", "f32"), out, "Q4_0", progress=False)
    return out


def test_repacked_weights_compute_the_same_logits(q4_0_model):
    tokens = list(range(3, 60))
    logits = {}
    for repack in (True, False):
        with pydeltamem.Model(q4_0_model, use_repack=repack, kv_type="f32") as m:
            logits[repack] = m.context().decode(tokens, logits="all")
            assert (m.n_repacked > 0) == repack
    a, b = logits[True], logits[False]
    # Both paths quantise activations to q8_0 blocks; only the order of the sums differs.
    assert float(np.abs(a - b).max() / np.abs(b).max()) < 1e-2
    assert float(np.mean(a.argmax(-1) == b.argmax(-1))) > 0.95


def test_types_without_repack_kernels_stay_mapped(tiny_gguf):
    with pydeltamem.Model(tiny_gguf("qwen3-untied", "f32")) as m:
        assert m.n_repacked == 0
