"""Files for δ-mem memory and whole-context state: small, self-describing, written atomically.

Memory file: b"DMEMMEM1", a little-endian u32 header length, a JSON header (adapter fingerprint,
shape), then the state as float32 [layers, heads, rank, rank].
State file: b"DMEMSTA1", u32 header length, JSON header (model shape, KV type, token count,
adapter fingerprint), then int32 tokens, the KV rows, and the memory (if any) as float32.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np

MEMORY_MAGIC = b"DMEMMEM1"
STATE_MAGIC = b"DMEMSTA1"


def pack(magic: bytes, header: dict[str, Any], payload: list[bytes]) -> list[bytes]:
    head = json.dumps(header, sort_keys=True).encode()
    return [magic, struct.pack("<I", len(head)), head, *payload]


def unpack(path: str | os.PathLike, magic: bytes, what: str) -> tuple[dict[str, Any], memoryview]:
    """Returns the JSON header and the payload bytes of a file written by pack()."""
    with open(path, "rb") as f:
        return unpack_bytes(f.read(), magic, what, path)


def unpack_bytes(data: bytes, magic: bytes, what: str, path: str | os.PathLike) -> tuple[dict[str, Any], memoryview]:
    if not data.startswith(magic) or len(data) < len(magic) + 4:
        raise ValueError(f"{os.fspath(path)!r} is not a pydeltamem {what} file")
    (n,) = struct.unpack_from("<I", data, len(magic))
    start = len(magic) + 4
    if start + n > len(data):
        raise ValueError(f"{os.fspath(path)!r} is truncated (header)")
    try:
        header = json.loads(data[start:start + n])
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)!r} has a corrupted header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{os.fspath(path)!r} has a corrupted header: not a JSON object")
    return header, memoryview(data)[start + n:]


_REQUIRED = object()


def field(header: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str | os.PathLike,
          default: Any = _REQUIRED) -> Any:
    """header[key] checked to be a `kind` (bool is not an int here); ValueError naming the file when it
    is missing (without a default) or of another type."""
    if key not in header and default is not _REQUIRED:
        return default
    value = header.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"{os.fspath(path)!r} has a corrupted header: {key!r} is {value!r}, expected {names}")
    return value


def int_list(header: dict[str, Any], key: str, path: str | os.PathLike) -> list[int]:
    """header[key] checked to be a list of ints (ValueError naming the file otherwise)."""
    values = field(header, key, list, path)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{os.fspath(path)!r} has a corrupted header: {key!r} holds a non-integer")
    return values


def memory_header(adapter: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    return {"fingerprint": adapter["fingerprint"], "shape": list(shape)}


def memory_file(adapter: dict[str, Any], memory: np.ndarray) -> list[bytes]:
    """The pieces of a memory file holding memory (save_memory's format)."""
    return pack(MEMORY_MAGIC, memory_header(adapter, memory.shape), [memory.astype("<f4").tobytes()])


def check_memory_header(header: dict[str, Any], adapter: dict[str, Any], shape: tuple[int, ...], path: str) -> None:
    if header.get("fingerprint") != adapter["fingerprint"]:
        raise ValueError(f"{path!r} holds memory of another adapter (fingerprint {header.get('fingerprint')!r}, "
                         f"this model's adapter is {adapter['fingerprint']!r})")
    if int_list(header, "shape", path) != list(shape):
        raise ValueError(f"{path!r} holds memory of shape {header.get('shape')}, expected {list(shape)}")


def floats(payload: memoryview, count: int, path: str, what: str) -> np.ndarray:
    """count finite float32 values; ValueError for another length or a NaN/inf (corruption)."""
    if len(payload) != 4 * count:
        raise ValueError(f"{path!r}: {what} has {len(payload)} bytes, expected {4 * count} (truncated or corrupted)")
    values = np.frombuffer(payload, dtype="<f4").astype(np.float32)
    check_finite(values, path, what)
    return values


def check_finite(values: np.ndarray, path: str, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{path!r}: {what} holds NaN or infinite values (corrupted)")
