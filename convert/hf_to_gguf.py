"""Hugging Face checkpoint → GGUF, in llama.cpp's conventions: `deltamem convert HF_DIR -o OUT.gguf`.

Supported: LlamaForCausalLM (`llama`), Qwen2ForCausalLM (`qwen2`), Qwen3ForCausalLM (`qwen3`),
SmolLM3ForCausalLM (`smollm3`), with a byte-level BPE tokenizer. Weights are read one tensor at a time
(memory-mapped) and written straight into a temporary file next to the output, renamed into place only
when complete.

Tensor names (GGUF ← Hugging Face):
    token_embd.weight            ← model.embed_tokens.weight
    blk.N.attn_norm.weight       ← model.layers.N.input_layernorm.weight
    blk.N.attn_{q,k,v}.{weight,bias} ← model.layers.N.self_attn.{q,k,v}_proj.*  (q/k rows permuted for llama/smollm3;
                                        biases: always for qwen2, with attention_bias for the others)
    blk.N.attn_output.{weight,bias}  ← model.layers.N.self_attn.o_proj.*  (bias with attention_bias; never qwen2)
    blk.N.attn_{q,k}_norm.weight ← model.layers.N.self_attn.{q,k}_norm.weight  (qwen3)
    blk.N.ffn_norm.weight        ← model.layers.N.post_attention_layernorm.weight
    blk.N.ffn_{gate,up,down}.weight ← model.layers.N.mlp.{gate,up,down}_proj.weight
    output_norm.weight           ← model.norm.weight
    output.weight                ← lm_head.weight  (absent when the embeddings are tied)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .. import quantize as _quantize
from ..gguf_io import write_gguf
from ._hf_tokenizer import read_tokenizer
from ._safetensors import SafetensorsCheckpoint

HF_ARCH_TO_GGUF = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "SmolLM3ForCausalLM": "smollm3",
}
# llama.cpp rotates adjacent pairs ("normal" RoPE) for these, so their HF q/k rows (which rotate
# the two halves of each head, NEOX style) are re-ordered at conversion time. qwen2/qwen3 use NEOX RoPE.
_PERMUTED_QK_ARCHS = {"llama", "smollm3"}
# transformers' defaults when config.json omits tie_word_embeddings.
_TIED_BY_DEFAULT = {"llama": False, "qwen2": False, "qwen3": False, "smollm3": True}
# transformers' RoPE base when config.json gives none (its config classes' default_theta).
_DEFAULT_ROPE_THETA = {"llama": 10000.0, "qwen2": 10000.0, "qwen3": 10000.0, "smollm3": 2000000.0}

OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# `deltamem quantize`'s types (llama.cpp's mixes), lower-cased: the converter quantizes with the same
# rules and ggml's quantizers (pydeltamem/quantize.py, docs/quantization.md).
MIX_OUTTYPES = {name.lower(): mix for name, mix in _quantize.MIXES.items() if name.lower() not in OUTTYPES}
# Types gguf-py encodes itself; every other type goes through ggml (pydeltamem._core).
_GGUF_PY_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                  gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q8_0}

_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers some checkpoints carry that are recomputed at load time, never weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class HParams:
    arch: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    qkv_bias: bool  # q/k/v projections have biases
    out_bias: bool  # the output projection has a bias
    tied_embeddings: bool
    no_rope_layers: list[int] | None  # smollm3 only: 1 = layer applies RoPE, 0 = NoPE layer


# ----------------------------------------------------------------------------- hyper-parameters

def read_hparams(config: dict, notes: list[str]) -> HParams:
    """The hyper-parameters of config.json; `notes` collects what the caller should tell the user."""
    arch = _gguf_arch(config)
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    _reject_unsupported_features(config)
    # Qwen2's attention hard-codes biases on q/k/v and none on o (transformers ignores attention_bias).
    attention_bias = bool(config.get("attention_bias", False))
    hp = HParams(
        arch=arch,
        n_vocab=config["vocab_size"],
        n_ctx_train=config.get("max_position_embeddings", 4096),
        n_embd=n_embd,
        n_layer=config["num_hidden_layers"],
        n_ff=config["intermediate_size"],
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head,
        head_dim=config.get("head_dim") or n_embd // n_head,
        rope_theta=_rope_theta(config, arch, notes),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        qkv_bias=attention_bias or arch == "qwen2",
        out_bias=attention_bias and arch != "qwen2",
        tied_embeddings=bool(config.get("tie_word_embeddings", _TIED_BY_DEFAULT[arch])),
        no_rope_layers=_no_rope_layers(config) if arch == "smollm3" else None,
    )
    if hp.n_head % hp.n_head_kv != 0:
        raise ValueError(f"config.json: num_attention_heads={hp.n_head} is not a multiple of num_key_value_heads={hp.n_head_kv}")
    return hp


def _gguf_arch(config: dict) -> str:
    architectures = config.get("architectures") or []
    for name in architectures:
        if name in HF_ARCH_TO_GGUF:
            return HF_ARCH_TO_GGUF[name]
    raise ValueError(
        f"config.json: unsupported architecture {architectures!r}; supported: {', '.join(HF_ARCH_TO_GGUF)}")


def _rope_parameters(config: dict) -> tuple[str, dict]:
    """The RoPE parameters as transformers v5 reads them (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict),
    with the key they came from: v4's `rope_scaling`, when set, replaces v5's `rope_parameters`. A file
    holding both, with different contents, says two things: refused rather than resolved by that shim."""
    scaling, params = config.get("rope_scaling"), config.get("rope_parameters")
    if scaling and params and scaling != params:
        raise ValueError(f"config.json: rope_scaling {scaling!r} and rope_parameters {params!r} disagree "
                         "(transformers 5 would drop rope_parameters for the legacy rope_scaling); keep only one")
    key, rope = ("rope_scaling", scaling) if scaling else ("rope_parameters", params or {})
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"config.json: {key} {rope!r} is not one flat dict (per-layer-type RoPE is not supported)")
    return key, rope


def _rope_theta(config: dict, arch: str, notes: list[str]) -> float:
    """transformers v5 takes rope_theta from the RoPE parameters, the top-level key only when they lack it."""
    (key, rope), top = _rope_parameters(config), config.get("rope_theta")
    theta = rope.get("rope_theta", top if top is not None else _DEFAULT_ROPE_THETA[arch])
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise ValueError(f"config.json: rope_theta must be a positive finite number, got {theta!r}")
    if "rope_theta" in rope and top is not None and top != theta:
        notes.append(f"config.json: top-level rope_theta={top} ignored; transformers 5 uses {key}.rope_theta={theta}")
    return float(theta)


def _reject_unsupported_features(config: dict) -> None:
    _, rope = _rope_parameters(config)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in (None, "default"):
        raise ValueError(f"config.json: RoPE scaling {rope_type!r} is not supported yet (only unscaled RoPE)")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={partial} is not supported (RoPE must cover whole heads)")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={config['hidden_act']!r} is not supported (only silu / SwiGLU)")
    if config.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported")
    if config.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true is not supported (only full attention)")
    other_layers = sorted(set(config.get("layer_types") or []) - {"full_attention"})
    if other_layers:
        raise ValueError(f"config.json: layer_types {other_layers} are not supported (only full_attention)")


def _no_rope_layers(config: dict) -> list[int]:
    """SmolLM3's per-layer RoPE switch, HF semantics: 1 = layer uses RoPE, 0 = NoPE layer."""
    n_layer = config["num_hidden_layers"]
    flags = config.get("no_rope_layers")
    if flags is None:
        interval = config.get("no_rope_layer_interval") or 4
        flags = [int((il + 1) % interval != 0) for il in range(n_layer)]
    if len(flags) != n_layer:
        raise ValueError(f"config.json: no_rope_layers has {len(flags)} entries for {n_layer} layers")
    return [int(bool(f)) for f in flags]


