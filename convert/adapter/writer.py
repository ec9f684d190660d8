"""The GGUF side: the fingerprint, the `deltamem.*` keys, and writing the file (alone or packed with a model)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from ...gguf_io import copy_metadata, write_gguf
from .backbone import ROPE_PERMUTED_ARCHS
from .config import AdapterConfig
from .folding import OutputTensor
from .source import LayerWeights

FORMAT_VERSION = 1
QK_NORM_EPS = 1e-6  # the official memory q/k normalisation: x / max(‖x‖, 1e-6)
NO_HEADS = "none"   # deltamem.delta_heads of a no-op adapter (GGUF has no empty arrays)


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
    """(key, gguf kind, value) triples for the deltamem.* namespace; cfg.target_layers resolved."""
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
        ("deltamem.delta_heads", "str_array", list(cfg.delta_heads) or [NO_HEADS]),
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


def add_metadata(writer, items) -> None:
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


def write_adapter_gguf(out_path: Path, arch: str, metadata, tensors: list[OutputTensor], name: str,
                       pack: str | Path | None = None) -> None:
    """The adapter alone (general.type = adapter), or every key and tensor of the model `pack`
    (unchanged) followed by the adapter's keys and tensors. Atomic: a failed write leaves no file."""
    from gguf import GGUFReader, GGUFWriter

    writer = GGUFWriter(None, arch)
    # (name, array, ggml type or None): a packed model's tensors first, unchanged, then the adapter's.
    out_tensors: list[tuple[str, np.ndarray, object]] = []
    if pack is not None:
        model = GGUFReader(pack, "r")
        copy_metadata(writer, model, skip=("general.architecture",))   # the writer sets it itself
        out_tensors += [(t.name, t.data, t.tensor_type) for t in model.tensors]
    else:
        writer.add_type("adapter")
        writer.add_name(name)
    add_metadata(writer, metadata)
    out_tensors += [(t.name, np.ascontiguousarray(t.data), None) for t in tensors]
    for tensor_name, data, raw_dtype in out_tensors:
        writer.add_tensor_info(tensor_name, data.shape, data.dtype, data.nbytes, raw_dtype=raw_dtype)
    write_gguf(writer, out_path, lambda: [writer.write_tensor_data(data) for _, data, _ in out_tensors])
