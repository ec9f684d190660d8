"""Snapshots of the δ-mem reference chat runtime (`DeltaMemChatSession.save_snapshot`), read without torch.

A snapshot folder holds:
- session.json: {"messages": [...], "processed_input_ids": [...], "write_message_ids": [...],
  "write_sentence_ids": [...]}: the conversation and the tokens the model has seen;
- delta_state.pt: torch.save of {"model.layers.N.self_attn": state}, each state [1, H, r, r]
  ([1, r, r] with one state head), rows indexed by value dimensions as in `Context.memory`;
- past_key_values.pt: torch.save of the transformers KV cache (a DynamicCache, or the legacy tuple
  of (keys, values) per layer, or None), keys and values [1, KV heads, tokens, head size], keys
  after normalisation and RoPE in Hugging Face's dimension order.

The cache file is a pickle of transformers objects; it is read by a restricted unpickler that knows
only tensors, plain containers and inert stand-ins for the cache classes, so nothing in the file runs.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .convert._torch_pickle import load_torch_checkpoint

_STATE_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.self_attn$")
# Architectures whose GGUF stores each head's q/k rows interleaved for llama.cpp's RoPE (dimension i
# of the first half next to dimension i of the second): their KV keys come in that order too.
_INTERLEAVED_QK_ARCHS = {"llama", "smollm3"}


@dataclass
class ReferenceSnapshot:
    messages: list[dict[str, Any]]
    tokens: list[int]
    state: dict[int, np.ndarray]                        # target layer -> float32 [H, r, r] (batch dropped)
    kv: list[tuple[np.ndarray, np.ndarray]] | None      # per layer (keys, values) float32 [KV heads, tokens, head size]


# ---- reading --------------------------------------------------------------------------------------

class _Stub:
    """An inert stand-in for a pickled object: keeps what the pickle gives it."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


_STORAGES = {"BFloat16Storage": "<u2", "HalfStorage": "<f2", "FloatStorage": "<f4", "DoubleStorage": "<f8"}
_CACHE_CLASSES = ("DynamicCache", "DynamicLayer", "DynamicSlidingWindowLayer")


def _tensor(storage: tuple[str, np.ndarray], offset: int, size: Sequence[int], stride: Sequence[int], *_: Any) -> np.ndarray:
    """A tensor view of a storage, bounds checked, as a float32 (float64 for doubles) array."""
    kind, elements = storage
    size, stride, offset = tuple(map(int, size)), tuple(map(int, stride)), int(offset)
    if len(size) != len(stride) or min((offset, *size, *stride), default=0) < 0:
        raise ValueError(f"invalid tensor geometry size={size} stride={stride} offset={offset}")
    if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= elements.size:
        raise ValueError(f"a tensor of size {size} reaches past its storage (truncated file?)")
    view = np.lib.stride_tricks.as_strided(elements[offset:], size, tuple(s * elements.itemsize for s in stride),
                                           writeable=False)
    if kind == "BFloat16Storage":   # bf16 is the upper half of a float32
        return (view.astype(np.uint32) << 16).view(np.float32)
    return view.astype(np.float64 if kind == "DoubleStorage" else np.float32)


class _CacheUnpickler(pickle.Unpickler):
    """Unpickles tensors, plain containers and the transformers cache classes (as stubs); nothing else."""

    def __init__(self, archive: zipfile.ZipFile, folder: str, path: Path):
        super().__init__(io.BytesIO(archive.read(f"{folder}data.pkl")))
        self._archive, self._folder, self._path = archive, folder, path
        self._storages: dict[str, tuple[str, np.ndarray]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGES:
            return name
        if (module == "transformers.cache_utils" and name in _CACHE_CLASSES) or (module, name) == ("torch", "device"):
            return type(name, (_Stub,), {})
        raise ValueError(f"{self._path}: refusing to load {module}.{name} (not a tensor or a transformers KV cache)")

    def persistent_load(self, pid: Any) -> tuple[str, np.ndarray]:
        # torch writes ("storage", storage type, key, location, numel) for each storage.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGES):
            raise ValueError(f"{self._path}: unexpected storage {pid!r}")
        _, kind, key, _, numel = pid
        if key not in self._storages:
            dtype = np.dtype(_STORAGES[kind])
            raw = self._archive.read(f"{self._folder}data/{key}")
            if len(raw) < int(numel) * dtype.itemsize:
                raise ValueError(f"{self._path}: storage {key} is truncated")
            self._storages[key] = (kind, np.frombuffer(raw, dtype=dtype, count=int(numel)))
        return self._storages[key]


def _load_kv_file(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise ValueError(f"{path}: not a torch.save file")
            folder = pickles[0][:-len("data.pkl")]
            if f"{folder}byteorder" in archive.namelist() and archive.read(f"{folder}byteorder").strip() != b"little":
                raise ValueError(f"{path}: saved on a big-endian machine (not supported)")
            return _CacheUnpickler(archive, folder, path).load()
    except ValueError:
        raise
    except Exception as e:   # not a zip, a cut-off pickle, bad opcodes, CRC errors
        raise ValueError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})") from e


