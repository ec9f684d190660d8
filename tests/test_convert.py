"""The HF → GGUF converter: files read back with gguf-py (keys, tensor names, types, shapes, values,
tokenizer metadata), its error messages, atomic writes and the `deltamem convert` command line."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

import tiny_models
from pydeltamem.convert.hf_to_gguf import convert_hf_to_gguf

SPEC_NAMES = list(tiny_models.TINY_SPECS)
OUTTYPES = ["f32", "f16", "bf16", "q8_0"]
T = gguf.GGMLQuantizationType
MATRIX_TYPE = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE values


# ----------------------------------------------------------------------------- helpers

def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def field(reader: gguf.GGUFReader, key: str):
    assert key in reader.fields, f"missing GGUF key {key}"
    return reader.fields[key].contents()


def tensors_by_name(reader: gguf.GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def hf_state(folder: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors, read with the safetensors library (not the converter's reader)."""
    from safetensors.numpy import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def expected_tensor_names(spec: tiny_models.TinySpec) -> set[str]:
    cfg = spec.config
    names = {"token_embd.weight", "output_norm.weight"}
    if not cfg["tie_word_embeddings"]:
        names.add("output.weight")
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    if spec.architecture == "qwen3":
        per_layer += ["attn_q_norm", "attn_k_norm"]
    for il in range(cfg["num_hidden_layers"]):
        names |= {f"blk.{il}.{n}.weight" for n in per_layer}
        names |= {f"blk.{il}.{n}.bias" for n in biased_projections(spec)}
    return names


def biased_projections(spec: tiny_models.TinySpec) -> tuple[str, ...]:
    """transformers' Qwen2Attention hard-codes bias=True on q/k/v and False on o; the others follow attention_bias."""
    if spec.architecture == "qwen2":
        return ("attn_q", "attn_k", "attn_v")
    return ("attn_q", "attn_k", "attn_v", "attn_output") if spec.config.get("attention_bias") else ()


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def as_float32(tensor) -> np.ndarray:
    """A GGUF tensor's values as float32 in PyTorch order [out, in]."""
    data = dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


# ----------------------------------------------------------------------------- metadata and tensors

@pytest.mark.parametrize("name", SPEC_NAMES)
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_hparams_keys_match_config(tiny_checkpoint, tiny_gguf, name, outtype):
    spec = tiny_models.TINY_SPECS[name]
    cfg = read_config(tiny_checkpoint(name))
    reader = gguf.GGUFReader(tiny_gguf(name, outtype))
    arch = spec.architecture
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    expected = {
        "general.architecture": arch,
        "general.file_type": FILE_TYPE[outtype],
        f"{arch}.context_length": cfg["max_position_embeddings"],
        f"{arch}.embedding_length": cfg["hidden_size"],
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": cfg["num_attention_heads"],
        f"{arch}.attention.head_count_kv": cfg["num_key_value_heads"],
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.vocab_size": cfg["vocab_size"],
    }
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "general.name") == name
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(spec.config["rope_theta"], rel=1e-6)
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(spec.config["rms_norm_eps"], rel=1e-6)
    if arch == "smollm3":
        # HF semantics, 1 = RoPE: every 4th layer (il + 1 divisible by 4) is a NoPE layer.
        assert list(field(reader, "smollm3.no_rope_layers")) == [1, 1, 1, 0]
        assert reader.fields["smollm3.no_rope_layers"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]


