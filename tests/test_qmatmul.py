"""The engine's own CPU mat-mul for q4_0, q4_1 and q8_0 weights (native/src/matmul/qmatmul.h).

Oracle: a float64 product of the weights as gguf-py dequantizes them (its own reading of ggml's block
formats) with the activations quantized by the documented rule (blocks of 32, d = max|x| / 127,
q = round(x / d), ties to even), written here in numpy. Every kernel this CPU runs is checked (AMX
with its packed weights, AVX-512 VNNI and AVX2, the others in processes with DELTAMEM_NO_AMX=1 or
DELTAMEM_NO_AVX512=1), on shapes AMX packs (rows a multiple of 16, an even number of blocks) and
shapes it leaves to VNNI. A column must get the same bits alone and in any batch: lone and batched
decoding rely on it. Whole models through the
kernel are checked against ggml's own mat-mul (DELTAMEM_NO_QMATMUL=1, in another process) and, for
SmolLM2 Q4_1 and q8_0/q4_0 tiny models, against transformers by test_backbone's bounds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gguf
from gguf.quants import dequantize

from pydeltamem import _core
from pydeltamem.quantize import quantize_gguf

TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 8}
KERNEL = _core.quant_matmul_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="this CPU has no AVX2: ggml's mul_mat serves every type")


def quantized_activations(x: np.ndarray) -> np.ndarray:
    """x [n, k] as the kernel reads it, in float64: 8-bit blocks of 32, in float32 arithmetic."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    d = np.abs(blocks).max(-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.round(blocks * inv)   # numpy rounds ties to even, as the kernel's conversion does
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def check_against_float64(seed: int = 0) -> float:
    """Worst error, relative to the magnitude of the summed terms, over types and shapes (odd block
    counts, row and column tails); asserts that a column's bits do not depend on the batch around
    it."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for name, t in TYPES.items():
        for k in (32, 96, 576):
            for rows, n in ((1, 1), (5, 3), (13, 9), (8, 70), (16, 1), (32, 9), (48, 70)):
                w = rng.standard_normal((rows, k)).astype(np.float32)
                if k > 32:
                    w[0, :32] = 0.0   # an all-zero block (scale 0)
                wq = _core.quantize_rows(t, w, 1)
                w64 = dequantize(wq, gguf.GGMLQuantizationType(t)).reshape(rows, k).astype(np.float64)
                x = (rng.standard_normal((n, k)) * 3).astype(np.float32)
                if k > 32:
                    x[-1, 32:64] = 0.0   # an all-zero activation block
                y = _core.quant_matmul(t, wq, rows, x)
                xq = quantized_activations(x)
                ref = xq @ w64.T
                # Relative to the size of the terms summed: one output can cancel to near zero.
                scale = np.abs(xq) @ np.abs(w64).T
                worst = max(worst, float((np.abs(y - ref) / scale.max()).max()))
                for c in {0, n // 2, n - 1}:
                    alone = _core.quant_matmul(t, wq, rows, x[c:c + 1])
                    assert np.array_equal(alone[0], y[c]), (name, k, rows, n, c)
    return worst


@needs_kernel
def test_kernel_matches_float64_reference():
    assert check_against_float64() < 1e-5


# The narrower kernels this CPU can also run, and the variable that selects each.
NARROWER = {"amx-int8": [("DELTAMEM_NO_AMX", "avx512-vnni"), ("DELTAMEM_NO_AVX512", "avx2")],
            "avx512-vnni": [("DELTAMEM_NO_AVX512", "avx2")]}.get(KERNEL, [])


@needs_kernel
@pytest.mark.skipif(not NARROWER, reason="this CPU runs AVX2 already (the test above covers it)")
@pytest.mark.parametrize("variable, kernel", NARROWER)
def test_narrower_kernels_match_float64_reference(variable, kernel):
    script = ("import json, test_qmatmul as t; from pydeltamem import _core; "
              "print(json.dumps([_core.quant_matmul_kernel(), t.check_against_float64(1)]))")
    env = dict(os.environ, **{variable: "1"})
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(__file__))
    ran, worst = json.loads(out.stdout.strip().splitlines()[-1])
    assert ran == kernel
    assert worst < 1e-5


@needs_kernel
def test_the_reference_is_not_the_float_product():
    """The 8-bit activations are the kernel's (and ggml's) arithmetic: the float product differs by
    far more than the bound above, so that bound tells them apart."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    wq = _core.quantize_rows(TYPES["q8_0"], w, 1)
    w64 = dequantize(wq, gguf.GGMLQuantizationType.Q8_0).reshape(16, 256).astype(np.float64)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    y = _core.quant_matmul(TYPES["q8_0"], wq, 16, x)
    exact = x.astype(np.float64) @ w64.T
    assert 1e-4 < float(np.abs(y - exact).max() / np.abs(exact).max()) < 3e-2


