"""δ-mem in the engine against the independent float64 reference (tests/dmem_reference.py).

Every adapter has all weights non-zero, is written in the reference release format, converted with
`deltamem convert-adapter`, and run through `Model(..., adapter=...)` over a multi-call session
(prefill, single-token decodes with and without writes, another prefill).
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest

import pydeltamem
from dmem_fixtures import NO_HEADS, VARIANTS, make_adapter, run_session, session_calls, write_adapter
from dmem_reference import DeltaMemReference, bare_logits_session
from pydeltamem.convert.adapter import convert_adapter

BACKBONES = {"qwen3": "qwen3-untied", "llama": "llama-gqa", "llama-bias": "llama-bias", "smollm3": "smollm3-nope"}
F32_TOL = 1e-4


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def backbone(tiny_checkpoint, tiny_gguf, tiny_reference):
    """backbone(arch) -> (f32 GGUF path, float32 HF model, checkpoint folder)."""
    def get(arch: str):
        name = BACKBONES[arch]
        return tiny_gguf(name, "f32"), tiny_reference(name), tiny_checkpoint(name)
    return get


def convert(tmp_path, hf_model, gguf_path, overrides, *, fmt="pt", zero_corrections=False, seed=0, outtype="auto"):
    """A random adapter (bf16 release files, so outtype auto gives f16 matrices) converted to GGUF."""
    config, tensors = make_adapter(hf_model.config, overrides, seed=seed, zero_corrections=zero_corrections)
    folder = write_adapter(tmp_path / "adapter_src", config, tensors, fmt=fmt)
    out = tmp_path / f"adapter-{outtype}.gguf"
    convert_adapter(folder, out, base=gguf_path, outtype=outtype)
    return config, tensors, out


def engine_session(model: pydeltamem.Model, calls, **ctx_kwargs) -> tuple[np.ndarray, pydeltamem.Context]:
    ctx = model.context(kv_type="f32", **ctx_kwargs)
    outs = [ctx.decode(c["tokens"], logits="all", message_ids=c["message_ids"], sentence_ids=c["sentence_ids"],
                       write=c["write"]) for c in calls]
    return np.concatenate(outs), ctx


def reference_session(hf_model, config, tensors, calls) -> tuple[np.ndarray, np.ndarray]:
    ref = DeltaMemReference(copy.deepcopy(hf_model), config, tensors)
    logits = run_session(ref, calls).numpy()
    return logits, ref.memory.numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_float64_reference(variant, backbone, tmp_path):
    """f32 matrices: the engine's arithmetic against the reference's, with nothing rounded between."""
    gguf_path, hf_model, _ = backbone("qwen3")
    config, tensors, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS[variant], outtype="f32")
    calls = session_calls(hf_model.config.vocab_size)
    ref_logits, ref_memory = reference_session(hf_model, config, tensors, calls)
    bare = bare_logits_session(copy.deepcopy(hf_model), [c["tokens"] for c in calls]).numpy()

    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64) as m:
        got, ctx = engine_session(m, calls)
        memory = ctx.memory

    err = rel_err(got, ref_logits)
    effect = rel_err(ref_logits, bare)
    top1 = float(np.mean(got.argmax(-1) == ref_logits.argmax(-1)))
    print(f"{variant}: rel err {err:.2e}, adapter effect {effect:.2e}, top-1 agreement {top1:.3f}")
    assert effect > 1e-2, "the adapter must visibly change the logits, else the comparison proves nothing"
    assert np.abs(ref_memory).max() > 1e-2, "the memory must be written, else its comparison proves nothing"
    assert err <= F32_TOL
    np.testing.assert_allclose(memory, ref_memory, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "llama-bias", "smollm3"])
@pytest.mark.parametrize("variant", ["released", "defaults", "learned_scale_head_rmsnorm"])
def test_other_architectures(arch, variant, backbone, tmp_path):
    gguf_path, hf_model, _ = backbone(arch)
    config, tensors, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS[variant], fmt="safetensors", outtype="f32")
    calls = session_calls(hf_model.config.vocab_size)
    ref_logits, ref_memory = reference_session(hf_model, config, tensors, calls)
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64) as m:
        got, ctx = engine_session(m, calls)
        memory = ctx.memory
    err = rel_err(got, ref_logits)
    print(f"{arch} {variant}: rel err {err:.2e}")
    assert err <= F32_TOL
    np.testing.assert_allclose(memory, ref_memory, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["released", "defaults", "learned_scale_head_rmsnorm"])
def test_f16_adapter_matches_float64_reference(variant, backbone, tmp_path):
    """The default conversion of a bf16 release is f16: released weights (alpha/rank = 2 folds
    exactly) give the f32 file's logits, decoded through the f16 copies; a learned scale folds
    with one f16 rounding (2^-12 relative) of the corrections."""
    gguf_path, hf_model, _ = backbone("qwen3")
    config, tensors, f16_adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS[variant])
    _, _, f32_adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS[variant], outtype="f32")
    from gguf import GGMLQuantizationType, GGUFReader

    types = {t.name: t.tensor_type for t in GGUFReader(f16_adapter, "r").tensors}
    assert types["blk.0.dmem_mq.weight"] == GGMLQuantizationType.F16
    assert types["blk.0.dmem_do.weight"] == GGMLQuantizationType.F16
    calls = session_calls(hf_model.config.vocab_size)
    assert sum(len(c["tokens"]) == 1 for c in calls) >= 3, "single-token decodes read the f16 copies"
    ref_logits, ref_memory = reference_session(hf_model, config, tensors, calls)
    with pydeltamem.Model(gguf_path, adapter=f16_adapter, n_ctx=64) as m:
        got, ctx = engine_session(m, calls)
        memory = ctx.memory
    with pydeltamem.Model(gguf_path, adapter=f32_adapter, n_ctx=64) as m:
        got_f32, _ = engine_session(m, calls)
    err = rel_err(got, ref_logits)
    print(f"{variant} f16: rel err {err:.2e} (f32 file {rel_err(got_f32, ref_logits):.2e})")
    if VARIANTS[variant].get("trainable_delta_scale"):
        assert err <= 1e-3
    else:
        assert rel_err(got, got_f32) <= 1e-6
        assert err <= F32_TOL
        np.testing.assert_allclose(memory, ref_memory, rtol=1e-4, atol=1e-5)


# (backbone weights, repack buffer): the memory op computes q = Wq x itself in decode passes with
# ggml's vec_dot for the type (f32, q8_0, q4_1, q4_0), except from repacked (interleaved) q4_0.
@pytest.mark.parametrize("weights,repack", [("f32", True), ("q8_0", True), ("q4_1", True), ("q4_0", False),
                                            ("q4_0", True)])
def test_zero_corrections_reproduce_the_bare_model(weights, repack, backbone, tiny_gguf, tmp_path):
    f32_path, hf_model, _ = backbone("qwen3")
    gguf_path = tiny_gguf(BACKBONES["qwen3"], weights)
    _, _, adapter = convert(tmp_path, hf_model, f32_path, VARIANTS["defaults"], zero_corrections=True)
    calls = session_calls(hf_model.config.vocab_size)
    with pydeltamem.Model(gguf_path, n_ctx=64, use_repack=repack) as bare_model:
        bare, _ = engine_session(bare_model, calls)
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64, use_repack=repack) as m:
        got, ctx = engine_session(m, calls)
        assert np.abs(ctx.memory).max() > 0, "the memory is written even when corrections are zero"
    assert rel_err(got, bare) <= 1e-6


@pytest.mark.parametrize("variant", ["released", "state_heads_4", "message_mean", "sentence_mean", "uncoupled_lambda",
                                     "scalar_gates"])
def test_portable_scan_matches_fused_kernel(variant, backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS[variant])
    calls = session_calls(hf_model.config.vocab_size)
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64) as m:
        fused, fused_ctx = engine_session(m, calls, dmem_fused=True)
        portable, portable_ctx = engine_session(m, calls, dmem_fused=False)
        assert rel_err(portable, fused) <= 1e-5
        np.testing.assert_allclose(portable_ctx.memory, fused_ctx.memory, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["released", "o_rmsnorm"])
@pytest.mark.parametrize("fused", [True, False])
def test_last_logits_equal_all_logits(variant, fused, backbone, tmp_path):
    """logits="last" runs the last layer's residual (with Δo) on the last token only."""
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS[variant])
    calls = session_calls(hf_model.config.vocab_size)
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64) as m:
        every, last = m.context(kv_type="f32", dmem_fused=fused), m.context(kv_type="f32", dmem_fused=fused)
        for c in calls:
            want = every.decode(c["tokens"], logits="all")[-1]
            got = last.decode(c["tokens"], logits="last")
            assert rel_err(got, want) <= 1e-5
        np.testing.assert_array_equal(last.memory, every.memory)