@pytest.mark.parametrize("name", SPEC_NAMES)
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_tensor_names_types_and_shapes(tiny_checkpoint, tiny_gguf, name, outtype):
    spec = tiny_models.TINY_SPECS[name]
    state = hf_state(tiny_checkpoint(name))
    tensors = tensors_by_name(gguf.GGUFReader(tiny_gguf(name, outtype)))
    assert set(tensors) == expected_tensor_names(spec)
    hf_shape = {
        "token_embd.weight": state["model.embed_tokens.weight"].shape,
        "blk.0.attn_q.weight": state["model.layers.0.self_attn.q_proj.weight"].shape,
        "blk.0.attn_k.weight": state["model.layers.0.self_attn.k_proj.weight"].shape,
        "blk.0.attn_output.weight": state["model.layers.0.self_attn.o_proj.weight"].shape,
        "blk.0.ffn_down.weight": state["model.layers.0.mlp.down_proj.weight"].shape,
        "output_norm.weight": state["model.norm.weight"].shape,
    }
    for gguf_name, shape in hf_shape.items():  # GGUF lists dimensions innermost first (ggml's ne)
        assert tuple(int(d) for d in tensors[gguf_name].shape) == tuple(reversed(shape)), gguf_name
    for tensor in tensors.values():
        if len(tensor.shape) == 1:
            assert tensor.tensor_type == T.F32, f"{tensor.name}: 1-D tensors stay f32"
        elif outtype == "q8_0" and int(tensor.shape[0]) % 32 != 0:
            assert tensor.tensor_type == T.F16, f"{tensor.name}: rows not a multiple of 32 fall back to f16"
        else:
            assert tensor.tensor_type == MATRIX_TYPE[outtype], tensor.name


def test_q8_0_fallback_is_reported(tiny_checkpoint, tmp_path):
    # qwen3-tied has intermediate_size 80: ffn_down's rows (80 values) cannot be cut into 32-blocks.
    notes = convert_hf_to_gguf(tiny_checkpoint("qwen3-tied"), tmp_path / "m.gguf", "q8_0", progress=False)
    assert notes and all("ffn_down" in note and "f16" in note for note in notes)


