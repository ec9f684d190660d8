"""Convert a trained δ-mem adapter (reference release format) to a GGUF adapter file.

    deltamem convert-adapter ADAPTER_DIR -o OUT.gguf [--base MODEL.gguf|HF_DIR]
                             [--outtype auto|f32|f16] [--pack MODEL.gguf] [--arch ARCH]

Input: `delta_mem_config.json` plus `delta_mem_adapter.pt` (read without torch, through a
restricted unpickler) or `delta_mem_adapter.safetensors`. Output: a GGUF whose keys and
tensors are specified in docs/adapter-format.md — read that first; this module is its
implementation. In short:

- every configuration value the runtime needs becomes a `deltamem.*` key;
- every weight becomes `blk.{layer}.dmem_*` (matrices f16 for 16-bit checkpoints, f32 for
  32-bit ones, or as --outtype says; vectors f32);
- constant scales (alpha/rank and the learned delta scale) are folded into the
  correction weights, so the runtime never multiplies by a scale;
- for backbones whose GGUF q/k rows are permuted for ggml's RoPE layout (llama,
  smollm3), W_Δq / W_Δk rows are permuted the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..gguf_io import copy_metadata, write_gguf
from ._torch_pickle import load_torch_checkpoint

CONFIG_FILE = "delta_mem_config.json"
PT_FILE = "delta_mem_adapter.pt"
SAFETENSORS_FILE = "delta_mem_adapter.safetensors"
FORMAT_VERSION = 1

HEAD_KINDS = ("q", "k", "v", "o")
UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")
GRANULARITIES = ("token", "message_mean", "sentence_mean")
QK_NORM_EPS = 1e-6  # DESIGN §3: x / max(‖x‖, 1e-6)

# Backbone architectures (GGUF names) we can serve, and those whose GGUF converter
# permutes attn_q/attn_k rows into ggml's RoPE layout (as llama.cpp does).
SUPPORTED_ARCHS = ("qwen3", "qwen2", "llama", "smollm3")
ROPE_PERMUTED_ARCHS = ("llama", "smollm3")
HF_MODEL_TYPE_TO_ARCH = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama", "smollm3": "smollm3", "mistral": "llama"}

# Source tensor name (under model.layers.{i}.self_attn.) → canonical name; aliases cover
# modules saved as nn.Linear / nn.RMSNorm ("beta_proj.bias", "delta_o_rmsnorm.weight").
SOURCE_NAMES = {
    "memory_q_proj": "memory_q_proj",
    "memory_k_proj": "memory_k_proj",
    "memory_v_proj": "memory_v_proj",
    "delta_q_proj": "delta_q_proj",
    "delta_k_proj": "delta_k_proj",
    "delta_v_proj": "delta_v_proj",
    "delta_o_proj": "delta_o_proj",
    "beta_proj": "beta_proj",
    "beta_bias": "beta_bias",
    "beta_proj.bias": "beta_bias",
    "lambda_proj": "lambda_proj",
    "lambda_bias": "lambda_bias",
    "lambda_proj.bias": "lambda_bias",
    "delta_o_rmsnorm_weight": "delta_o_rmsnorm_weight",
    "delta_o_rmsnorm": "delta_o_rmsnorm_weight",
    "delta_scale_raw": "delta_scale_raw",
}
_KEY_RE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.self_attn\.(.+?)(?:\.weight)?$")

# Learned-scale granularities (config `delta_scale_granularity`) and their spellings.
SCALE_GRANULARITY_ALIASES = {
    "scalar": "scalar", "global": "scalar", "layer": "scalar", "per_layer": "scalar",
    "head": "head", "per_head": "head", "head_kind": "head", "per_head_kind": "head",
    "module": "head", "per_module": "head",
    "channel": "channel", "per_channel": "channel", "output_channel": "channel",
    "per_output_channel": "channel",
}


# ---------------------------------------------------------------------------------------
# Reading the source adapter
# ---------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"BF16": "<u2", "F16": "<f2", "F32": "<f4", "F64": "<f8"}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader (numpy has no bf16, so safetensors.numpy can't be used)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise ValueError(f"{path}: header runs past the end of the file (truncated?)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed safetensors header ({e})") from e
    body = memoryview(data)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
        if end > len(body) or end - begin != int(np.prod(shape)) * np_dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} data out of range or wrong size (truncated?)")
        raw = np.frombuffer(body[begin:end], dtype=np_dtype).reshape(shape)
        if dtype == "BF16":
            tensors[name] = ((raw.reshape(-1).astype(np.uint32) << 16).view(np.float32)).reshape(shape)
        else:
            tensors[name] = raw.astype(np.float64 if dtype == "F64" else np.float32)
    return tensors


def _flatten_checkpoint(obj, path: Path) -> dict[str, np.ndarray]:
    """A checkpoint is a dict of tensors, possibly wrapped as {"state_dict": {...}}."""
    if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(obj)


def read_adapter_dir(adapter_dir: str | Path) -> tuple[dict, dict[str, np.ndarray], str]:
    """(raw config dict, tensors by source key, source file name)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter_dir}")
    config_path = adapter_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: missing {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    if (adapter_dir / PT_FILE).is_file():
        source = adapter_dir / PT_FILE
        tensors = _flatten_checkpoint(load_torch_checkpoint(source), source)
    elif (adapter_dir / SAFETENSORS_FILE).is_file():
        source = adapter_dir / SAFETENSORS_FILE
        tensors = read_safetensors(source)
    else:
        raise FileNotFoundError(f"{adapter_dir}: neither {PT_FILE} nor {SAFETENSORS_FILE} found")
    return config, tensors, source.name


def group_by_layer(tensors: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {canonical name: array}} from `model.layers.{i}.self_attn.{name}[.weight]` keys."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY_RE.match(key)
        name = SOURCE_NAMES.get(match.group(2)) if match else None
        if name is None:
            raise ValueError(f"unrecognised tensor {key!r} in the adapter (not a δ-mem weight this converter knows)")
        layer = layers.setdefault(int(match.group(1)), {})
        if name in layer:
            raise ValueError(f"tensor {key!r} duplicates {name} of layer {match.group(1)}")
        layer[name] = value
    if not layers:
        raise ValueError("the adapter holds no tensors")
    return layers


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass
class AdapterConfig:
    """The adapter configuration with every default resolved (DESIGN §3/§4)."""

    rank: int
    alpha: float
    num_state_heads: int
    normalize_qk: bool
    couple_lambda: bool
    update_mode: str
    rankwise_gates: bool
    write_granularity: str
    delta_heads: list[str]
    target_layers: list[int]
    delta_o_rmsnorm: bool
    delta_o_rmsnorm_eps: float
    trainable_delta_scale: bool
    delta_scale_max: float
    delta_scale_granularity: str  # "none" when not trainable, else scalar | head | channel

    @property
    def state_width(self) -> int:
        return self.rank * self.num_state_heads

    @property
    def gate_width(self) -> int:
        return self.state_width if self.rankwise_gates else self.num_state_heads

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def uses_lambda_weights(self) -> bool:
        return not self.couple_lambda and self.update_mode != "no_lambda"


def _as_bool(config: dict, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
    return value


def _as_choice(config: dict, key: str, default: str, choices: tuple[str, ...]) -> str:
    value = config.get(key, default)
    value = default if value is None else value
    if value not in choices:
        raise ValueError(f"config key {key!r} = {value!r} is not supported (expected one of {', '.join(choices)})")
    return value


def _reject_unsupported(config: dict) -> None:
    """Configurations the runtime does not implement are refused by name (issue 4)."""
    readout = config.get("memory_readout_mode", "delta")
    if readout not in (None, "delta"):
        raise ValueError(
            f"config key 'memory_readout_mode' = {readout!r} is not supported: only the 'delta' readout "
            "(corrections from the current state) is implemented, not archived readouts"
        )
    for key, value in config.items():
        lowered = key.lower()
        if "partition" in lowered and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1:
            raise ValueError(f"config key {key!r} = {value}: memory partitions > 1 are not supported")
        if "archive" in lowered and value not in (None, False, 0, "", "none", [], {}):
            raise ValueError(f"config key {key!r} = {value!r}: archived memory readouts are not supported")


def _parse_delta_heads(value) -> list[str]:
    if isinstance(value, str):
        items = [part for part in re.split(r"[,\s]+", value) if part]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"config key 'delta_heads' must be a list like ['q', 'o'], got {value!r}")
    heads = set()
    for item in items:
        head = str(item).lower().removesuffix("_proj")
        if head not in HEAD_KINDS:
            raise ValueError(f"config key 'delta_heads' holds {item!r}; allowed: q, k, v, o")
        heads.add(head)
    return [h for h in HEAD_KINDS if h in heads]


def _infer_delta_heads(layers: dict[int, dict[str, np.ndarray]]) -> list[str]:
    """Without `delta_heads`, a head is active when any layer stores a non-zero W_Δ for it."""
    return [h for h in HEAD_KINDS if any(np.any(t.get(f"delta_{h}_proj", 0)) for t in layers.values())]


def parse_config(config: dict, layers: dict[int, dict[str, np.ndarray]]) -> AdapterConfig:
    """Resolve defaults (DESIGN §3/§4) and check the values; shapes are checked later."""
    _reject_unsupported(config)
    num_state_heads = int(config.get("num_state_heads") or 1)
    if num_state_heads < 1:
        raise ValueError(f"config key 'num_state_heads' must be >= 1, got {num_state_heads}")
    first = layers[min(layers)]
    if "memory_q_proj" not in first:
        raise ValueError(f"layer {min(layers)}: missing memory_q_proj")
    state_width = first["memory_q_proj"].shape[0]
    rank = config.get("rank")
    if rank is None:
        if state_width % num_state_heads:
            raise ValueError(f"memory_q_proj has {state_width} rows, not a multiple of num_state_heads={num_state_heads}")
        rank = state_width // num_state_heads
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"config key 'rank' must be >= 1, got {rank}")
    alpha = float(config["alpha"]) if config.get("alpha") is not None else float(rank)

    targets = config.get("target_layers")
    if targets is None or targets == "all":
        target_layers = sorted(layers)
    else:
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, int) and t >= 0 for t in targets):
            raise ValueError(f"config key 'target_layers' must be null or a list of layer indices, got {targets!r}")
        target_layers = sorted(set(targets))
    if not target_layers:
        raise ValueError("config key 'target_layers' is empty: the adapter would target no layer")

    delta_heads = _parse_delta_heads(config["delta_heads"]) if config.get("delta_heads") is not None else _infer_delta_heads(layers)
    if not delta_heads:
        raise ValueError("config key 'delta_heads' is empty: the adapter would have no effect")

    trainable = _as_bool(config, "trainable_delta_scale", False)
    granularity = "none"
    if trainable:
        raw_granularity = config.get("delta_scale_granularity")
        if raw_granularity is None:
            granularity = "auto"  # decided from the shape of delta_scale_raw
        elif str(raw_granularity).lower() in SCALE_GRANULARITY_ALIASES:
            granularity = SCALE_GRANULARITY_ALIASES[str(raw_granularity).lower()]
        else:
            raise ValueError(
                f"config key 'delta_scale_granularity' = {raw_granularity!r} is not supported "
                "(expected scalar, head or channel)"
            )

    rankwise = config.get("rankwise_gates")
    if rankwise is None:  # not stated: the shape of beta_proj tells
        rankwise = first.get("beta_proj", np.zeros((state_width, 0))).shape[0] == state_width
    elif not isinstance(rankwise, bool):
        raise ValueError(f"config key 'rankwise_gates' must be true or false, got {rankwise!r}")

    return AdapterConfig(
        rank=rank,
        alpha=alpha,
        num_state_heads=num_state_heads,
        normalize_qk=_as_bool(config, "normalize_qk", True),
        couple_lambda=_as_bool(config, "couple_lambda", True),
        update_mode=_as_choice(config, "state_update_mode", "standard", UPDATE_MODES),
        rankwise_gates=rankwise,
        write_granularity=_as_choice(config, "memory_write_granularity", "token", GRANULARITIES),
        delta_heads=delta_heads,
        target_layers=target_layers,
        delta_o_rmsnorm=_as_bool(config, "delta_o_rmsnorm", False),
        delta_o_rmsnorm_eps=float(config.get("delta_o_rmsnorm_eps") or 1e-6),
        trainable_delta_scale=trainable,
        delta_scale_max=float(config.get("delta_scale_max") if config.get("delta_scale_max") is not None else 1.0),
        delta_scale_granularity=granularity,
    )


