"""A small, torch-free reader for Hugging Face safetensors checkpoints (single file or sharded).

Why our own reader: the `safetensors` numpy API cannot return bfloat16 (numpy has no such
dtype), and most released checkpoints are bf16. The format is simple — an 8-byte little-endian
header length, a JSON header mapping names to dtype/shape/byte offsets, then raw data — so we
memory-map the file and widen bf16 to float32 ourselves, one tensor at a time.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

# safetensors dtype tags → numpy dtypes (BF16 is handled separately: stored as uint16 bit patterns).
_NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ITEMSIZES = {"BF16": 2, **{tag: np.dtype(t).itemsize for tag, t in _NUMPY_DTYPES.items()}}
_HEADER_LIMIT = 100 * 1024 * 1024  # a sane header is far smaller; more means a corrupt file


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 stored bits into place."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _check_entry(path: Path, name: str, entry, data_size: int) -> None:
    """A header entry must describe a tensor lying inside the file, with as many bytes as its shape needs."""
    try:
        dtype_tag, shape, (begin, end) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: malformed header entry for tensor {name!r} ({e!r})") from e
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or min(shape, default=0) < 0:
        raise ValueError(f"{path}: tensor {name!r} has invalid offsets or shape")
    if end > data_size:
        raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
    itemsize = _ITEMSIZES.get(dtype_tag) if isinstance(dtype_tag, str) else None   # unknown types fail on reading
    needed = int(np.prod(shape)) * (itemsize or 0)
    if itemsize is not None and end - begin != needed:
        raise ValueError(f"{path}: tensor {name!r} holds {end - begin} bytes, its shape {shape} needs {needed}")


class _SafetensorsFile:
    """One .safetensors file: its header parsed, its data memory-mapped on first use."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError(f"{path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _HEADER_LIMIT:
                raise ValueError(f"{path}: implausible safetensors header length {header_len}")
            header_bytes = f.read(header_len)
        if len(header_bytes) != header_len:
            raise ValueError(f"{path}: the header runs past the end of the file (truncated?)")
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: malformed safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise ValueError(f"{path}: malformed safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self.data_start = 8 + header_len
        data_size = path.stat().st_size - self.data_start
        for name, entry in header.items():
            _check_entry(path, name, entry, data_size)
        self._map: np.memmap | None = None

    def tensor(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        raw = self._map[self.data_start + begin : self.data_start + end]
        dtype_tag, shape = entry["dtype"], tuple(entry["shape"])
        if dtype_tag == "BF16":
            return _bf16_bits_to_float32(raw.view(np.uint16)).reshape(shape)
        if dtype_tag not in _NUMPY_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_tag}")
        return raw.view(_NUMPY_DTYPES[dtype_tag]).reshape(shape)


class SafetensorsCheckpoint:
    """All tensors of a checkpoint folder, by name, whether in one file or in index-listed shards."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index_path = folder / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            files = {name: folder / shard for name, shard in weight_map.items()}
        else:
            shards = sorted(folder.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{folder}: no *.safetensors files (and no model.safetensors.index.json)")
            files = {}
            for shard in shards:
                for name in _SafetensorsFile(shard).entries:
                    files[name] = shard
        self._opened: dict[Path, _SafetensorsFile] = {}
        self._file_of: dict[str, Path] = files
        for shard in set(files.values()):
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: listed in the safetensors index but missing")

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).entries[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        return self._file(name).tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def _file(self, name: str) -> _SafetensorsFile:
        path = self._file_of[name]
        if path not in self._opened:
            self._opened[path] = _SafetensorsFile(path)
        if name not in self._opened[path].entries:
            raise ValueError(f"{path}: the index lists tensor {name!r} but the file does not hold it")
        return self._opened[path]


def read_safetensors_file(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file, by name (bf16 widened to float32; views of the mapped file)."""
    file = _SafetensorsFile(Path(path))
    return {name: file.tensor(name) for name in file.entries}