def _llama_rope_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head reordered [0, d/2, 1, d/2+1, ...]: adjacent pairs rotate together in llama.cpp."""
    head_dim = w.shape[0] // n_heads
    order = []
    for h in range(n_heads):
        for i in range(head_dim // 2):
            order += [h * head_dim + i, h * head_dim + head_dim // 2 + i]
    return w[order]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_f32_values_and_qk_permutation(tiny_checkpoint, tiny_gguf, name):
    spec = tiny_models.TINY_SPECS[name]
    state = hf_state(tiny_checkpoint(name))
    tensors = tensors_by_name(gguf.GGUFReader(tiny_gguf(name, "f32")))
    cfg = spec.config
    permuted = spec.architecture in ("llama", "smollm3")
    for il in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{il}."
        q = state[prefix + "self_attn.q_proj.weight"]
        k = state[prefix + "self_attn.k_proj.weight"]
        if permuted:
            q = _llama_rope_order(q, cfg["num_attention_heads"])
            k = _llama_rope_order(k, cfg["num_key_value_heads"])
        np.testing.assert_array_equal(as_float32(tensors[f"blk.{il}.attn_q.weight"]), q)
        np.testing.assert_array_equal(as_float32(tensors[f"blk.{il}.attn_k.weight"]), k)
        pairs = {"attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                 "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                 "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                 "ffn_down.weight": "mlp.down_proj.weight"}
        if spec.architecture == "qwen3":
            pairs |= {"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"}
        for gguf_name, hf_name in pairs.items():
            np.testing.assert_array_equal(as_float32(tensors[f"blk.{il}.{gguf_name}"]), state[prefix + hf_name])
        # Every bias the checkpoint holds arrives (q/k rows in the same order as their weights'), and no other.
        heads = {"q": cfg["num_attention_heads"], "k": cfg["num_key_value_heads"]}
        for proj, gguf_name in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            hf_bias = state.get(f"{prefix}self_attn.{proj}_proj.bias")
            if hf_bias is None:
                assert f"blk.{il}.{gguf_name}.bias" not in tensors
                continue
            if permuted and proj in heads:
                hf_bias = _llama_rope_order(hf_bias[:, None], heads[proj])[:, 0]
            np.testing.assert_array_equal(tensors[f"blk.{il}.{gguf_name}.bias"].data, hf_bias)
    np.testing.assert_array_equal(as_float32(tensors["token_embd.weight"]), state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(as_float32(tensors["output_norm.weight"]), state["model.norm.weight"])
    if "output.weight" in tensors:
        np.testing.assert_array_equal(as_float32(tensors["output.weight"]), state["lm_head.weight"])


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_reduced_precision_values_are_close(tiny_checkpoint, tiny_gguf, outtype):
    state = hf_state(tiny_checkpoint("qwen3-untied"))
    tensors = tensors_by_name(gguf.GGUFReader(tiny_gguf("qwen3-untied", outtype)))
    # Worst-case rounding: f16 2^-11 and bf16 2^-8 relative; q8_0 stores q·d with d = max|block|/127
    # (itself rounded to f16), so |error| ≤ d/2 + 127·d·2^-11 < 0.57·d.
    for gguf_name, hf_name in [("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
                               ("output.weight", "lm_head.weight")]:
        ref = state[hf_name]
        got = as_float32(tensors[gguf_name])
        if outtype == "q8_0":
            blocks = ref.reshape(ref.shape[0], -1, 32)
            step = np.abs(blocks).max(axis=-1, keepdims=True) / 127
            assert np.all(np.abs(got.reshape(blocks.shape) - blocks) <= 0.57 * step)
        else:
            rel = {"f16": 2.0**-11, "bf16": 2.0**-8}[outtype]
            np.testing.assert_allclose(got, ref, rtol=rel * 1.01, atol=1e-7)


# ----------------------------------------------------------------------------- tokenizer metadata

@pytest.mark.parametrize("name", SPEC_NAMES)
def test_tokenizer_metadata(tiny_checkpoint, tiny_gguf, name):
    from tokenizers import Tokenizer

    spec = tiny_models.TINY_SPECS[name]
    folder = tiny_checkpoint(name)
    hf_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    n_vocab = read_config(folder)["vocab_size"]
    reader = gguf.GGUFReader(tiny_gguf(name, "f16"))

    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == spec.pre
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == n_vocab
    added = hf_tok.get_added_tokens_decoder()
    for i in range(n_vocab):
        expected = hf_tok.id_to_token(i)
        if expected is None:
            assert types[i] == gguf.TokenType.UNUSED, f"id {i} has no token: unused"
            continue
        assert tokens[i] == expected, f"token {i}"
        if i in added:
            assert types[i] == (gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED), expected
        else:
            assert types[i] == gguf.TokenType.NORMAL, expected
    assert gguf.TokenType.USER_DEFINED in types  # "<think>" is a non-special added token

    raw_merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    as_strings = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    assert field(reader, "tokenizer.ggml.merges") == as_strings

    assert field(reader, "tokenizer.ggml.eos_token_id") == hf_tok.token_to_id(spec.eos_token)
    assert field(reader, "tokenizer.ggml.add_bos_token") == (spec.bos_token is not None)
    if spec.bos_token is not None:
        assert field(reader, "tokenizer.ggml.bos_token_id") == hf_tok.token_to_id(spec.bos_token)
    assert "tokenizer.ggml.padding_token_id" in reader.fields
    assert field(reader, "tokenizer.ggml.eot_token_id") == hf_tok.token_to_id(
        "<|im_end|>" if "<|im_end|>" in spec.special_tokens else "<|eot_id|>")
    assert field(reader, "tokenizer.chat_template") == tiny_models.CHAT_TEMPLATE


def test_merges_in_string_form_are_accepted(tiny_checkpoint, tiny_gguf, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("qwen3-untied"), tmp_path / "hf")

    def to_strings(tok):
        tok["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    edit_json(folder / "tokenizer.json", to_strings)
    convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)
    reference = gguf.GGUFReader(tiny_gguf("qwen3-untied", "f16"))
    assert (field(gguf.GGUFReader(tmp_path / "m.gguf"), "tokenizer.ggml.merges")
            == field(reference, "tokenizer.ggml.merges"))


def test_add_bos_from_post_processor(tiny_checkpoint, tmp_path):
    # Without add_bos_token in tokenizer_config.json, the post-processor that prepends BOS decides.
    folder = copy_checkpoint(tiny_checkpoint("llama-gqa"), tmp_path / "hf")
    edit_json(folder / "tokenizer_config.json", lambda c: c.pop("add_bos_token"))
    convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), "tokenizer.ggml.add_bos_token") is True


def test_unknown_pre_tokenizer_is_rejected(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("qwen3-untied"), tmp_path / "hf")

    def other_regex(tok):
        tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|[^\w\s]+"
    edit_json(folder / "tokenizer.json", other_regex)
    with pytest.raises(ValueError, match=r"unknown pre-tokenizer.*Split"):
        convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)


# ----------------------------------------------------------------------------- config variants and errors

def test_unsupported_architecture_lists_supported(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("llama-bias"), tmp_path / "hf")
    edit_json(folder / "config.json", lambda c: c.update(architectures=["MistralForCausalLM"]))
    with pytest.raises(ValueError, match="MistralForCausalLM") as err:
        convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)
    for supported in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM"):
        assert supported in str(err.value)


@pytest.mark.parametrize("scaling", [
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},  # transformers v5
    {"rope_scaling": {"type": "yarn", "factor": 4.0}, "rope_theta": 10000.0},  # transformers v4
])
def test_rope_scaling_is_rejected(tiny_checkpoint, tmp_path, scaling):
    folder = copy_checkpoint(tiny_checkpoint("llama-bias"), tmp_path / "hf")

    def set_scaling(cfg):
        cfg.pop("rope_parameters", None)
        cfg.update(scaling)
    edit_json(folder / "config.json", set_scaling)
    with pytest.raises(ValueError, match=r"RoPE scaling '(linear|yarn)'"):
        convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)


def test_top_level_rope_theta_is_read(tiny_checkpoint, tmp_path):
    # transformers v4 configs carry rope_theta at the top level (and no rope_parameters).
    folder = copy_checkpoint(tiny_checkpoint("llama-bias"), tmp_path / "hf")

    def v4_style(cfg):
        cfg.pop("rope_parameters")
        cfg["rope_theta"] = 12345.0
        cfg["rope_scaling"] = None
    edit_json(folder / "config.json", v4_style)
    convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), "llama.rope.freq_base") == pytest.approx(12345.0)


def _drop_rope_keys(cfg: dict) -> None:
    for key in ("rope_theta", "rope_parameters", "rope_scaling"):
        cfg.pop(key, None)


# config.json layouts holding RoPE's base, and whether a top-level rope_theta goes unused (then it is
# reported); transformers 5 itself (AutoConfig) says which value it uses.
ROPE_THETA_LAYOUTS = {
    "both, disagreeing": ({"rope_theta": 12345.0, "rope_parameters": {"rope_type": "default", "rope_theta": 777.0}}, True),
    "both, agreeing": ({"rope_theta": 777.0, "rope_parameters": {"rope_type": "default", "rope_theta": 777.0}}, False),
    "parameters without theta": ({"rope_theta": 12345.0, "rope_parameters": {"rope_type": "default"}}, False),
    "v4 rope_scaling without theta": ({"rope_theta": 12345.0, "rope_scaling": {"type": "default"}}, False),
    "v4 rope_scaling with theta": (
        {"rope_theta": 12345.0, "rope_scaling": {"rope_type": "default", "rope_theta": 777.0}}, True),
    "absent": ({}, False),
}


@pytest.mark.parametrize("name", ["qwen2-tied", "smollm3-nope"])  # smollm3: transformers' default base is 2e6
@pytest.mark.parametrize("layout", list(ROPE_THETA_LAYOUTS))
def test_rope_theta_is_the_one_transformers_uses(tiny_checkpoint, tmp_path, name, layout):
    from transformers import AutoConfig

    folder = copy_checkpoint(tiny_checkpoint(name), tmp_path / "hf")
    rope, top_level_unused = ROPE_THETA_LAYOUTS[layout]

    def set_layout(cfg):
        _drop_rope_keys(cfg)
        cfg.update(copy.deepcopy(rope))
    edit_json(folder / "config.json", set_layout)
    expected = AutoConfig.from_pretrained(folder).rope_parameters["rope_theta"]
    notes = convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)
    arch = tiny_models.TINY_SPECS[name].architecture
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), f"{arch}.rope.freq_base") == pytest.approx(expected)
    ignored = [note for note in notes if "rope_theta" in note]
    if top_level_unused:  # the value not taken is reported, not dropped silently
        assert len(ignored) == 1 and "12345" in ignored[0] and "777" in ignored[0], notes
    else:
        assert not ignored, notes


@pytest.mark.parametrize("rope,match", [
    ({"rope_scaling": {"rope_type": "default", "rope_theta": 1000.0},
      "rope_parameters": {"rope_type": "default", "rope_theta": 2000.0}}, r"rope_scaling .* rope_parameters .* disagree"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 2000.0}}}, "per-layer-type"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -5.0}}, "positive finite"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": None}, "rope_theta": 10000.0}, "positive finite"),
    ({"rope_theta": float("inf")}, "positive finite"),
])
def test_unusable_rope_theta_is_refused(tiny_checkpoint, tmp_path, rope, match):
    folder = copy_checkpoint(tiny_checkpoint("qwen2-tied"), tmp_path / "hf")

    def set_rope(cfg):
        _drop_rope_keys(cfg)
        cfg.update(rope)
    edit_json(folder / "config.json", set_rope)
    with pytest.raises(ValueError, match=match):
        convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_qwen2_biases_whatever_attention_bias_says(tiny_checkpoint, tmp_path):
    """transformers' Qwen2 ignores attention_bias (q/k/v biased, o not): so does the converter."""
    folder = copy_checkpoint(tiny_checkpoint("qwen2-tied"), tmp_path / "hf")
    edit_json(folder / "config.json", lambda c: c.update(attention_bias=False))
    convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)
    names = set(tensors_by_name(gguf.GGUFReader(tmp_path / "m.gguf")))
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert "blk.0.attn_output.bias" not in names