# ---------------------------------------------------------------------------------------
# The backbone (for --base / --pack validation and the q/k row permutation)
# ---------------------------------------------------------------------------------------


@dataclass
class Backbone:
    arch: str
    block_count: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    source: str

    @property
    def widths(self) -> dict[str, int]:
        return {
            "q": self.n_head * self.head_dim_k,
            "k": self.n_head_kv * self.head_dim_k,
            "v": self.n_head_kv * self.head_dim_v,
            "o": self.n_embd,
        }


def _check_arch(arch: str, where: str) -> str:
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    return arch


def _gguf_scalar(reader, key: str, default=None):
    field_ = reader.fields.get(key)
    if field_ is None:
        if default is None:
            raise ValueError(f"model GGUF lacks key {key!r}")
        return default
    value = field_.contents()
    if isinstance(value, list):  # per-layer arrays (e.g. head_count); we need them uniform
        if len(set(value)) != 1:
            raise ValueError(f"model GGUF key {key!r} varies per layer; not supported for δ-mem")
        value = value[0]
    return value


def backbone_from_gguf(path: str | Path) -> Backbone:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    kind = reader.fields.get("general.type")
    if kind is not None and kind.contents() == "adapter":
        raise ValueError(f"{path}: is an adapter GGUF, expected a model")
    arch = _check_arch(str(_gguf_scalar(reader, "general.architecture")), str(path))
    n_embd = int(_gguf_scalar(reader, f"{arch}.embedding_length"))
    n_head = int(_gguf_scalar(reader, f"{arch}.attention.head_count"))
    head_dim_k = int(_gguf_scalar(reader, f"{arch}.attention.key_length", n_embd // n_head))
    return Backbone(
        arch=arch,
        block_count=int(_gguf_scalar(reader, f"{arch}.block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(_gguf_scalar(reader, f"{arch}.attention.head_count_kv", n_head)),
        head_dim_k=head_dim_k,
        head_dim_v=int(_gguf_scalar(reader, f"{arch}.attention.value_length", head_dim_k)),
        source=str(path),
    )


def backbone_from_hf_dir(path: str | Path) -> Backbone:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config = config.get("text_config", config) if "hidden_size" not in config else config
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPE_TO_ARCH:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not supported")
    n_embd = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    return Backbone(
        arch=HF_MODEL_TYPE_TO_ARCH[model_type],
        block_count=int(config["num_hidden_layers"]),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        source=str(path),
    )


def load_backbone(path: str | Path) -> Backbone:
    path = Path(path)
    if path.is_dir():
        return backbone_from_hf_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"base model not found: {path}")
    return backbone_from_gguf(path)


# ---------------------------------------------------------------------------------------
# Shape validation
# ---------------------------------------------------------------------------------------


def _as_vector(array: np.ndarray, width: int, what: str) -> np.ndarray:
    """Biases may be stored as [width], or as one broadcast value ([] or [1])."""
    flat = np.asarray(array).reshape(-1)
    if flat.size == 1 and width != 1:
        return np.full(width, flat[0], dtype=flat.dtype)
    if flat.size != width:
        raise ValueError(f"{what}: expected {width} values, found shape {tuple(array.shape)}")
    return flat


def _expect_shape(array: np.ndarray, shape: tuple, what: str) -> None:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{what}: expected shape {list(shape)} (PyTorch [out, in]), found {list(array.shape)}")


@dataclass
class LayerWeights:
    """One targeted layer's weights, shapes checked, in PyTorch [out, in] order, float32."""

    mq: np.ndarray
    mk: np.ndarray
    mv: np.ndarray
    beta_w: np.ndarray
    beta_b: np.ndarray
    lambda_w: np.ndarray | None
    lambda_b: np.ndarray | None
    delta: dict[str, np.ndarray]  # active heads only
    o_norm: np.ndarray | None
    scale_raw: np.ndarray | None
    sources: dict[str, np.ndarray] = field(default_factory=dict)  # for the fingerprint


def collect_layer(index: int, tensors: dict[str, np.ndarray], cfg: AdapterConfig, widths: dict[str, int | None]) -> LayerWeights:
    """Check one layer's tensors against the config (and the known widths, filling them in)."""

    def need(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"layer {index}: missing tensor {name}")
        return tensors[name]

    where = f"layer {index}"
    mq = need("memory_q_proj")
    n_embd = mq.shape[1] if mq.ndim == 2 else -1
    if widths["o"] is None:
        widths["o"] = n_embd
    d_model = widths["o"]
    D = cfg.state_width
    for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
        _expect_shape(need(name), (D, d_model), f"{where} {name}")
    G = cfg.gate_width
    _expect_shape(need("beta_proj"), (G, d_model), f"{where} beta_proj (rankwise_gates={cfg.rankwise_gates})")
    beta_b = _as_vector(need("beta_bias"), G, f"{where} beta_bias")
    used = {n: tensors[n] for n in ("memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj")}
    used["beta_bias"] = beta_b

    lambda_w = lambda_b = None
    if cfg.uses_lambda_weights:
        lambda_w = need("lambda_proj")
        _expect_shape(lambda_w, (G, d_model), f"{where} lambda_proj (couple_lambda=false)")
        lambda_b = _as_vector(need("lambda_bias"), G, f"{where} lambda_bias")
        used.update(lambda_proj=lambda_w, lambda_bias=lambda_b)

    delta = {}
    for head in HEAD_KINDS:
        name = f"delta_{head}_proj"
        if name not in tensors:
            if head in cfg.delta_heads:
                raise ValueError(f"{where}: missing tensor {name} (head {head!r} is in delta_heads)")
            continue
        matrix = tensors[name]
        if matrix.ndim != 2 or matrix.shape[1] != D:
            raise ValueError(f"{where} {name}: expected shape [out, {D}], found {list(matrix.shape)}")
        if widths[head] is None:
            widths[head] = matrix.shape[0]
        _expect_shape(matrix, (widths[head], D), f"{where} {name}")
        if head in cfg.delta_heads:
            delta[head] = matrix
            used[name] = matrix

    o_norm = None
    if cfg.delta_o_rmsnorm and "o" in cfg.delta_heads:
        o_norm = _as_vector(need("delta_o_rmsnorm_weight"), d_model, f"{where} delta_o_rmsnorm_weight")
        used["delta_o_rmsnorm_weight"] = o_norm

    scale_raw = None
    if cfg.trainable_delta_scale:
        scale_raw = np.asarray(need("delta_scale_raw")).reshape(-1)
        used["delta_scale_raw"] = scale_raw

    as32 = lambda a: None if a is None else np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return LayerWeights(
        mq=as32(tensors["memory_q_proj"]), mk=as32(tensors["memory_k_proj"]), mv=as32(tensors["memory_v_proj"]),
        beta_w=as32(tensors["beta_proj"]), beta_b=as32(beta_b),
        lambda_w=as32(lambda_w), lambda_b=as32(lambda_b),
        delta={h: as32(m) for h, m in delta.items()},
        o_norm=as32(o_norm), scale_raw=as32(scale_raw), sources=used,
    )


# ---------------------------------------------------------------------------------------
# Folding scales, permuting rows
# ---------------------------------------------------------------------------------------


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def learned_scales(raw: np.ndarray, cfg: AdapterConfig, widths: dict[str, int], where: str) -> dict[str, np.ndarray]:
    """Per active head, the learned multiplier sigmoid(raw)·max: shape [1] or [out width].

    Accepted `delta_scale_raw` layouts (per layer, flattened):
    - scalar:  1 value, shared by every correction;
    - head:    4 values in q, k, v, o order, or one per active head in q, k, v, o order;
    - channel: q_out + k_out + v_out + o_out values (all four heads, q, k, v, o order
               concatenated), or the concatenation over the active heads only.
    """
    active = cfg.delta_heads
    g = sigmoid(raw) * cfg.delta_scale_max
    n = g.size
    by_head_all = {h: widths[h] for h in HEAD_KINDS}
    granularity = cfg.delta_scale_granularity
    if granularity == "auto":
        if n == 1:
            granularity = "scalar"
        elif n in (4, len(active)):
            granularity = "head"
        else:
            granularity = "channel"
    if granularity == "scalar" and n == 1:
        return {h: g.reshape(1) for h in active}
    if granularity == "head" and n in (4, len(active)):
        order = HEAD_KINDS if n == 4 else active
        return {h: g[order.index(h)].reshape(1) for h in active}
    if granularity == "channel":
        for heads in (HEAD_KINDS, active):
            if all(by_head_all[h] is not None for h in heads) and n == sum(by_head_all[h] for h in heads):
                out, start = {}, 0
                for h in heads:
                    out[h] = g[start : start + by_head_all[h]]
                    start += by_head_all[h]
                return {h: out[h] for h in active}
    raise ValueError(
        f"{where} delta_scale_raw: {n} values do not fit delta_scale_granularity={granularity!r} "
        f"with delta_heads={','.join(active)} (see docs/adapter-format.md for accepted shapes)"
    )


def permute_rope_rows(matrix: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder output rows per head from HF's rotate-half layout to ggml's interleaved RoPE
    layout: within each head, row j of the first half and row j of the second half become
    neighbours (2j, 2j+1). This is the permutation the model converter applies to
    attn_q/attn_k for llama-style GGUFs; W_Δq/W_Δk must follow it to stay aligned."""
    rows = matrix.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot permute {rows} rows into {n_heads} heads of even size")
    return (
        matrix.reshape(n_heads, 2, rows // n_heads // 2, *matrix.shape[1:])
        .swapaxes(1, 2)
        .reshape(matrix.shape)
    )


@dataclass
class OutputTensor:
    name: str
    data: np.ndarray  # numpy (PyTorch) order; ggml shape is the reverse


def layer_output_tensors(
    index: int, w: LayerWeights, cfg: AdapterConfig, widths: dict[str, int], outtype: str, backbone: Backbone | None, arch: str
) -> list[OutputTensor]:
    matrix_dtype = np.float16 if outtype == "f16" else np.float32
    prefix = f"blk.{index}.dmem_"
    out = [
        OutputTensor(prefix + "mq.weight", w.mq.astype(matrix_dtype)),
        OutputTensor(prefix + "mk.weight", w.mk.astype(matrix_dtype)),
        OutputTensor(prefix + "mv.weight", w.mv.astype(matrix_dtype)),
        OutputTensor(prefix + "beta.weight", w.beta_w.astype(matrix_dtype)),
        OutputTensor(prefix + "beta.bias", w.beta_b.astype(np.float32)),
    ]
    if w.lambda_w is not None:
        out.append(OutputTensor(prefix + "lambda.weight", w.lambda_w.astype(matrix_dtype)))
        out.append(OutputTensor(prefix + "lambda.bias", w.lambda_b.astype(np.float32)))

    learned = learned_scales(w.scale_raw, cfg, widths, f"layer {index}") if cfg.trainable_delta_scale else {}
    for head in cfg.delta_heads:
        # Fold in float64, round once. alpha/rank always goes into W_Δ. The learned scale
        # multiplies the final correction: into W_Δ rows, except for Δo under RMSNorm,
        # where it must come after the norm, i.e. into the norm weight.
        folded = w.delta[head].astype(np.float64) * cfg.scale
        if head in learned and not (head == "o" and cfg.delta_o_rmsnorm):
            folded = folded * learned[head].reshape(-1, 1)
        if arch in ROPE_PERMUTED_ARCHS and head in ("q", "k"):
            folded = permute_rope_rows(folded, backbone.n_head if head == "q" else backbone.n_head_kv)
        out.append(OutputTensor(f"{prefix}d{head}.weight", folded.astype(matrix_dtype)))
    if w.o_norm is not None:
        norm = w.o_norm.astype(np.float64)
        if "o" in learned:
            norm = norm * learned["o"]
        out.append(OutputTensor(prefix + "do_norm.weight", norm.astype(np.float32)))
    return out


# ---------------------------------------------------------------------------------------
# Fingerprint and GGUF writing
# ---------------------------------------------------------------------------------------


def fingerprint(cfg: AdapterConfig, layers: dict[int, LayerWeights]) -> str:
    """SHA-256 over the resolved configuration and the source values of every weight used.

    It identifies the trained adapter, independent of container (.pt/.safetensors),
    --outtype, folding, permutation and packing: memory files made with one conversion
    load with another conversion of the same adapter.
    """
    h = hashlib.sha256(b"deltamem-adapter-fingerprint-v1\0")
    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    for index in sorted(layers):
        for name in sorted(layers[index].sources):
            value = np.ascontiguousarray(layers[index].sources[name], dtype="<f4")
            h.update(f"\0{index}.{name}{list(value.shape)}\0".encode())
            h.update(value.tobytes())
    return h.hexdigest()


def adapter_metadata(cfg: AdapterConfig, widths: dict[str, int], block_count: int, arch: str, fp: str) -> list[tuple[str, str, object]]:
    """(key, gguf kind, value) triples for the deltamem.* namespace."""
    return [
        ("adapter.type", "str", "delta-mem"),
        ("deltamem.format_version", "u32", FORMAT_VERSION),
        ("deltamem.rank", "u32", cfg.rank),
        ("deltamem.num_state_heads", "u32", cfg.num_state_heads),
        ("deltamem.update_mode", "str", cfg.update_mode),
        ("deltamem.couple_lambda", "bool", cfg.couple_lambda),
        ("deltamem.rankwise_gates", "bool", cfg.rankwise_gates),
        ("deltamem.normalize_qk", "bool", cfg.normalize_qk),
        ("deltamem.qk_norm_eps", "f32", QK_NORM_EPS),
        ("deltamem.write_granularity", "str", cfg.write_granularity),
        ("deltamem.delta_heads", "str_array", list(cfg.delta_heads)),
        ("deltamem.target_layers", "i32_array", list(cfg.target_layers)),
        ("deltamem.delta_o_rmsnorm", "bool", cfg.delta_o_rmsnorm),
        ("deltamem.delta_o_rmsnorm_eps", "f32", cfg.delta_o_rmsnorm_eps),
        ("deltamem.scales_folded", "bool", True),
        ("deltamem.alpha", "f32", cfg.alpha),
        ("deltamem.scale", "f32", cfg.scale),
        ("deltamem.trainable_delta_scale", "bool", cfg.trainable_delta_scale),
        ("deltamem.delta_scale_max", "f32", cfg.delta_scale_max),
        ("deltamem.delta_scale_granularity", "str", cfg.delta_scale_granularity),
        ("deltamem.rope_permuted", "bool", arch in ROPE_PERMUTED_ARCHS and any(h in cfg.delta_heads for h in "qk")),
        ("deltamem.block_count", "u32", block_count),
        ("deltamem.embedding_length", "u32", widths["o"]),
        ("deltamem.q_length", "u32", widths["q"] or 0),
        ("deltamem.k_length", "u32", widths["k"] or 0),
        ("deltamem.v_length", "u32", widths["v"] or 0),
        ("deltamem.o_length", "u32", widths["o"]),
        ("deltamem.fingerprint", "str", fp),
    ]


def _add_metadata(writer, items) -> None:
    from gguf import GGUFValueType

    for key, kind, value in items:
        if kind == "str":
            writer.add_key_value(key, value, GGUFValueType.STRING)
        elif kind == "u32":
            writer.add_uint32(key, int(value))
        elif kind == "f32":
            writer.add_float32(key, float(value))
        elif kind == "bool":
            writer.add_bool(key, bool(value))
        elif kind == "str_array":
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
        elif kind == "i32_array":
            writer.add_key_value(key, [int(v) for v in value], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        else:  # pragma: no cover - programming error
            raise AssertionError(kind)


# ---------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------


def _validate_against_backbone(
    cfg: AdapterConfig, layers: dict[int, dict], widths: dict[str, int | None], backbone: Backbone, arch_arg: str | None, all_layers: bool
) -> None:
    where = f"base {backbone.source}"
    if arch_arg is not None and arch_arg != backbone.arch:
        raise ValueError(f"--arch {arch_arg} contradicts the base model's architecture {backbone.arch} ({where})")
    if max(cfg.target_layers) >= backbone.block_count:
        raise ValueError(
            f"adapter targets layer {max(cfg.target_layers)} but the base model has {backbone.block_count} layers ({where})"
        )
    if max(layers) >= backbone.block_count:
        raise ValueError(f"adapter holds weights for layer {max(layers)} but the base model has {backbone.block_count} layers ({where})")
    if all_layers and len(cfg.target_layers) != backbone.block_count:
        raise ValueError(
            f"adapter targets all layers (target_layers null) and has {len(cfg.target_layers)} of them, "
            f"but the base model has {backbone.block_count} layers ({where})"
        )
    expected = backbone.widths
    for head in HEAD_KINDS:
        if widths[head] is not None and widths[head] != expected[head]:
            what = "hidden size" if head == "o" else f"{head} projection width"
            raise ValueError(
                f"adapter {what} is {widths[head]} but the base model's is {expected[head]} ({where}); "
                "was the adapter trained for another model?"
            )


OUTTYPES = ("auto", "f32", "f16")


def is_16bit(array: np.ndarray) -> bool:
    """Every value is a bf16 value, or every value is an f16 value: a 16-bit checkpoint."""
    a32 = np.ascontiguousarray(array, dtype=np.float32)
    if not np.array_equal(a32, array):
        return False
    if not np.any(a32.view(np.uint32) & 0xFFFF):
        return True
    with np.errstate(over="ignore"):
        return bool(np.array_equal(a32.astype(np.float16).astype(np.float32), a32))


def resolve_outtype(outtype: str, tensors: dict[str, np.ndarray]) -> str:
    """The matrices' dtype for `outtype` (one of OUTTYPES). "auto": f16 when the checkpoint's matrices
    are 16-bit (the release's bf16 fits f16's 11-bit mantissa; only magnitudes below 6.1e-5 lose bits,
    by at most 3e-8), else f32."""
    if outtype != "auto":
        return outtype
    matrices = [t for t in tensors.values() if t.ndim == 2]
    return "f16" if matrices and all(is_16bit(t) for t in matrices) else "f32"


def convert_adapter(
    adapter_dir: str | Path,
    out_path: str | Path,
    base: str | Path | None = None,
    outtype: str = "auto",
    pack: str | Path | None = None,
    arch: str | None = None,
) -> Path:
    """Convert ADAPTER_DIR to a GGUF adapter at out_path (or, with `pack`, a model GGUF that
    also carries the adapter). Returns the output path. Raises ValueError/FileNotFoundError
    with a clear message on bad input."""
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out_path = Path(out_path)
    raw_config, raw_tensors, _source_name = read_adapter_dir(adapter_dir)
    outtype = resolve_outtype(outtype, raw_tensors)
    by_layer = group_by_layer(raw_tensors)
    cfg = parse_config(raw_config, by_layer)

    backbones = [load_backbone(p) for p in (base, pack) if p is not None]
    if pack is not None and not Path(pack).is_file():
        raise ValueError(f"--pack needs a model GGUF file, got {pack}")
    backbone = backbones[0] if backbones else None
    if len(backbones) == 2 and dataclasses.replace(backbones[0], source="") != dataclasses.replace(backbones[1], source=""):
        raise ValueError(f"--base {base} and --pack {pack} describe different models")
    if arch is not None:
        _check_arch(arch, "--arch")
    target_arch = backbone.arch if backbone else arch
    if target_arch is None:
        raise ValueError("the backbone architecture is unknown: pass --base MODEL.gguf|HF_DIR (recommended) or --arch")

    missing = [i for i in cfg.target_layers if i not in by_layer]
    if missing:
        raise ValueError(f"target layer(s) {missing} have no weights in the adapter")
    # Widths come from the adapter's own tensors first, so a mismatch with --base is
    # reported as such; widths the adapter does not pin down are then taken from the base.
    widths: dict[str, int | None] = {h: None for h in HEAD_KINDS}
    layers = {i: collect_layer(i, by_layer[i], cfg, widths) for i in cfg.target_layers}
    if backbone is not None:
        _validate_against_backbone(cfg, by_layer, widths, backbone, arch, all_layers=raw_config.get("target_layers") in (None, "all"))
        widths = dict(backbone.widths)
    if target_arch in ROPE_PERMUTED_ARCHS and backbone is None and any(h in cfg.delta_heads for h in "qk"):
        raise ValueError(
            f"a {target_arch} backbone needs W_Δq/W_Δk rows permuted per attention head: pass --base "
            "so the head counts are known"
        )

    if backbone is not None:
        block_count = backbone.block_count
    elif raw_config.get("target_layers") in (None, "all"):
        block_count = max(by_layer) + 1
    else:
        block_count = 0  # unknown without --base: the runtime skips that check
    fp = fingerprint(cfg, layers)
    tensors = [t for i in cfg.target_layers for t in layer_output_tensors(i, layers[i], cfg, widths, outtype, backbone, target_arch)]
    metadata = adapter_metadata(cfg, widths, block_count, target_arch, fp)

    from gguf import GGUFReader, GGUFWriter

    writer = GGUFWriter(None, target_arch)
    # (name, array, ggml type or None): a packed model's tensors first, unchanged, then the adapter's.
    out_tensors: list[tuple[str, np.ndarray, object]] = []
    if pack is not None:
        model = GGUFReader(pack, "r")
        copy_metadata(writer, model, skip=("general.architecture",))   # the writer sets it itself
        out_tensors += [(t.name, t.data, t.tensor_type) for t in model.tensors]
    else:
        writer.add_type("adapter")
        writer.add_name(Path(adapter_dir).resolve().name)
    _add_metadata(writer, metadata)
    out_tensors += [(t.name, np.ascontiguousarray(t.data), None) for t in tensors]
    for name, data, raw_dtype in out_tensors:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=raw_dtype)
    write_gguf(writer, out_path, lambda: [writer.write_tensor_data(data) for _, data, _ in out_tensors])
    return out_path


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _run_cli(args: argparse.Namespace) -> int:
    out = convert_adapter(args.adapter_dir, args.outfile, base=args.base, outtype=args.outtype, pack=args.pack, arch=args.arch)
    print(f"wrote {out}")
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert-adapter",
        help="convert a δ-mem adapter (delta_mem_config.json + .pt/.safetensors) to GGUF",
        description="Convert a trained δ-mem adapter to a GGUF adapter (format: docs/adapter-format.md).",
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder with delta_mem_config.json and delta_mem_adapter.pt|.safetensors")
    parser.add_argument("-o", "--outfile", required=True, metavar="OUT.gguf", help="output file")
    parser.add_argument("--base", metavar="MODEL.gguf|HF_DIR", help="backbone to validate against (and to take the architecture from)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="auto",
                        help="dtype of the weight matrices: auto (default) = f16 for a 16-bit (bf16/f16) checkpoint, "
                        "f32 for a 32-bit one")
    parser.add_argument("--pack", metavar="MODEL.gguf", help="write one GGUF holding this model and the adapter")
    parser.add_argument("--arch", choices=SUPPORTED_ARCHS, help="backbone architecture, when no --base is given")
    parser.set_defaults(func=_run_cli)
    return parser