@needs_kernel
@pytest.mark.parametrize("call, match", [
    (lambda wq, x: _core.quant_matmul(1, wq, 4, x), "q4_0, q4_1 and q8_0"),               # f16
    (lambda wq, x: _core.quant_matmul(2, wq, 4, x[:, :48]), "multiple of 32"),
    (lambda wq, x: _core.quant_matmul(2, wq[:2], 4, x), "bytes"),                          # short weights
    (lambda wq, x: _core.quant_matmul(2, wq, 0, x), "bad shape"),
    (lambda wq, x: _core.quant_matmul(99, wq, 4, x), "type 99"),
])
def test_bad_arguments_raise(call, match):
    wq = _core.quantize_rows(TYPES["q4_0"], np.ones((4, 64), np.float32), 1)
    with pytest.raises(ValueError, match=match):
        call(wq, np.ones((2, 64), np.float32))


LOGITS = """
import json, sys, pydeltamem
with pydeltamem.Model(sys.argv[1], n_ctx=128, kv_type="f32") as m:
    ctx = m.context()
    prompt = ctx.decode(json.loads(sys.argv[2]), logits="all")
    step = ctx.decode([7, 8, 9], logits="all")
    print(json.dumps({"n_repacked": m.n_repacked, "logits": prompt.tolist() + step.tolist()}))
"""


def model_logits(path, tokens, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", LOGITS, str(path), json.dumps(tokens)], env=env, capture_output=True,
                         text=True, check=True)
    res = json.loads(out.stdout)
    return res["n_repacked"], np.array(res["logits"], dtype=np.float32)


@needs_kernel
@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q8_0"])
def test_models_through_the_kernel_match_ggml_mul_mat(tiny_gguf, tmp_path, quant):
    """Every projection and the output layer of a quantized tiny model through the kernel, against
    the same model through ggml's kernels, which round the activations the same way but keep their
    block scales in f16 (the kernel keeps f32): the two agree closely, and the kernel is no farther
    than ggml from the unquantized model. Q4_0 stays out of ggml's repack buffer (the kernel takes it;
with AMX the kernel packs its own copies)."""
    f32 = tiny_gguf("qwen3-untied", "f32")
    path = tmp_path / f"qwen3-untied.{quant}.gguf"
    quantize_gguf(f32, path, quant, progress=False)
    tokens = list(range(3, 40))
    n_ours, ours = model_logits(path, tokens)
    _, ggml = model_logits(path, tokens, {"DELTAMEM_NO_QMATMUL": "1"})
    _, exact = model_logits(f32, tokens)
    assert (n_ours > 0) == (KERNEL == "amx-int8")   # the AMX kernel's packed copies; ggml's repack buffer takes none

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    assert rel(ours, ggml) < 3e-2
    assert float(np.mean(ours.argmax(-1) == ggml.argmax(-1))) > 0.95
    assert rel(ours, exact) < 1.1 * rel(ggml, exact)