def test_smollm3_no_rope_layers_from_interval(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("smollm3-nope"), tmp_path / "hf")

    def interval_only(cfg):
        cfg.pop("no_rope_layers")
        cfg["no_rope_layer_interval"] = 2
    edit_json(folder / "config.json", interval_only)
    convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)
    assert list(field(gguf.GGUFReader(tmp_path / "m.gguf"), "smollm3.no_rope_layers")) == [1, 0, 1, 0]


def test_bf16_checkpoint_is_read_without_torch_dtype_loss(tiny_checkpoint, tmp_path):
    """Released checkpoints are bf16; their values must arrive bit-exact in an f32 GGUF."""
    import torch
    from safetensors.torch import load_file

    src = tiny_checkpoint("qwen3-untied")
    folder = copy_checkpoint(src, tmp_path / "hf")
    model = tiny_models.load_reference(src).to(torch.bfloat16)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder)
    convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f32", progress=False)
    bf16 = load_file(folder / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].float().numpy()
    got = as_float32(tensors_by_name(gguf.GGUFReader(tmp_path / "m.gguf"))["blk.0.ffn_up.weight"])
    np.testing.assert_array_equal(got, bf16)


def test_missing_tensor_names_it(tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy_checkpoint(tiny_checkpoint("qwen3-untied"), tmp_path / "hf")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.gate_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors.*blk\.1\.ffn_gate\.weight"):
        convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)