def test_portable_vector_kernels_match(backbone, tmp_path):
    """DELTAMEM_NO_AVX2=1 (what CPUs without AVX2 run) gives the same session as the default kernels."""
    import json
    import subprocess
    import sys

    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["defaults"])
    calls = session_calls(hf_model.config.vocab_size)
    script = (
        "import json, sys, numpy as np, pydeltamem\n"
        "calls = json.load(open(sys.argv[3]))\n"
        "with pydeltamem.Model(sys.argv[1], adapter=sys.argv[2], n_ctx=64) as m:\n"
        "    c = m.context(kv_type='f32')\n"
        "    out = np.concatenate([c.decode(k['tokens'], logits='all', write=k['write']) for k in calls])\n"
        "    np.save(sys.argv[4], out)\n"
    )
    (tmp_path / "calls.json").write_text(json.dumps(calls))
    runs = {}
    for name, env in (("default", {}), ("portable", {"DELTAMEM_NO_AVX2": "1"})):
        out = tmp_path / f"{name}.npy"
        subprocess.run([sys.executable, "-c", script, str(gguf_path), str(adapter), str(tmp_path / "calls.json"), str(out)],
                       check=True, env={**os.environ, **env})
        runs[name] = np.load(out)
    assert rel_err(runs["portable"], runs["default"]) <= 1e-5


