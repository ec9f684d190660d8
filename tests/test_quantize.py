"""`deltamem quantize`: per-tensor types against the documented mix table (docs/quantization.md), weights
read back with gguf-py close to the originals, files that load and run, KL ordering across types,
fallbacks for rows that do not fit, adapter tensors untouched, errors, atomic writes, the command line,
the converter's quantized outtypes, and the native binding's argument checks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

import tiny_models
from pydeltamem import Model, _core, quality, quantize
from pydeltamem.convert.hf_to_gguf import convert_hf_to_gguf

T = gguf.GGMLQuantizationType

# Eight layers so that the layer-dependent rules (first/last eighth, every third layer) all show;
# every row length (256, 768) is a multiple of 256, so no fallback interferes with the mix table.
WIDE = tiny_models.TinySpec("quant-qwen3-wide", "qwen3", dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6),
    pre="qwen2", seed=11)
# Rows of 160 (a multiple of 32, not of 256) and 200 (not even a multiple of 32); tied output.
ODD = tiny_models.TinySpec("quant-llama-odd", "llama", dict(
    hidden_size=160, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5),
    pre="llama-bpe", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"), seed=12)

ALL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
             "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
# llama.cpp's LLAMA_FTYPE numbers, written out rather than read from the module under test.
FILE_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
             "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}


# ----------------------------------------------------------------------------- the mix table (8 layers, GQA 2)

def _layers(*types):
    assert len(types) == 8
    return list(types)


Q3, Q4, Q5, Q6 = T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K
MORE_BITS_8 = {0, 3, 6, 7}  # llama.cpp's use_more_bits for 8 layers: first and last eighth, every third between

# mix -> (default type, output.weight, attn_v per layer, ffn_down per layer, attn_output)
EXPECTED = {
    "Q8_0": (T.Q8_0, T.Q8_0, [T.Q8_0] * 8, [T.Q8_0] * 8, T.Q8_0),
    "Q4_0": (T.Q4_0, Q6, [T.Q4_0] * 8, [T.Q4_0] * 8, T.Q4_0),
    "Q4_1": (T.Q4_1, Q6, [T.Q4_1] * 8, [T.Q4_1] * 8, T.Q4_1),
    "Q5_0": (T.Q5_0, Q6, [T.Q5_0] * 8, [T.Q5_0] * 8, T.Q5_0),
    "Q5_1": (T.Q5_1, Q6, [T.Q5_1] * 8, [T.Q5_1] * 8, T.Q5_1),
    "Q2_K": (T.Q2_K, Q6, [Q3] * 8, [Q3] * 8, Q3),   # GQA 2 < 4: attn_v gets Q3_K, not Q4_K
    "Q3_K_S": (Q3, Q6, [Q3] * 8, [Q3] * 8, Q3),
    "Q3_K_M": (Q3, Q6, _layers(Q5, Q5, Q4, Q4, Q4, Q4, Q4, Q4), [Q4] * 8, Q4),  # n_layer/16 = 0: no Q5_K ffn_down
    "Q3_K_L": (Q3, Q6, [Q5] * 8, [Q5] * 8, Q5),
    "Q4_K_S": (Q4, Q6, _layers(Q5, Q5, Q5, Q5, Q4, Q4, Q4, Q4), _layers(Q5, Q4, Q4, Q4, Q4, Q4, Q4, Q4), Q4),
    "Q4_K_M": (Q4, Q6, _layers(Q6, Q4, Q4, Q6, Q4, Q4, Q6, Q6), _layers(Q6, Q4, Q4, Q6, Q4, Q4, Q6, Q6), Q4),
    "Q5_K_S": (Q5, Q6, [Q5] * 8, [Q5] * 8, Q5),
    "Q5_K_M": (Q5, Q6, _layers(Q6, Q5, Q5, Q6, Q5, Q5, Q6, Q6), _layers(Q6, Q5, Q5, Q6, Q5, Q5, Q6, Q6), Q5),
    "Q6_K": (Q6, Q6, [Q6] * 8, [Q6] * 8, Q6),
}

# Relative RMS error of dequantized weights, per stored type, on N(0, σ) weights; the values measured
# on a 768×256 N(0, 0.2) matrix are in the comments, the bounds leave ~30% headroom.
# They rank as the bits per weight do.
MAX_REL_RMS = {
    T.Q8_0: 0.008,   # 0.0054
    T.Q6_K: 0.025,   # 0.018
    T.Q5_1: 0.05,    # 0.038
    T.Q5_0: 0.056,   # 0.043
    T.Q5_K: 0.047,   # 0.036
    T.Q4_1: 0.10,    # 0.078
    T.Q4_0: 0.11,    # 0.086
    T.Q4_K: 0.093,   # 0.072
    T.Q3_K: 0.20,    # 0.151
    T.Q2_K: 0.39,    # 0.297
    T.IQ4_NL: 0.10,  # 0.076
    T.F16: 0.001,
}


def test_use_more_bits_layers():
    assert {i for i in range(8) if quantize.use_more_bits(i, 8)} == MORE_BITS_8
    # SmolLM2-135M has 30 layers: n/8 = 3, 7n/8 = 26.
    assert {i for i in range(30) if quantize.use_more_bits(i, 30)} == {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def test_gqa_four_gives_q2k_attn_v_four_bits():
    facts = quantize.ModelFacts(n_layer=8, n_gqa=4, has_output=True)
    assert quantize.tensor_type(quantize.find_mix("Q2_K"), "blk.3.attn_v.weight", facts) == T.Q4_K


def test_fallback_chain():
    qtype, note = quantize.fit_type(T.Q4_K, 576)
    assert qtype == T.Q5_0 and "576" in note and "Q5_0" in note
    assert quantize.fit_type(T.Q4_K, 512) == (T.Q4_K, None)
    assert [quantize.fit_type(t, 160)[0] for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0)] == \
        [T.Q4_0, T.Q4_0, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_0]  # llama-quantize's table (q2_K, q3_K → q4_0)
    assert [quantize.fit_type(t, 200)[0] for t in (T.Q2_K, T.Q4_K, T.Q6_K, T.Q8_0)] == [T.F16] * 4


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"wide"|"odd": (f32 GGUF, checkpoint folder)} built once for this module."""
    root = tmp_path_factory.mktemp("quant-models")
    out = {}
    for key, spec in (("wide", WIDE), ("odd", ODD)):
        folder = tiny_models.build_checkpoint(spec, root / spec.name)
        f32 = root / f"{spec.name}.f32.gguf"
        convert_hf_to_gguf(folder, f32, "f32", progress=False)
        out[key] = (f32, folder)
    return out


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    """quantized(kind, type) -> (path, QuantizeResult), cached for the module."""
    root = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(kind: str, type_name: str):
        if (kind, type_name) not in cache:
            out = root / f"{kind}.{type_name}.gguf"
            result = quantize.quantize_gguf(models[kind][0], out, type_name, n_threads=2, progress=False)
            cache[kind, type_name] = (out, result)
        return cache[kind, type_name]

    return get


def tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def as_f32(t) -> np.ndarray:
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1, int(t.shape[0]))


def run_model(path: Path) -> np.ndarray:
    with Model(path, n_ctx=64) as m:
        logits = m.context().decode(m.tokenize("The capital of France is Paris."), logits="all")
        assert logits.shape[1] == m.n_vocab and np.isfinite(logits).all()
    return logits


# ----------------------------------------------------------------------------- every type on the wide model

@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_types_follow_mix_table_and_file_runs(quantized, models, type_name):
    path, result = quantized("wide", type_name)
    got = tensors(path)
    default, output, attn_v, ffn_down, attn_output = EXPECTED[type_name]
    n_layer = WIDE.config["num_hidden_layers"]
    expected = {"token_embd.weight": default, "output.weight": output, "output_norm.weight": T.F32}
    for il in range(n_layer):
        expected |= {f"blk.{il}.attn_v.weight": attn_v[il], f"blk.{il}.ffn_down.weight": ffn_down[il],
                     f"blk.{il}.attn_output.weight": attn_output}
        expected |= {f"blk.{il}.{n}.weight": default for n in ("attn_q", "attn_k", "ffn_gate", "ffn_up")}
        expected |= {f"blk.{il}.{n}.weight": T.F32 for n in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm")}
    assert {name: T(int(t.tensor_type)) for name, t in got.items()} == expected
    assert result.notes == []  # every row fits

    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == FILE_TYPE[type_name]
    assert reader.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    run_model(path)


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_dequantized_weights_close_to_originals(quantized, models, type_name):
    path, _ = quantized("wide", type_name)
    original = tensors(models["wide"][0])
    for name, t in tensors(path).items():
        ref = as_f32(original[name])
        err = np.sqrt(np.mean((as_f32(t) - ref) ** 2) / np.mean(ref ** 2))
        bound = 0.0 if t.tensor_type == T.F32 else MAX_REL_RMS[T(int(t.tensor_type))]
        assert err <= bound, f"{type_name} {name} ({T(int(t.tensor_type)).name}): relative RMS error {err:.4f} > {bound}"


def test_metadata_copied(quantized, models):
    path, _ = quantized("wide", "Q4_K_M")
    src, dst = gguf.GGUFReader(models["wide"][0]).fields, gguf.GGUFReader(path).fields
    skip = {"general.file_type", "general.quantization_version"}
    keys = [k for k in src if not k.startswith("GGUF.") and k not in skip]
    assert [k for k in dst if not k.startswith("GGUF.") and k not in skip] == keys
    for k in keys:
        assert dst[k].contents() == src[k].contents(), k


def test_kl_ordering_across_types(quantized, models):
    base = models["wide"][0]
    text = tiny_models.TRAINING_TEXT * 2
    kl = {}
    top1 = {}
    for type_name in ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K"):
        report = quality.evaluate(str(base), str(quantized("wide", type_name)[0]), text, n_tokens=192, ctx=96)
        kl[type_name], top1[type_name] = report.kl_mean, report.top1_agreement
    assert kl["Q8_0"] < kl["Q6_K"] < kl["Q4_K_M"] < kl["Q2_K"], kl
    assert top1["Q8_0"] >= top1["Q4_K_M"] >= top1["Q2_K"], top1
    assert top1["Q8_0"] > 0.95, top1


# ----------------------------------------------------------------------------- rows that do not fit

# mix -> (attn_q / attn_k / ffn_gate / ffn_up [rows of 160], token_embd tied as output [160])
ODD_EXPECTED = {
    "Q4_K_M": (T.Q5_0, T.Q8_0),
    "Q2_K": (T.Q4_0, T.Q8_0),
    "Q6_K": (T.Q8_0, T.Q8_0),
    "Q4_0": (T.Q4_0, T.Q8_0),
}


@pytest.mark.parametrize("type_name", list(ODD_EXPECTED))
def test_fallback_for_rows_that_do_not_fit(quantized, type_name):
    path, result = quantized("odd", type_name)
    got = {name: T(int(t.tensor_type)) for name, t in tensors(path).items()}
    mats, embd = ODD_EXPECTED[type_name]
    assert got["token_embd.weight"] == embd
    for il in range(2):
        for n in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
            assert got[f"blk.{il}.{n}.weight"] == mats, (n, got[f"blk.{il}.{n}.weight"])
        assert got[f"blk.{il}.ffn_down.weight"] == T.F16  # 200 values: no quantized block fits
    notes = "\n".join(result.notes)
    assert "blk.0.ffn_down.weight: row length 200" in notes and "using F16" in notes
    if type_name != "Q4_0":  # Q4_0 blocks (32) fit rows of 160: no note
        assert "blk.1.attn_q.weight: row length 160" in notes
    run_model(path)


# ----------------------------------------------------------------------------- other inputs

def test_requantize_from_f16_and_q8_0_inputs(models, tmp_path):
    folder = models["wide"][1]
    f16, q8 = tmp_path / "in.f16.gguf", tmp_path / "in.q8_0.gguf"
    convert_hf_to_gguf(folder, f16, "f16", progress=False)
    convert_hf_to_gguf(folder, q8, "q8_0", progress=False)
    out = tmp_path / "from-f16.Q4_K_M.gguf"
    quantize.quantize_gguf(f16, out, "q4_k_m", n_threads=2, progress=False)   # names are case-insensitive
    run_model(out)
    # Q8_0 → Q8_0: tensors already in their target type are copied byte for byte.
    same = tmp_path / "q8.Q8_0.gguf"
    quantize.quantize_gguf(q8, same, "Q8_0", n_threads=2, progress=False)
    src, dst = tensors(q8), tensors(same)
    for name in src:
        assert np.array_equal(np.asarray(src[name].data), np.asarray(dst[name].data)), name
    out2 = tmp_path / "from-q8.Q4_K_M.gguf"
    quantize.quantize_gguf(q8, out2, "Q4_K_M", n_threads=1, progress=False)
    run_model(out2)


def test_adapter_tensors_copied_unchanged(models, tmp_path):
    src = models["wide"][0]
    with_adapter = tmp_path / "with-dmem.gguf"
    extra = {"blk.0.dmem_mq.weight": np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32),
             "blk.1.dmem_do.weight": np.random.default_rng(1).standard_normal((256, 8)).astype(np.float16)}
    _copy_with_extra_tensors(src, with_adapter, extra)
    out = tmp_path / "with-dmem.Q4_K_M.gguf"
    quantize.quantize_gguf(with_adapter, out, "Q4_K_M", n_threads=2, progress=False)
    got = tensors(out)
    for name, values in extra.items():
        assert got[name].tensor_type == (T.F32 if values.dtype == np.float32 else T.F16)
        assert np.array_equal(np.asarray(got[name].data), values)