def test_wrong_shape_names_tensor(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint("qwen3-untied"), tmp_path / "hf")
    edit_json(folder / "config.json", lambda c: c.update(intermediate_size=64))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.*shape"):
        convert_hf_to_gguf(folder, tmp_path / "m.gguf", "f16", progress=False)


def test_failed_conversion_leaves_no_partial_output(tiny_checkpoint, tmp_path, monkeypatch):
    """A failure while writing tensors must leave the old output untouched and no temporary file."""
    from pydeltamem.convert import hf_to_gguf

    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous contents")
    calls = {"n": 0}
    real_encode = hf_to_gguf.encode_tensor

    def failing_encode(data, plan):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full (simulated)")
        return real_encode(data, plan)

    monkeypatch.setattr(hf_to_gguf, "encode_tensor", failing_encode)
    with pytest.raises(RuntimeError, match="simulated"):
        convert_hf_to_gguf(tiny_checkpoint("qwen3-untied"), out, "f16", progress=False)
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ----------------------------------------------------------------------------- command line

def test_cli_convert(tiny_checkpoint, tmp_path):
    out = tmp_path / "cli.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "pydeltamem.cli", "convert", str(tiny_checkpoint("llama-gqa")), "-o", str(out),
         "--outtype", "q8_0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "llama"
    assert tensors_by_name(reader)["blk.0.ffn_up.weight"].tensor_type == T.Q8_0


def test_cli_reports_errors_without_traceback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    proc = subprocess.run(
        [sys.executable, "-m", "pydeltamem.cli", "convert", str(tmp_path), "-o", str(tmp_path / "x.gguf")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "GPT2LMHeadModel" in proc.stderr and "Qwen3ForCausalLM" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.gguf").exists()
