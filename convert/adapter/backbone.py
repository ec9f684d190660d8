"""The backbone an adapter is converted for: read from a model GGUF or a Hugging Face folder.

It gives the architecture, validates the adapter's shapes (layer count, hidden size, q/k/v/o
widths) and the head counts for the RoPE row permutation of llama-style GGUFs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Backbone architectures (GGUF names) we can serve, and those whose GGUF converter
# permutes attn_q/attn_k rows into ggml's RoPE layout (as llama.cpp does).
SUPPORTED_ARCHS = ("qwen3", "qwen2", "llama", "smollm3")
ROPE_PERMUTED_ARCHS = ("llama", "smollm3")
HF_MODEL_TYPE_TO_ARCH = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama", "smollm3": "smollm3", "mistral": "llama"}


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


def check_arch(arch: str, where: str) -> str:
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
    arch = check_arch(str(_gguf_scalar(reader, "general.architecture")), str(path))
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