def test_chunked_prefill_equals_one_pass(backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"])
    tokens = session_calls(hf_model.config.vocab_size)[0]["tokens"]
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64) as m:
        whole = m.context(kv_type="f32").decode(tokens, logits="all")
        chunked_ctx = m.context(kv_type="f32", n_batch=5)
        chunked = chunked_ctx.decode(tokens, logits="all")
    assert rel_err(chunked, whole) <= 1e-5


def test_memory_and_state_round_trip(backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"])
    calls = session_calls(hf_model.config.vocab_size)
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64) as m:
        ctx = m.context()
        ctx.decode(calls[0]["tokens"])
        assert ctx.memory.shape == (hf_model.config.num_hidden_layers, 1, 8, 8)
        assert np.abs(ctx.memory).max() > 0

        ctx.save_memory(tmp_path / "mem.bin")
        assert (tmp_path / "mem.bin").stat().st_size < 4096
        other = m.context()
        other.load_memory(tmp_path / "mem.bin")
        assert np.array_equal(other.memory, ctx.memory)

        ctx.save_state(tmp_path / "state.bin")
        restored = m.context()
        restored.load_state(tmp_path / "state.bin")
        assert restored.tokens == ctx.tokens
        nxt = calls[4]["tokens"]
        assert np.array_equal(restored.decode(nxt, logits="all"), ctx.decode(nxt, logits="all"))
        assert np.array_equal(restored.memory, ctx.memory)

        ctx.reset_memory()
        assert not np.any(ctx.memory)
        with pytest.raises(ValueError, match="shape"):
            ctx.memory = np.zeros((1, 1, 8, 8), np.float32)

    # Memory of another adapter (another fingerprint) must not load.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _, _, other_adapter = convert(other_dir, hf_model, gguf_path, VARIANTS["released"], seed=7)
    with pydeltamem.Model(gguf_path, adapter=other_adapter, n_ctx=64) as m2:
        with pytest.raises(ValueError, match="another adapter"):
            m2.context().load_memory(tmp_path / "mem.bin")
        with pytest.raises(ValueError, match="another model or setup"):
            m2.context().load_state(tmp_path / "state.bin")


