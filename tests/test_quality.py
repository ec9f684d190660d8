"""`deltamem quality`: perplexity, KL divergence and top-1 agreement, checked against numbers computed
here from the engine's own logits; its guards (vocabulary mismatch, short text) and the command line."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import tiny_models
from pydeltamem import Model, quality, quantize

TEXT = tiny_models.TRAINING_TEXT


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def pair(tiny_gguf, tmp_path_factory):
    """(f32 base, its Q4_0 quantization) of the tiny untied Qwen3 (row length 64: Q4_0 blocks fit)."""
    base = tiny_gguf("qwen3-untied", "f32")
    other = tmp_path_factory.mktemp("quality") / "q4_0.gguf"
    quantize.quantize_gguf(base, other, "Q4_0", n_threads=2, progress=False)
    return base, other


def test_same_model_is_identical(pair):
    base, _ = pair
    r = quality.evaluate(str(base), str(base), TEXT, ctx=64)
    assert r.kl_mean < 1e-9 and r.kl_max < 1e-9
    assert r.top1_agreement == 1.0
    assert r.ppl_base == pytest.approx(r.ppl_other, rel=1e-9)


def test_numbers_match_a_direct_computation(pair):
    base, other = pair
    ctx = 48
    r = quality.evaluate(str(base), str(other), TEXT, n_tokens=100, ctx=ctx)
    with Model(base, n_ctx=ctx) as mb, Model(other, n_ctx=ctx) as mo:
        tokens = mb.tokenize(TEXT, add_special=False)[:100]
        nll_b, nll_o, kl, same = [], [], [], []
        for start in range(0, len(tokens), ctx):   # this tokenizer adds no BOS: chunks are plain slices
            chunk = tokens[start:start + ctx]
            if len(chunk) < 2:
                continue
            lb = _log_softmax(mb.context().decode(chunk, logits="all"))[:-1]
            lo = _log_softmax(mo.context().decode(chunk, logits="all"))[:-1]
            targets = np.asarray(chunk[1:])
            rows = np.arange(len(targets))
            nll_b += list(-lb[rows, targets])
            nll_o += list(-lo[rows, targets])
            kl += list((np.exp(lb) * (lb - lo)).sum(-1))
            same += list(lb.argmax(-1) == lo.argmax(-1))
    assert r.n_tokens == 100 and r.n_scored == len(kl) == 100 - math.ceil(100 / ctx)
    assert r.ppl_base == pytest.approx(math.exp(np.mean(nll_b)), rel=1e-6)
    assert r.ppl_other == pytest.approx(math.exp(np.mean(nll_o)), rel=1e-6)
    assert r.kl_mean == pytest.approx(np.mean(kl), rel=1e-6, abs=1e-12)
    assert r.kl_max == pytest.approx(np.max(kl), rel=1e-6)
    assert r.top1_agreement == pytest.approx(np.mean(same))
    assert 0 < r.kl_mean < r.kl_p99 <= r.kl_max


def test_guards(pair, tiny_gguf):
    base, _ = pair
    other_vocab = tiny_gguf("qwen3-tied", "f32")   # 13 extra ids: a different vocabulary size
    with pytest.raises(ValueError, match="different vocabularies"):
        quality.evaluate(str(base), str(other_vocab), TEXT)
    with pytest.raises(ValueError, match="too short"):
        quality.evaluate(str(base), str(base), "a")


def test_builtin_text_is_a_few_thousand_tokens():
    from pydeltamem.defaults import default_model_path

    with Model(default_model_path(), n_ctx=64) as m:
        n = len(m.tokenize(quality.BUILTIN_TEXT, add_special=False))
    assert 2500 <= n <= 6000


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pydeltamem.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_cli_table_and_json(pair, tmp_path):
    base, other = pair
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    table = _cli("quality", str(base), str(other), "--text", str(text), "--tokens", "80", "--ctx", "40")
    assert table.returncode == 0, table.stderr
    assert "perplexity" in table.stdout and "KL mean" in table.stdout and "top-1 agreement" in table.stdout
    as_json = _cli("quality", str(base), str(other), "--text", str(text), "--tokens", "80", "--ctx", "40", "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["n_tokens"] == 80 and report["n_scored"] == 78 and 0 <= report["top1_agreement"] <= 1
    missing = _cli("quality", str(base), str(other), "--text", str(tmp_path / "nope.txt"))
    assert missing.returncode == 1 and "no such file" in missing.stderr