def _kv_layers(cache: Any, path: Path) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """(keys, values) per layer from a DynamicCache (transformers 5: .layers; 4: .key_cache/.value_cache)
    or the legacy tuple of pairs."""
    if cache is None:
        return None
    state = getattr(cache, "state", None)
    if isinstance(state, dict) and "layers" in state:
        pairs = [(getattr(layer, "state", {}).get("keys"), getattr(layer, "state", {}).get("values"))
                 for layer in state["layers"]]
    elif isinstance(state, dict) and "key_cache" in state:
        pairs = list(zip(state["key_cache"], state["value_cache"]))
    elif isinstance(cache, (tuple, list)):
        pairs = [tuple(layer)[:2] for layer in cache]
    else:
        raise ValueError(f"{path}: not a KV cache the reference runtime saves")
    out = []
    for k, v in pairs:
        if not (isinstance(k, np.ndarray) and isinstance(v, np.ndarray) and k.ndim == v.ndim == 4 and k.shape[0] == 1):
            raise ValueError(f"{path}: a layer's keys/values are not [1, heads, tokens, size] tensors")
        out.append((k[0].astype(np.float32), v[0].astype(np.float32)))
    return out


def _json_list(meta: dict, key: str, path: Path) -> list:
    value = meta.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{path}: {key} is not a list")
    return value


def read_reference_snapshot(folder: str | os.PathLike) -> ReferenceSnapshot:
    """Reads a folder written by DeltaMemChatSession.save_snapshot; ValueError if it is not one."""
    folder = Path(folder)
    meta_path = folder / "session.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: not a δ-mem reference session snapshot ({meta_path.name}: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: not a snapshot's session.json")
    messages = _json_list(meta, "messages", meta_path)
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ValueError(f"{meta_path}: messages must be {{'role', 'content'}} objects")
    tokens = _json_list(meta, "processed_input_ids", meta_path)
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise ValueError(f"{meta_path}: processed_input_ids must be token ids")
    state = {}
    for key, value in load_torch_checkpoint(folder / "delta_state.pt").items():
        match = _STATE_KEY.match(str(key))
        if match is None or not isinstance(value, np.ndarray):
            raise ValueError(f"{folder / 'delta_state.pt'}: {key!r} is not a δ-mem attention state")
        state[int(match.group(1))] = value[0] if value.ndim in (3, 4) and value.shape[0] == 1 else value
    kv_path = folder / "past_key_values.pt"
    return ReferenceSnapshot([dict(m) for m in messages], tokens, state, _kv_layers(_load_kv_file(kv_path), kv_path))


# ---- mapping to this engine ---------------------------------------------------------------------------

def memory_from_state(state: dict[int, np.ndarray], target_layers: Sequence[int], shape: tuple[int, ...],
                      where: str) -> np.ndarray:
    """The snapshot's per-layer states as Context.memory [n_target_layers, H, r, r] (zeros where the
    reference had no state yet). Another adapter's states are a ValueError."""
    _, heads, rank, _ = shape
    if state and sorted(state) != sorted(target_layers):
        raise ValueError(f"{where}: the memory covers layers {sorted(state)}, this adapter targets "
                         f"{sorted(target_layers)} (a snapshot of another adapter or model)")
    memory = np.zeros(shape, dtype=np.float32)
    for i, layer in enumerate(target_layers):
        if layer not in state:
            continue
        s = state[layer]
        if s.shape not in ((heads, rank, rank), (rank, rank) if heads == 1 else ()):
            raise ValueError(f"{where}: layer {layer}'s state has shape {list(s.shape)}, this adapter's is "
                             f"{[heads, rank, rank]} (a snapshot of another adapter)")
        memory[i] = s.reshape(heads, rank, rank)
    return memory


def engine_kv_rows(kv: list[tuple[np.ndarray, np.ndarray]], arch: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The snapshot's KV as Context.set_kv takes it: per layer [tokens, KV heads × head size], keys'
    head dimensions in this engine's order."""
    rows = []
    for k, v in kv:
        if arch in _INTERLEAVED_QK_ARCHS:   # Hugging Face's halves (d, d + size/2) become neighbours (2d, 2d+1)
            heads, n, size = k.shape
            k = k.reshape(heads, n, 2, size // 2).swapaxes(2, 3).reshape(heads, n, size)
        rows.append(tuple(np.ascontiguousarray(x.transpose(1, 0, 2).reshape(x.shape[1], -1)) for x in (k, v)))
    return rows
