"""`deltamem convert-adapter`: δ-mem adapters (reference release format) → GGUF.

The expected GGUF contents are recomputed here from docs/adapter-format.md's rules
(alpha/rank and the learned scale folded, llama q/k rows permuted), and the folded tensors
are checked against the float64 reference's corrections, so the format and the oracle agree.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch


gguf = pytest.importorskip("gguf")

from dmem_fixtures import NO_HEADS, VARIANTS, backbone_widths, make_adapter, tiny_backbone, write_adapter  # noqa: E402
from dmem_reference import OFFICIAL_CONFIG, corrections, layer_weights, ref_config  # noqa: E402

from pydeltamem.convert import adapter as conv  # noqa: E402
from pydeltamem.convert._torch_pickle import UnsafeCheckpointError, load_torch_checkpoint  # noqa: E402



# ----------------------------------------------------------------------------- helpers

_MODELS: dict[str, object] = {}


def hf_model(arch: str):
    """One tiny backbone per architecture for the whole module (building one costs ~0.1 s)."""
    if arch not in _MODELS:
        _MODELS[arch] = tiny_backbone(arch)
    return _MODELS[arch]


def hf_dir(tmp_path: Path, arch: str, **changes) -> Path:
    """A Hugging Face model folder holding only config.json (all --base reads)."""
    config = hf_model(arch).config.to_dict()
    config.update(changes)
    folder = tmp_path / f"hf-{arch}-{abs(hash(tuple(sorted(changes.items()))))}"
    folder.mkdir()
    import json

    (folder / "config.json").write_text(json.dumps(config))
    return folder


def model_gguf(tmp_path: Path, arch: str, name: str = "model.gguf", **changes) -> Path:
    """A small model GGUF with the metadata the converter validates against, and a few
    tensors (f32, f16 and Q8_0) so --pack's copy can be checked byte for byte."""
    cfg = hf_model(arch).config
    n_layer = changes.get("block_count", cfg.num_hidden_layers)
    n_embd = changes.get("embedding_length", cfg.hidden_size)
    n_head = changes.get("head_count", cfg.num_attention_heads)
    n_head_kv = changes.get("head_count_kv", cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gguf_arch = changes.get("gguf_arch", arch)
    path = tmp_path / name
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_type("model")
    writer.add_name("tiny")
    writer.add_uint32(f"{gguf_arch}.block_count", n_layer)
    writer.add_uint32(f"{gguf_arch}.embedding_length", n_embd)
    writer.add_uint32(f"{gguf_arch}.attention.head_count", n_head)
    writer.add_uint32(f"{gguf_arch}.attention.head_count_kv", n_head_kv)
    writer.add_uint32(f"{gguf_arch}.attention.key_length", head_dim)
    writer.add_uint32(f"{gguf_arch}.attention.value_length", head_dim)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, n_embd)).astype(np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(n_embd).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def adapter_dir(tmp_path: Path, arch: str, variant: str = "released", fmt: str = "pt", seed: int = 0, **kw):
    config, tensors = make_adapter(hf_model(arch).config, VARIANTS[variant], seed=seed)
    folder = write_adapter(tmp_path / f"adapter-{arch}-{variant}-{fmt}-{seed}", config, tensors, fmt=fmt, **kw)
    return folder, config, tensors


def read_gguf(path: Path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def as_f64(t: gguf.ReaderTensor) -> np.ndarray:
    """A reader tensor in PyTorch [out, in] order (numpy order = reversed ggml shape)."""
    return np.asarray(t.data, dtype=np.float64).reshape([int(n) for n in reversed(t.shape)])


def src(tensors: dict, layer: int, name: str) -> np.ndarray:
    return tensors[f"model.layers.{layer}.self_attn.{name}"].to(torch.float64).numpy()


def rope_permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """docs/adapter-format.md: per head, HF rows [a0..a(h/2-1), b0..b(h/2-1)] become
    [a0, b0, a1, b1, ...] (ggml's interleaved RoPE pairs). Written as an explicit index map."""
    head_dim = rows.shape[0] // n_heads
    half = head_dim // 2
    order = []
    for h in range(n_heads):
        for j in range(half):
            order += [h * head_dim + j, h * head_dim + half + j]
    return rows[order]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def expected_learned(config, raw: np.ndarray) -> dict:
    """The official learned scale per head: sigmoid(raw)·max, one value per layer or one per head (q, k, v, o)."""
    g = sigmoid(raw.reshape(-1)) * config["delta_scale_max"]
    return dict(zip("qkvo", g)) if config["delta_scale_granularity"] == "head" else {h: g[0] for h in "qkvo"}


# ----------------------------------------------------------------------------- conversion and values

CONVERT_CASES = [
    ("qwen3", "released"), ("llama", "released"), ("smollm3", "defaults"), ("llama", "defaults"),
    ("qwen3", "uncoupled_lambda"), ("llama", "scalar_gates_uncoupled"), ("qwen3", "state_heads_4"),
    ("llama", "target_subset"), ("qwen3", "rank_4"), ("llama", "rank_16"), ("qwen3", "o_rmsnorm"),
    ("llama", "learned_scale_layer"), ("qwen3", "learned_scale_head"), ("llama", "learned_scale_head_rmsnorm"),
    ("smollm3", "learned_scale_layer_rmsnorm"), ("qwen3", "no_lambda_uncoupled"), ("llama", "sentence_mean"),
    ("llama", "head_k"),
]


@pytest.mark.parametrize("arch,variant", CONVERT_CASES)
def test_converted_tensors_equal_source_after_folding_and_permutation(tmp_path, arch, variant):
    """docs/adapter-format.md's rules, recomputed: every W_Δ times alpha/rank and its learned scale
    (also Δo under RMSNorm: the official order scales before the norm), the norm weight as stored."""
    folder, config, tensors = adapter_dir(tmp_path, arch, variant)
    out = conv.convert_adapter(folder, tmp_path / "a.gguf", base=hf_dir(tmp_path, arch), outtype="f32")
    fields, got = read_gguf(out)
    cfg = hf_model(arch).config
    targets = config["target_layers"] or list(range(cfg.num_hidden_layers))
    heads = config["delta_heads"]
    uncoupled = not config["couple_lambda"] and config["state_update_mode"] != "no_lambda"
    scale = config["alpha"] / config["rank"]
    permuted = arch in ("llama", "smollm3")
    n_kv = cfg.num_key_value_heads

    expected_names = set()
    for i in targets:
        p = f"blk.{i}.dmem_"
        expect = {
            "mq.weight": src(tensors, i, "memory_q_proj"),
            "mk.weight": src(tensors, i, "memory_k_proj"),
            "mv.weight": src(tensors, i, "memory_v_proj"),
            "beta.weight": src(tensors, i, "beta_proj"),
            "beta.bias": src(tensors, i, "beta_bias"),
        }
        if uncoupled:
            expect["lambda.weight"] = src(tensors, i, "lambda_proj")
            expect["lambda.bias"] = src(tensors, i, "lambda_bias")
        learned = expected_learned(config, src(tensors, i, "delta_scale_raw")) if config["trainable_delta_scale"] else {}
        for h in heads:
            w = scale * learned.get(h, 1.0) * src(tensors, i, f"delta_{h}_proj")
            if permuted and h in ("q", "k"):
                w = rope_permute(w, cfg.num_attention_heads if h == "q" else n_kv)
            expect[f"d{h}.weight"] = w
        if config["delta_o_rmsnorm"] and "o" in heads:
            expect["do_norm.weight"] = src(tensors, i, "delta_o_rmsnorm_weight")
        for name, value in expect.items():
            t = got[p + name]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            assert list(t.shape) == list(reversed(value.shape)), name  # ggml order
            np.testing.assert_allclose(as_f64(t), value, rtol=1e-6, atol=1e-7, err_msg=p + name)
            expected_names.add(p + name)
    assert set(got) == expected_names, "exactly the documented tensors, nothing for inactive heads/layers"
    assert fields["deltamem.target_layers"] == targets
    assert fields["deltamem.delta_heads"] == heads
    assert fields["deltamem.rope_permuted"] == (permuted and any(h in heads for h in "qk"))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_folded_tensors_reproduce_reference_corrections(tmp_path, arch, variant):
    """What the runtime computes from the GGUF (Δ = W' o; Δo = rmsnorm(W'_o o)·w' when normed)
    equals the reference's corrections from the source adapter, for a random readout o."""
    folder, config, tensors = adapter_dir(tmp_path, arch, variant)
    fields, got = read_gguf(conv.convert_adapter(folder, tmp_path / "a.gguf", base=hf_dir(tmp_path, arch), outtype="f32"))
    cfg = hf_model(arch).config
    rcfg = ref_config(config, cfg.num_hidden_layers)
    rng = np.random.default_rng(1)
    for i in rcfg.target_layers:
        o = rng.standard_normal((5, rcfg.width))
        want = corrections(layer_weights(tensors, i), rcfg, torch.from_numpy(o))
        for h in rcfg.delta_heads:
            w = as_f64(got[f"blk.{i}.dmem_d{h}.weight"])
            delta = o @ w.T
            if h == "o" and fields["deltamem.delta_o_rmsnorm"]:
                eps = fields["deltamem.delta_o_rmsnorm_eps"]
                delta = delta / np.sqrt((delta**2).mean(-1, keepdims=True) + eps) * as_f64(got[f"blk.{i}.dmem_do_norm.weight"])
            want_h = want[h].numpy()
            if fields["deltamem.rope_permuted"] and h in ("q", "k"):  # GGUF rows are in ggml RoPE order
                n = cfg.num_attention_heads if h == "q" else cfg.num_key_value_heads
                want_h = rope_permute(want_h.T, n).T
            np.testing.assert_allclose(delta, want_h, rtol=1e-5, atol=1e-6, err_msg=f"{variant} {h}")


def test_pt_and_safetensors_give_identical_gguf_tensors_and_fingerprint(tmp_path):
    a, _, _ = adapter_dir(tmp_path, "qwen3", "defaults", fmt="pt", weight_suffix=True)
    b, _, _ = adapter_dir(tmp_path, "qwen3", "defaults", fmt="safetensors")
    fa, ta = read_gguf(conv.convert_adapter(a, tmp_path / "a.gguf", arch="qwen3"))
    fb, tb = read_gguf(conv.convert_adapter(b, tmp_path / "b.gguf", arch="qwen3"))
    assert set(ta) == set(tb)
    for name in ta:
        np.testing.assert_array_equal(np.asarray(ta[name].data), np.asarray(tb[name].data))
    assert fa["deltamem.fingerprint"] == fb["deltamem.fingerprint"]
    assert len(fa["deltamem.fingerprint"]) == 64


def test_fingerprint_ignores_outtype_but_tracks_weights(tmp_path):
    a, config, tensors = adapter_dir(tmp_path, "qwen3")
    f32, _ = read_gguf(conv.convert_adapter(a, tmp_path / "a.gguf", arch="qwen3", outtype="f32"))
    f16, t16 = read_gguf(conv.convert_adapter(a, tmp_path / "b.gguf", arch="qwen3", outtype="f16"))
    assert f32["deltamem.fingerprint"] == f16["deltamem.fingerprint"]
    assert t16["blk.0.dmem_mq.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert t16["blk.0.dmem_dq.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert t16["blk.0.dmem_beta.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    tensors = dict(tensors)
    key = "model.layers.1.self_attn.beta_bias"
    tensors[key] = tensors[key] + 1
    other = write_adapter(tmp_path / "other", config, tensors)
    changed, _ = read_gguf(conv.convert_adapter(other, tmp_path / "c.gguf", arch="qwen3"))
    assert changed["deltamem.fingerprint"] != f32["deltamem.fingerprint"]


def test_outtype_auto_follows_the_checkpoint_precision(tmp_path):
    """auto: f16 for a bf16 (or f16) checkpoint, whose values f16 holds; f32 for a float32 one."""
    import torch

    folder, config, tensors = adapter_dir(tmp_path, "qwen3")
    _, t_bf16 = read_gguf(conv.convert_adapter(folder, tmp_path / "a.gguf", arch="qwen3"))
    assert t_bf16["blk.0.dmem_mq.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert t_bf16["blk.0.dmem_do.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    key = "model.layers.0.self_attn.memory_q_proj"
    np.testing.assert_array_equal(as_f64(t_bf16["blk.0.dmem_mq.weight"]), tensors[key].double().numpy())

    as_f16 = write_adapter(tmp_path / "f16", config, {k: v.to(torch.float16) for k, v in tensors.items()})
    _, t_f16 = read_gguf(conv.convert_adapter(as_f16, tmp_path / "b.gguf", arch="qwen3"))
    assert t_f16["blk.0.dmem_mq.weight"].tensor_type == gguf.GGMLQuantizationType.F16

    wide = {k: v.float() + (1e-4 * torch.rand(v.shape) if v.ndim == 2 else 0) for k, v in tensors.items()}
    as_f32 = write_adapter(tmp_path / "f32", config, wide)
    _, t_f32 = read_gguf(conv.convert_adapter(as_f32, tmp_path / "c.gguf", arch="qwen3"))
    assert t_f32["blk.0.dmem_mq.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(as_f64(t_f32["blk.0.dmem_mq.weight"]), wide[key].double().numpy())
    with pytest.raises(ValueError, match="outtype"):
        conv.convert_adapter(folder, tmp_path / "d.gguf", arch="qwen3", outtype="q8_0")


def test_metadata_of_released_configuration(tmp_path):
    folder, _, _ = adapter_dir(tmp_path, "qwen3", "released")
    fields, _ = read_gguf(conv.convert_adapter(folder, tmp_path / "a.gguf", base=model_gguf(tmp_path, "qwen3")))
    cfg = hf_model("qwen3").config
    w = backbone_widths(cfg)
    expected = {
        "general.architecture": "qwen3", "general.type": "adapter", "adapter.type": "delta-mem",
        "deltamem.format_version": 1, "deltamem.rank": 8, "deltamem.num_state_heads": 1,
        "deltamem.update_mode": "standard", "deltamem.couple_lambda": True, "deltamem.rankwise_gates": True,
        "deltamem.normalize_qk": True, "deltamem.write_granularity": "token", "deltamem.delta_heads": ["q", "o"],
        "deltamem.target_layers": list(range(cfg.num_hidden_layers)), "deltamem.delta_o_rmsnorm": False,
        "deltamem.scales_folded": True, "deltamem.alpha": 16.0, "deltamem.scale": 2.0,
        "deltamem.trainable_delta_scale": False, "deltamem.rope_permuted": False,
        "deltamem.block_count": cfg.num_hidden_layers, "deltamem.embedding_length": cfg.hidden_size,
        "deltamem.q_length": w["q"], "deltamem.k_length": w["k"], "deltamem.v_length": w["v"],
        "deltamem.o_length": w["o"],
    }
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["deltamem.qk_norm_eps"] == pytest.approx(1e-6)


def _converted(tmp_path, name, config, tensors, **kw):
    folder = write_adapter(tmp_path / name, config, tensors)
    return read_gguf(conv.convert_adapter(folder, tmp_path / f"{name}.gguf", arch="qwen3", **kw))


def _assert_same_conversion(a, b):
    (fa, ta), (fb, tb) = a, b
    assert {k: v for k, v in fa.items() if k != "general.name"} == {k: v for k, v in fb.items() if k != "general.name"}
    assert set(ta) == set(tb)
    for name in ta:
        np.testing.assert_array_equal(np.asarray(ta[name].data), np.asarray(tb[name].data), err_msg=name)


@pytest.mark.parametrize("kept", [[], ["delta_heads"], ["rank", "alpha", "target_layers"]])
def test_missing_keys_take_the_official_defaults(tmp_path, kept):
    """A config holding only some keys converts exactly as the full official one (every key, defaults
    as the official dataclass writes them): the converter's defaults are the official defaults."""
    config, tensors = make_adapter(hf_model("qwen3").config, {}, seed=3)
    assert config == OFFICIAL_CONFIG
    full = _converted(tmp_path, "full", config, tensors)
    partial = _converted(tmp_path, "partial", {k: config[k] for k in kept}, tensors)
    _assert_same_conversion(full, partial)
    fields = full[0]
    assert fields["deltamem.delta_heads"] == ["q", "k", "v", "o"]
    assert fields["deltamem.scale"] == 2.0 and fields["deltamem.rank"] == 8
    assert fields["deltamem.target_layers"] == list(range(hf_model("qwen3").config.num_hidden_layers))
    assert fields["deltamem.delta_scale_max"] == 2.0 and fields["deltamem.delta_scale_granularity"] == "layer"


@pytest.mark.parametrize("targets", [[], None, "missing"])
def test_empty_null_or_missing_target_layers_mean_every_layer(tmp_path, targets):
    config, tensors = make_adapter(hf_model("qwen3").config, VARIANTS["released"])
    config = {k: v for k, v in config.items() if k != "target_layers"}
    if targets != "missing":
        config["target_layers"] = targets
    fields, got = _converted(tmp_path, "a", config, tensors)
    n = hf_model("qwen3").config.num_hidden_layers
    assert fields["deltamem.target_layers"] == list(range(n)) and fields["deltamem.block_count"] == n
    assert {f"blk.{i}.dmem_mq.weight" for i in range(n)} <= set(got)


# Keys that only shape training (or archived paths) at values other than their defaults, all at once.
TRAINING_ONLY = {
    "beta_bias_init": -3.0, "output_init": "base_slice", "base_slice_ref_width": 4, "online_gain": 0.2,
    "delta_scale_init": 0.25, "delta_scale_parameterization": "alpha_over_rank",
    "memory_partition_sigmoid_gate_bias_init": -1.0, "global_memory_gate_bias_init": -1.0,
    "global_memory_read_logit_bias": 0.5, "memory_reader_hidden_size": 2048, "memory_reader_residual_scale": 0.2,
    "memory_reader_read_only": False, "latent_memory_hidden_size": 512, "latent_memory_residual_scale": 0.2,
    "latent_memory_slots": 8, "latent_memory_init_std": 0.01, "latent_gate_init": 0.05,
    "target_modules": ["self_attn", "mlp"],
}


def test_training_only_keys_are_accepted_and_change_nothing(tmp_path):
    config, tensors = make_adapter(hf_model("qwen3").config, VARIANTS["learned_scale_head_rmsnorm"])
    base = _converted(tmp_path, "base", config, tensors)
    varied = _converted(tmp_path, "varied", {**config, **TRAINING_ONLY}, tensors)
    _assert_same_conversion(base, varied)


def test_no_delta_heads_is_a_no_op_adapter_with_a_warning(tmp_path):
    """delta_heads [] (or "none") is valid in the official code: no correction, memory still kept."""
    config, tensors = make_adapter(hf_model("qwen3").config, NO_HEADS)
    for name, heads in (("empty", []), ("none", "none"), ("none_list", ["none"])):
        with pytest.warns(UserWarning, match="delta_heads"):
            fields, got = _converted(tmp_path, name, {**config, "delta_heads": heads}, tensors)
        assert fields["deltamem.delta_heads"] == ["none"]
        assert not any(n.endswith(("dq.weight", "dk.weight", "dv.weight", "do.weight")) for n in got)
        assert "blk.0.dmem_mq.weight" in got


# (key, value, message): configurations the official code refuses, or that are not its keys.
REFUSED = [
    ("num_memory_partitions", 2, "archived"),
    ("num_global_memory_partitions", 1, "archived"),
    ("memory_partition_routing", "hard", "archived"),
    ("memory_partition_basis", "separate", "archived"),
    ("tie_memory_partition_read_write", True, "archived"),
    ("memory_partition_read_mode", "sigmoid", "archived"),
    ("slot_read_top_k", 2, "archived"),
    ("global_memory_mode", "read_only", "archived"),
    ("global_memory_read_top_k", 1, "archived"),
    ("global_memory_merge_mode", "joint_softmax", "archived"),
    ("memory_reader_layers", [0], "archived"),
    ("memory_write_source", "hidden", "archived"),
    ("memory_write_proposals_per_message", 3, "archived"),
    ("synthetic_memory_slots", 4, "archived"),
    ("latent_memory_layers", [1], "archived"),
    ("memory_readout_mode", "synthetic_kv", "archived"),
    ("memory_write_granularity", "message_proposals", "archived"),
    ("memory_write_granularity", "paragraph_mean", "expected one of"),
    ("state_update_mode", "momentum", "expected one of"),
    ("delta_scale_granularity", "channel", "expected one of layer, head"),
    ("delta_scale_parameterization", "raw", "expected one of"),
    ("output_init", "xavier", "expected one of"),
    ("delta_heads", ["q", "x"], "allowed: q, k, v, o"),
    ("target_modules", ["mlp"], "self_attn"),
    ("target_layers", "0,1", "list of layer indices"),
    ("delta_scale_init", 2.0, "smaller than delta_scale_max"),
    ("delta_scale_max", 0.0, "> 0"),
    ("delta_o_rmsnorm_eps", 0.0, "> 0"),
    ("delta_o_rmsnorm_eps", float("nan"), "finite"),
    ("alpha", float("inf"), "finite"),
    ("rank", 0, ">= 1"),
    ("num_state_heads", 0, ">= 1"),
    ("base_slice_ref_width", 0, ">= 1"),
    ("latent_gate_init", 0.0, "> 0"),
    ("normalize_qk", "yes", "true or false"),
    ("memory_partitions", 4, "not keys of the official"),
]


@pytest.mark.parametrize("key,value,message", REFUSED, ids=[f"{k}={v!r}" for k, v, _ in REFUSED])
def test_refused_configuration_names_the_key(tmp_path, key, value, message):
    config, tensors = make_adapter(hf_model("qwen3").config, {}, seed=0)
    folder = write_adapter(tmp_path / "bad", {**config, key: value}, tensors)
    with pytest.raises(ValueError, match=key) as info:
        conv.convert_adapter(folder, tmp_path / "a.gguf", arch="qwen3")
    assert message in str(info.value)


def test_config_and_weights_must_agree(tmp_path):
    """Tensors the configured module would not have (the official loader fails on them too)."""
    cfg = hf_model("qwen3").config
    _, uncoupled = make_adapter(cfg, VARIANTS["uncoupled_lambda"])
    _, normed = make_adapter(cfg, VARIANTS["learned_scale_head_rmsnorm"])
    for name, tensors, stray in (("lambda", uncoupled, "lambda_proj"), ("norm", normed, "delta_o_rmsnorm_weight"),
                                 ("scale", normed, "delta_scale_raw")):
        folder = write_adapter(tmp_path / name, OFFICIAL_CONFIG, tensors)
        with pytest.raises(ValueError, match=stray):
            conv.convert_adapter(folder, tmp_path / "a.gguf", arch="qwen3")


def test_learned_scale_of_the_wrong_size(tmp_path):
    config, tensors = make_adapter(hf_model("qwen3").config, VARIANTS["learned_scale_layer"])
    folder = write_adapter(tmp_path / "a", {**config, "delta_scale_granularity": "head", "delta_scale_init": 0.5}, tensors)
    with pytest.raises(ValueError, match="delta_scale_raw: 1 values.*'head' stores 4"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", arch="qwen3")


def test_target_layers_the_model_lacks_or_that_miss_weights(tmp_path):
    """The official attach loop wraps the listed layers the model has: others are ignored (with a
    warning); a listed layer without weights, or weights of an unlisted layer, are errors."""
    model = hf_model("qwen3").config
    config, tensors = make_adapter(model, VARIANTS["target_subset"])   # weights for layer 1 only
    n = model.num_hidden_layers
    folder = write_adapter(tmp_path / "beyond", {**config, "target_layers": [1, n + 3]}, tensors)
    with pytest.warns(UserWarning, match=rf"\[{n + 3}\]"):
        fields, _ = read_gguf(conv.convert_adapter(folder, tmp_path / "a.gguf", base=hf_dir(tmp_path, "qwen3")))
    assert fields["deltamem.target_layers"] == [1]
    for name, targets, message in (("unweighted", [0, 1], "no weights for layer"), ("unlisted", [0], "target_layers does not select them")):
        weights = tensors if name == "unweighted" else {k.replace("layers.1.", "layers.0."): v for k, v in tensors.items()} | tensors
        folder = write_adapter(tmp_path / name, {**config, "target_layers": targets}, weights)
        with pytest.raises(ValueError, match=message):
            conv.convert_adapter(folder, tmp_path / "a.gguf", arch="qwen3")


def test_non_finite_weights_are_refused(tmp_path):
    config, tensors = make_adapter(hf_model("qwen3").config, VARIANTS["released"])
    key = "model.layers.1.self_attn.delta_o_proj"
    bad = dict(tensors, **{key: tensors[key].clone()})
    bad[key][0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 1 delta_o_proj: holds NaN"):
        conv.convert_adapter(write_adapter(tmp_path / "nan", config, bad), tmp_path / "a.gguf", arch="qwen3")


# ----------------------------------------------------------------------------- bad input

def _malicious_pickle_zip(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    pickle.dump({"model.layers.0.self_attn.memory_q_proj": Evil()}, buf, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("delta_mem_adapter/data.pkl", buf.getvalue())
        z.writestr("delta_mem_adapter/version", "3\n")


def test_restricted_unpickler_refuses_code(tmp_path):
    folder, _, _ = adapter_dir(tmp_path, "qwen3")
    marker = tmp_path / "pwned"
    _malicious_pickle_zip(folder / "delta_mem_adapter.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", arch="qwen3")
    assert not marker.exists()


def test_torch_reader_honours_offset_stride_and_dtypes(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    obj = {
        "view": base[1:5, 2:9:3],                      # offset + strides
        "transposed": base.t(),                          # non-contiguous
        "bf16": (base / 7).to(torch.bfloat16),
        "f16": (base / 3).to(torch.float16)[::2],
        "f64": base.to(torch.float64)[2],
        "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
    }
    torch.save(obj, tmp_path / "x.pt")
    got = load_torch_checkpoint(tmp_path / "x.pt")
    for key, value in obj.items():
        np.testing.assert_array_equal(got[key], value.to(torch.float64).numpy(), err_msg=key)
        assert got[key].shape == tuple(value.shape)


def test_truncated_pt_is_a_clear_error(tmp_path):
    folder, _, _ = adapter_dir(tmp_path, "qwen3")
    pt = folder / "delta_mem_adapter.pt"
    data = pt.read_bytes()
    pt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|damaged|corrupt"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", arch="qwen3")


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    folder, _, _ = adapter_dir(tmp_path, "qwen3", fmt="safetensors")
    st = folder / "delta_mem_adapter.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", arch="qwen3")


def test_wrong_tensor_shape_and_unknown_tensor(tmp_path):
    config, tensors = make_adapter(hf_model("qwen3").config, {}, seed=0)
    bad = dict(tensors)
    bad["model.layers.1.self_attn.beta_proj"] = bad["model.layers.1.self_attn.beta_proj"][:3]
    with pytest.raises(ValueError, match="layer 1 beta_proj"):
        conv.convert_adapter(write_adapter(tmp_path / "shape", config, bad), tmp_path / "a.gguf", arch="qwen3")
    extra = dict(tensors, **{"model.layers.0.self_attn.archive_readout_proj": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="archive_readout_proj"):
        conv.convert_adapter(write_adapter(tmp_path / "extra", config, extra), tmp_path / "a.gguf", arch="qwen3")
    missing = {k: v for k, v in tensors.items() if not k.endswith("layers.0.self_attn.delta_q_proj")}
    with pytest.raises(ValueError, match="delta_q_proj"):
        conv.convert_adapter(write_adapter(tmp_path / "missing", config, missing), tmp_path / "a.gguf", arch="qwen3")


@pytest.mark.parametrize("base_kind", ["gguf", "hf"])
def test_base_mismatch_is_a_clear_error(tmp_path, base_kind):
    folder, _, _ = adapter_dir(tmp_path, "llama")
    cfg = hf_model("llama").config

    def base(**changes):
        if base_kind == "gguf":
            return model_gguf(tmp_path, "llama", name=f"m{len(list(tmp_path.iterdir()))}.gguf", **changes)
        hf_changes = {{"block_count": "num_hidden_layers", "head_count_kv": "num_key_value_heads",
                       "embedding_length": "hidden_size"}[k]: v for k, v in changes.items()}
        return hf_dir(tmp_path, "llama", **hf_changes)

    with pytest.raises(ValueError, match="layers"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", base=base(block_count=cfg.num_hidden_layers + 1))
    with pytest.raises(ValueError, match="layer"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", base=base(block_count=1))
    with pytest.raises(ValueError, match="k projection width"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", base=base(head_count_kv=cfg.num_key_value_heads * 2))
    with pytest.raises(ValueError, match="hidden size|width"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", base=base(embedding_length=cfg.hidden_size * 2))
    with pytest.raises(ValueError, match="--arch qwen3 contradicts"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", base=base(), arch="qwen3")
    assert not (tmp_path / "a.gguf").exists()


def test_unsupported_base_architecture(tmp_path):
    folder, _, _ = adapter_dir(tmp_path, "llama")
    with pytest.raises(ValueError, match="gpt2"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", base=model_gguf(tmp_path, "llama", gguf_arch="gpt2"))


def test_llama_needs_base_for_permutation_and_some_arch(tmp_path):
    folder, _, _ = adapter_dir(tmp_path, "llama")
    with pytest.raises(ValueError, match="--base"):
        conv.convert_adapter(folder, tmp_path / "a.gguf", arch="llama")
    with pytest.raises(ValueError, match="--base|--arch"):
        conv.convert_adapter(folder, tmp_path / "a.gguf")


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path, monkeypatch):
    folder, _, _ = adapter_dir(tmp_path, "qwen3")
    out = tmp_path / "out" / "a.gguf"
    conv.convert_adapter(folder, out, arch="qwen3")
    before = out.read_bytes()

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(conv.writer, "add_metadata", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        conv.convert_adapter(folder, out, arch="qwen3", outtype="f16")
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.gguf"]


# ----------------------------------------------------------------------------- packing

def test_pack_holds_model_and_adapter(tmp_path):
    folder, _, _ = adapter_dir(tmp_path, "llama", "defaults")
    model = model_gguf(tmp_path, "llama")
    adapter_only = conv.convert_adapter(folder, tmp_path / "a.gguf", base=model)
    packed = conv.convert_adapter(folder, tmp_path / "packed.gguf", pack=model)
    mf, mt = read_gguf(model)
    af, at = read_gguf(adapter_only)
    pf, pt = read_gguf(packed)
    assert pf["general.type"] == "model"
    assert pf["general.architecture"] == "llama"
    assert set(pt) == set(mt) | set(at)
    for name, t in mt.items():
        assert pt[name].tensor_type == t.tensor_type
        np.testing.assert_array_equal(np.asarray(pt[name].data), np.asarray(t.data), err_msg=name)
    for name, t in at.items():
        np.testing.assert_array_equal(np.asarray(pt[name].data), np.asarray(t.data), err_msg=name)
    for key, value in mf.items():
        if key != "general.type":
            assert pf[key] == value, key
    for key, value in af.items():
        if key.startswith(("deltamem.", "adapter.")):
            assert pf[key] == value, key


# ----------------------------------------------------------------------------- command line

def test_register_cli_parses_and_converts(tmp_path):
    folder, _, _ = adapter_dir(tmp_path, "qwen3")
    parser = argparse.ArgumentParser(prog="deltamem")
    conv.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert-adapter", str(folder), "-o", str(tmp_path / "a.gguf"),
                              "--base", str(hf_dir(tmp_path, "qwen3")), "--outtype", "f16"])
    assert args.func(args) == 0
    fields, tensors = read_gguf(tmp_path / "a.gguf")
    assert tensors["blk.0.dmem_mq.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_cli_subprocess(tmp_path):
    """Through the installed entry point (needs the lead's cli.py to call register_cli)."""
    folder, _, _ = adapter_dir(tmp_path, "qwen3")
    out = tmp_path / "cli.gguf"
    run = subprocess.run([sys.executable, "-m", "pydeltamem.cli", "convert-adapter", str(folder), "-o", str(out),
                          "--arch", "qwen3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert read_gguf(out)[0]["adapter.type"] == "delta-mem"
    bad = subprocess.run([sys.executable, "-m", "pydeltamem.cli", "convert-adapter", str(folder), "-o", str(out),
                          "--arch", "qwen3", "--outtype", "f16", "--base", str(tmp_path / "nope.gguf")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "nope.gguf" in bad.stderr
