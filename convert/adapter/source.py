"""Reading the release folder: the configuration, the tensors, and each layer's weights checked.

The official trainer saves `model.layers.{i}.self_attn.{name}` for every parameter of each wrapped
attention module: the memory projections, all four W_Δ (inactive heads too, as zeros), the gates,
λ's weights when λ is uncoupled, the Δo RMSNorm weight when enabled, the learned scale when
trainable. A tensor the configuration does not explain is an error: it means the configuration
does not describe the weights (the official loader fails on such a file as well).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._safetensors import read_safetensors_file
from .._torch_pickle import load_torch_checkpoint
from .config import HEAD_KINDS, AdapterConfig

CONFIG_FILE = "delta_mem_config.json"
PT_FILE = "delta_mem_adapter.pt"
SAFETENSORS_FILE = "delta_mem_adapter.safetensors"

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


def _as_float_arrays(tensors: dict, path: Path) -> dict[str, np.ndarray]:
    """float32 arrays (float64 stays float64), owning their data."""
    out = {}
    for key, value in tensors.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{path}: tensor {key!r} has dtype {value.dtype}, expected floating point")
        out[key] = np.array(value, dtype=np.float64 if value.dtype == np.float64 else np.float32)
    return out


def _flatten_checkpoint(obj, path: Path) -> dict:
    """A checkpoint is a dict of tensors, possibly wrapped as {"state_dict": {...}}."""
    if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def read_adapter_dir(adapter_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(raw config dict, tensors by source key)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter_dir}")
    config_path = adapter_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: missing {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    if (adapter_dir / PT_FILE).is_file():
        source = adapter_dir / PT_FILE
        tensors = _flatten_checkpoint(load_torch_checkpoint(source), source)
    elif (adapter_dir / SAFETENSORS_FILE).is_file():
        source = adapter_dir / SAFETENSORS_FILE
        tensors = read_safetensors_file(source)
    else:
        raise FileNotFoundError(f"{adapter_dir}: neither {PT_FILE} nor {SAFETENSORS_FILE} found")
    return config, _as_float_arrays(tensors, source)


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
    sources: dict[str, np.ndarray] = field(default_factory=dict)  # what the runtime uses, for the fingerprint


def _stored_without_reason(tensors: dict, cfg: AdapterConfig) -> list[str]:
    """Tensors the configuration says the official module would not have."""
    odd = []
    if cfg.couple_lambda:
        odd += [n for n in ("lambda_proj", "lambda_bias") if n in tensors]
    if not cfg.delta_o_rmsnorm and "delta_o_rmsnorm_weight" in tensors:
        odd.append("delta_o_rmsnorm_weight")
    if not cfg.trainable_delta_scale and "delta_scale_raw" in tensors:
        odd.append("delta_scale_raw")
    return odd


def collect_layer(index: int, tensors: dict[str, np.ndarray], cfg: AdapterConfig, widths: dict[str, int | None]) -> LayerWeights:
    """Checks one layer's tensors against the config (and the known widths, filling them in)."""
    where = f"layer {index}"

    def need(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{where}: missing tensor {name}")
        return tensors[name]

    odd = _stored_without_reason(tensors, cfg)
    if odd:
        raise ValueError(f"{where}: tensor(s) {', '.join(odd)} present, but the configuration (couple_lambda, "
                         "delta_o_rmsnorm, trainable_delta_scale) says the adapter has none: config and weights disagree")
    mq = need("memory_q_proj")
    if widths["o"] is None:
        widths["o"] = mq.shape[1] if mq.ndim == 2 else -1
    d_model, D, G = widths["o"], cfg.state_width, cfg.gate_width
    for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
        _expect_shape(need(name), (D, d_model), f"{where} {name} (rank {cfg.rank} × {cfg.num_state_heads} state heads)")
    _expect_shape(need("beta_proj"), (G, d_model), f"{where} beta_proj (rankwise_gates={cfg.rankwise_gates})")
    used = {n: tensors[n] for n in ("memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj")}
    used["beta_bias"] = _as_vector(need("beta_bias"), G, f"{where} beta_bias")

    # Stored whenever λ is uncoupled, used unless the update mode ignores λ (no_lambda).
    if cfg.uses_lambda_weights or "lambda_proj" in tensors:
        _expect_shape(need("lambda_proj"), (G, d_model), f"{where} lambda_proj (couple_lambda=false)")
    if cfg.uses_lambda_weights or "lambda_bias" in tensors:
        lambda_b = _as_vector(need("lambda_bias"), G, f"{where} lambda_bias")
    if cfg.uses_lambda_weights:
        used.update(lambda_proj=tensors["lambda_proj"], lambda_bias=lambda_b)

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
            used[name] = matrix

    o_normed = cfg.delta_o_rmsnorm and "o" in cfg.delta_heads
    if o_normed or "delta_o_rmsnorm_weight" in tensors:
        norm = _as_vector(need("delta_o_rmsnorm_weight"), d_model, f"{where} delta_o_rmsnorm_weight")
        if o_normed:
            used["delta_o_rmsnorm_weight"] = norm
    if cfg.trainable_delta_scale:
        used["delta_scale_raw"] = np.asarray(need("delta_scale_raw")).reshape(-1)

    for name, value in used.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{where} {name}: holds NaN or infinite values")
    as32 = lambda name: np.ascontiguousarray(used[name], dtype=np.float32) if name in used else None  # noqa: E731
    return LayerWeights(
        mq=as32("memory_q_proj"), mk=as32("memory_k_proj"), mv=as32("memory_v_proj"),
        beta_w=as32("beta_proj"), beta_b=as32("beta_bias"),
        lambda_w=as32("lambda_proj"), lambda_b=as32("lambda_bias"),
        delta={h: as32(f"delta_{h}_proj") for h in cfg.delta_heads},
        o_norm=as32("delta_o_rmsnorm_weight"), scale_raw=as32("delta_scale_raw"), sources=used,
    )