def _copy_with_extra_tensors(src: Path, dst: Path, extra: dict[str, np.ndarray]) -> None:
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), f.types[0])
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    for name, values in extra.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------- errors and atomic writes

def test_existing_output_needs_force(models, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        quantize.quantize_gguf(models["odd"][0], out, "Q8_0", progress=False)
    assert out.read_bytes() == b"keep me"
    quantize.quantize_gguf(models["odd"][0], out, "Q8_0", force=True, progress=False)
    run_model(out)


def test_bad_type_and_bad_inputs(models, tmp_path):
    with pytest.raises(ValueError, match="unsupported quantization type 'Q3_K_XL'"):
        quantize.quantize_gguf(models["odd"][0], tmp_path / "x.gguf", "Q3_K_XL", progress=False)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        quantize.quantize_gguf(garbage, tmp_path / "x.gguf", "Q8_0", progress=False)
    data = models["odd"][0].read_bytes()
    for cut in (len(data) // 2, 100):
        truncated = tmp_path / f"truncated{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            quantize.quantize_gguf(truncated, tmp_path / "x.gguf", "Q8_0", progress=False)
    with pytest.raises(FileNotFoundError):
        quantize.quantize_gguf(tmp_path / "missing.gguf", tmp_path / "x.gguf", "Q8_0", progress=False)
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*"))  # no output, no temp file


def test_interrupted_run_leaves_no_output(models, tmp_path, monkeypatch):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous")
    calls = {"n": 0}
    real = quantize.quantize_array

    def interrupt_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize, "quantize_array", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        quantize.quantize_gguf(models["wide"][0], out, "Q4_K_M", force=True, progress=False)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]  # no temporary file left behind


def test_native_binding_rejects_bad_arguments():
    rows = np.ones((2, 256), np.float32)
    assert _core.quantize_rows(int(T.Q4_K), rows, 2).shape == (2, 144)
    with pytest.raises(ValueError, match="not a multiple"):
        _core.quantize_rows(int(T.Q4_K), np.ones((2, 100), np.float32))
    with pytest.raises(ValueError, match="not finite"):
        _core.quantize_rows(int(T.Q8_0), np.full((1, 32), np.nan, np.float32))
    with pytest.raises(ValueError, match="importance matrix|cannot be a quantization target"):
        _core.quantize_rows(int(T.IQ2_XXS), rows)
    for bad in (int(T.Q8_K), 4, 999, -1):
        with pytest.raises(ValueError):
            _core.quantize_rows(bad, rows)
    with pytest.raises(ValueError, match="2-D"):
        _core.quantize_rows(int(T.Q8_0), np.ones(32, np.float32))
    assert _core.quant_row_size(int(T.Q6_K), 256) == 210 and _core.quant_row_size(int(T.Q6_K), 100) == -1
    assert _core.quant_type_name(int(T.Q4_K)) == "q4_K" and _core.quant_type_name(4) is None
    assert _core.quant_requires_imatrix(int(T.IQ2_XXS)) and not _core.quant_requires_imatrix(int(T.Q2_K))


def test_threads_do_not_change_the_bytes():
    values = np.random.default_rng(5).standard_normal((37, 512)).astype(np.float32)
    for qtype in (T.Q4_K, T.Q2_K, T.Q5_0):
        one = _core.quantize_rows(int(qtype), values, 1)
        assert np.array_equal(one, _core.quantize_rows(int(qtype), values, 4))
        assert np.array_equal(one, _core.quantize_rows(int(qtype), values, 64))


# ----------------------------------------------------------------------------- converter and command line

def test_convert_outtype_matches_quantize(models, quantized, tmp_path):
    direct = tmp_path / "direct.q4_k_m.gguf"
    convert_hf_to_gguf(models["wide"][1], direct, "q4_k_m", progress=False)
    via_quantize, _ = quantized("wide", "Q4_K_M")
    a, b = tensors(direct), tensors(via_quantize)
    assert list(a) == list(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name
    assert gguf.GGUFReader(direct).fields["general.file_type"].contents() == FILE_TYPE["Q4_K_M"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pydeltamem.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_cli(models, tmp_path):
    src = str(models["odd"][0])
    out = tmp_path / "cli.gguf"
    done = _cli("quantize", src, str(out), "Q4_K_M", "--threads", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stderr and "using F16" in done.stderr
    assert tensors(out)["blk.0.ffn_down.weight"].tensor_type == T.F16

    again = _cli("quantize", src, str(out), "Q4_K_M")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert _cli("quantize", src, str(out), "Q4_K_M", "--force", "--no-progress").returncode == 0

    bad_type = _cli("quantize", src, str(tmp_path / "y.gguf"), "Q7_K")
    assert bad_type.returncode == 1 and "unsupported quantization type" in bad_type.stderr
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(models["odd"][0].read_bytes()[:5000])
    bad_file = _cli("quantize", str(truncated), str(tmp_path / "z.gguf"), "Q8_0")
    assert bad_file.returncode == 1 and "error" in bad_file.stderr and "Traceback" not in bad_file.stderr
    assert not (tmp_path / "y.gguf").exists() and not (tmp_path / "z.gguf").exists()