def write_hparams(writer: gguf.GGUFWriter, hp: HParams, name: str, file_type: int) -> None:
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_context_length(hp.n_ctx_train)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.n_vocab)
    if hp.no_rope_layers is not None:
        writer.add_array(f"{hp.arch}.no_rope_layers", [int(flag) for flag in hp.no_rope_layers])


# ----------------------------------------------------------------------------- tensors

@dataclass
class TensorPlan:
    """One GGUF tensor: where it comes from, how it is transformed and stored."""
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # PyTorch order [out, in]
    qtype: gguf.GGMLQuantizationType
    permute_heads: int = 0  # >0: apply the llama q/k row permutation with this many heads


def expected_tensor_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture needs, by GGUF name, in PyTorch order [out, in]."""
    q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (hp.n_vocab, hp.n_embd)}
    for il in range(hp.n_layer):
        layer = {
            "attn_norm.weight": (hp.n_embd,),
            "attn_q.weight": (q_dim, hp.n_embd),
            "attn_k.weight": (kv_dim, hp.n_embd),
            "attn_v.weight": (kv_dim, hp.n_embd),
            "attn_output.weight": (hp.n_embd, q_dim),
            "ffn_norm.weight": (hp.n_embd,),
            "ffn_gate.weight": (hp.n_ff, hp.n_embd),
            "ffn_up.weight": (hp.n_ff, hp.n_embd),
            "ffn_down.weight": (hp.n_embd, hp.n_ff),
        }
        if hp.qkv_bias:
            layer |= {"attn_q.bias": (q_dim,), "attn_k.bias": (kv_dim,), "attn_v.bias": (kv_dim,)}
        if hp.out_bias:
            layer["attn_output.bias"] = (hp.n_embd,)
        if hp.arch == "qwen3":
            layer |= {"attn_q_norm.weight": (hp.head_dim,), "attn_k_norm.weight": (hp.head_dim,)}
        shapes |= {f"blk.{il}.{name}": shape for name, shape in layer.items()}
    shapes["output_norm.weight"] = (hp.n_embd,)
    if not hp.tied_embeddings:
        shapes["output.weight"] = (hp.n_vocab, hp.n_embd)
    return shapes


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face tensor, or None for a name we do not know."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    match = _LAYER_NAME.match(hf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"blk.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    return None


def plan_tensors(checkpoint: SafetensorsCheckpoint, hp: HParams, outtype: str,
                 notes: list[str]) -> list[TensorPlan]:
    expected = expected_tensor_shapes(hp)
    found: dict[str, str] = {}
    for hf_name in checkpoint.names():
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        name = gguf_tensor_name(hf_name)
        if name == "output.weight" and hp.tied_embeddings:
            continue  # a tied checkpoint may still store lm_head; the engine reuses token_embd
        if name is None or name not in expected:
            raise ValueError(f"checkpoint tensor {hf_name!r} is not part of a {hp.arch} model with this config.json")
        found[name] = hf_name
    missing = [name for name in expected if name not in found]
    if missing:
        raise ValueError(f"checkpoint is missing tensors (GGUF names): {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    facts = _quantize.ModelFacts(n_layer=hp.n_layer, n_gqa=hp.n_head // hp.n_head_kv,
                                 has_output="output.weight" in expected)
    plans = []
    for name, shape in expected.items():  # canonical order: embeddings, blocks, output
        hf_name = found[name]
        actual = checkpoint.shape(hf_name)
        if actual != shape:
            raise ValueError(f"tensor {hf_name!r} has shape {list(actual)}, config.json implies {list(shape)}")
        plans.append(TensorPlan(name, hf_name, shape, _storage_type(name, shape, outtype, notes, facts),
                                _permute_heads(name, hp)))
    return plans


def _storage_type(name: str, shape: tuple[int, ...], outtype: str, notes: list[str],
                  facts: _quantize.ModelFacts | None = None) -> gguf.GGMLQuantizationType:
    """Norms, biases and every 1-D tensor stay f32; matrices take the requested type (or the mix's)."""
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if outtype in MIX_OUTTYPES:
        qtype, note = _quantize.plan_type(MIX_OUTTYPES[outtype], name, shape[-1], facts)
        if note:
            notes.append(f"{name}: {note}")
        return qtype
    qtype = OUTTYPES[outtype][0]
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block_size != 0:
        notes.append(f"{name}: row length {shape[-1]} is not a multiple of {block_size}; stored as f16 instead of {outtype}")
        return gguf.GGMLQuantizationType.F16
    return qtype


def _permute_heads(name: str, hp: HParams) -> int:
    if hp.arch not in _PERMUTED_QK_ARCHS:
        return 0
    if re.search(r"\.attn_q\.(weight|bias)$", name):
        return hp.n_head
    if re.search(r"\.attn_k\.(weight|bias)$", name):
        return hp.n_head_kv
    return 0


def permute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Within each head, interleave the two rotary halves: row order [a0..a(d/2-1), b0..] → [a0, b0, a1, b1, ...].

    HF rotates element i with element i + d/2 (NEOX style); llama.cpp's normal RoPE rotates
    adjacent pairs, so reordering the output rows of q/k makes both compute the same attention.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def encode_tensor(data: np.ndarray, plan: TensorPlan) -> np.ndarray:
    data = np.asarray(data, dtype=np.float32)
    if plan.permute_heads:
        data = permute_qk_rows(data, plan.permute_heads)
    if plan.qtype not in _GGUF_PY_TYPES:
        return _quantize.quantize_array(data, plan.qtype, os.cpu_count() or 1)
    return gguf.quants.quantize(np.ascontiguousarray(data), plan.qtype)


def _nbytes_and_byte_shape(plan: TensorPlan) -> tuple[int, tuple[int, ...]]:
    block_size, type_size = gguf.GGML_QUANT_SIZES[plan.qtype]
    row_bytes = plan.shape[-1] // block_size * type_size
    byte_shape = (*plan.shape[:-1], row_bytes)
    return int(np.prod(byte_shape)), byte_shape


def _declare_tensor(writer: gguf.GGUFWriter, plan: TensorPlan) -> None:
    nbytes, byte_shape = _nbytes_and_byte_shape(plan)
    if plan.qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor_info(plan.gguf_name, plan.shape, np.dtype(np.float32), nbytes)
    elif plan.qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor_info(plan.gguf_name, plan.shape, np.dtype(np.float16), nbytes)
    else:
        writer.add_tensor_info(plan.gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=plan.qtype)


# ----------------------------------------------------------------------------- conversion

def convert_hf_to_gguf(hf_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f16", *,
                       name: str | None = None, progress: bool = True, overwrite: bool = True) -> list[str]:
    """Convert the checkpoint folder `hf_dir` to the GGUF file `out_path`; returns notes (e.g. f16 fallbacks)."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in OUTTYPES and outtype not in MIX_OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose one of {', '.join([*OUTTYPES, *MIX_OUTTYPES])}")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (expected a Hugging Face checkpoint folder)")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: already exists")

    config = json.loads((hf_dir / "config.json").read_text())
    notes: list[str] = []
    hp = read_hparams(config, notes)
    tokenizer = read_tokenizer(hf_dir, hp.n_vocab, config)
    checkpoint = SafetensorsCheckpoint(hf_dir)
    plans = plan_tensors(checkpoint, hp, outtype, notes)

    writer = gguf.GGUFWriter(None, hp.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    file_type = OUTTYPES[outtype][1] if outtype in OUTTYPES else MIX_OUTTYPES[outtype].file_type
    write_hparams(writer, hp, name or hf_dir.resolve().name, file_type)
    if outtype == "q8_0" or outtype in MIX_OUTTYPES:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer.write(writer)
    for plan in plans:
        _declare_tensor(writer, plan)
    write_gguf(writer, out_path, lambda: _write_tensor_data(writer, checkpoint, plans, out_path.name, progress))
    return notes


def _write_tensor_data(writer: gguf.GGUFWriter, checkpoint: SafetensorsCheckpoint, plans: list[TensorPlan],
                       label: str, progress: bool) -> None:
    from tqdm import tqdm

    total = sum(_nbytes_and_byte_shape(p)[0] for p in plans)
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=not progress) as bar:
        for plan in plans:
            writer.write_tensor_data(encode_tensor(checkpoint.tensor(plan.hf_name), plan))
            bar.update(_nbytes_and_byte_shape(plan)[0])


# ----------------------------------------------------------------------------- command line

def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a Hugging Face checkpoint folder to GGUF",
        description="Convert a Hugging Face checkpoint (config.json, *.safetensors, tokenizer.json) to GGUF. "
                    f"Supported architectures: {', '.join(HF_ARCH_TO_GGUF)}.")
    parser.add_argument("hf_dir", metavar="HF_DIR", help="checkpoint folder")
    parser.add_argument("-o", "--outfile", required=True, metavar="OUT.gguf", help="output GGUF file")
    parser.add_argument("--outtype", choices=[*OUTTYPES, *MIX_OUTTYPES], default="f16",
                        help="type of the weight matrices (norms and 1-D tensors stay f32); default f16. "
                             "The k-quant names are llama.cpp's mixes, as in `deltamem quantize`")
    parser.add_argument("--name", default=None, help="general.name (default: the folder's name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    notes = convert_hf_to_gguf(args.hf_dir, args.outfile, args.outtype, name=args.name,
                               progress=not args.no_progress)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.outfile}", file=sys.stderr)
    return 0