def test_packed_model_loads_its_adapter(backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    config, tensors = make_adapter(hf_model.config, VARIANTS["released"])
    folder = write_adapter(tmp_path / "src", config, tensors)
    packed = tmp_path / "packed.gguf"
    convert_adapter(folder, packed, base=gguf_path, pack=gguf_path)
    separate = tmp_path / "adapter.gguf"
    convert_adapter(folder, separate, base=gguf_path)
    tokens = session_calls(hf_model.config.vocab_size)[0]["tokens"]
    with pydeltamem.Model(packed, n_ctx=64) as m:
        assert m.adapter is not None and m.adapter["rank"] == 8
        a = m.context().decode(tokens, logits="all")
    with pydeltamem.Model(gguf_path, adapter=separate, n_ctx=64) as m:
        b = m.context().decode(tokens, logits="all")
    assert np.array_equal(a, b)


def test_bad_adapters_raise(backbone, tiny_gguf, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"])
    data = adapter.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        pydeltamem.Model(gguf_path, adapter=truncated)
    with pytest.raises(ValueError, match="architecture"):
        pydeltamem.Model(tiny_gguf("llama-gqa", "f32"), adapter=adapter)
    with pytest.raises(ValueError, match="not a δ-mem adapter"):
        pydeltamem.Model(gguf_path, adapter=gguf_path)
    with pytest.raises(ValueError, match="an adapter, not a model"):
        pydeltamem.Model(adapter)


def test_adapter_without_delta_heads_is_the_bare_model_with_memory(backbone, tmp_path):
    """delta_heads [] (official: valid, no correction): loads with a warning; logits are the bare
    model's, and the memory is still written exactly as the reference writes it."""
    gguf_path, hf_model, _ = backbone("qwen3")
    with pytest.warns(UserWarning, match="delta_heads"):
        config, tensors, adapter = convert(tmp_path, hf_model, gguf_path, NO_HEADS, outtype="f32")
    calls = session_calls(hf_model.config.vocab_size)
    ref_logits, ref_memory = reference_session(hf_model, config, tensors, calls)
    with pydeltamem.Model(gguf_path, n_ctx=64) as bare_model:
        bare, _ = engine_session(bare_model, calls)
    with pytest.warns(UserWarning, match="no delta heads"):
        m = pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64)
    with m:
        assert m.adapter["delta_heads"] == []
        got, ctx = engine_session(m, calls)
        memory = ctx.memory
    assert rel_err(got, bare) <= 1e-6
    assert rel_err(ref_logits, bare_logits_session(copy.deepcopy(hf_model), [c["tokens"] for c in calls]).numpy()) == 0
    assert np.abs(memory).max() > 0
    np.testing.assert_allclose(memory, ref_memory, rtol=1e-4, atol=1e-5)


def test_hand_made_adapters_are_checked_at_load(backbone, tmp_path):
    """Only the listed heads apply (a W_Δ of another head is refused, not applied); eps values must
    be finite and positive; weights must be finite."""
    from gguf import GGUFReader
    from gguf import GGUFValueType as T
    from test_bad_input import rewrite_gguf

    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["defaults"], outtype="f32")
    heads = "deltamem.delta_heads"
    only_o = rewrite_gguf(adapter, tmp_path / "only_o.gguf", drop_keys=(heads,), set_keys={heads: (["o"], T.ARRAY)})
    with pytest.raises(ValueError, match="dmem_dq.weight' belongs to no targeted layer or head"):
        pydeltamem.Model(gguf_path, adapter=only_o)
    for key in ("deltamem.qk_norm_eps", "deltamem.delta_o_rmsnorm_eps"):
        for value in (float("nan"), float("inf"), 0.0, -1e-6):
            bad = rewrite_gguf(adapter, tmp_path / "eps.gguf", drop_keys=(key,), set_keys={key: (value, T.FLOAT32)})
            with pytest.raises(ValueError, match=f"'{key}' = .*expected a small positive number"):
                pydeltamem.Model(gguf_path, adapter=bad)
    name = "blk.1.dmem_mk.weight"
    data = np.array(next(t.data for t in GGUFReader(adapter, "r").tensors if t.name == name))
    data.flat[3] = np.inf
    bad = rewrite_gguf(adapter, tmp_path / "inf.gguf", replace_tensors={name: data})
    with pytest.raises(ValueError, match=f"'{name}' holds NaN or infinite"):
        pydeltamem.Model(gguf_path, adapter=bad)


def test_adapter_info_survives_odd_paths(backbone, tmp_path):
    """The adapter's path goes into the info JSON escaped: quotes, backslashes, tabs, newlines, non-ASCII."""
    import shutil

    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"])
    odd = tmp_path / 'a "quoted"\\back\tslash\nnew é.gguf'
    shutil.copy(adapter, odd)
    with pydeltamem.Model(gguf_path, adapter=odd) as m:
        assert m.adapter["source"] == str(odd)
        assert m.adapter["delta_heads"] == ["q", "o"]
