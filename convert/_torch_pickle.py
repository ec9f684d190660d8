"""Read a `torch.save` checkpoint without torch, and without running its pickle.

A `torch.save` file is a zip archive: `<prefix>/data.pkl` holds a pickle that describes
the object, and `<prefix>/data/<key>` hold the raw bytes of each storage. Unpickling
with the standard `pickle` module would execute whatever callables the pickle names
(the classic arbitrary-code-execution hole), so this reader uses an Unpickler that only
knows the handful of globals a dict of tensors needs, and rebuilds every tensor as a
NumPy array from the raw storage bytes. Anything else in the pickle is refused.

Public entry point: `load_torch_checkpoint(path) -> dict[str, np.ndarray]` (float32 for
bf16/f16/f32 storages, float64 for f64 ones).
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle references something other than tensors and plain containers."""


# Storage class name (as torch pickles it, e.g. `torch.BFloat16Storage`) → (raw numpy dtype, element size).
# bf16 has no numpy dtype: it is read as uint16 and widened to float32 afterwards.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "BFloat16Storage": np.dtype("<u2"),
    "HalfStorage": np.dtype("<f2"),
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a torch storage class: only its name matters."""

    name: str


@dataclass
class _Storage:
    """A storage's raw elements (still in their on-disk dtype) and its name, for messages."""

    key: str
    kind: str
    elements: np.ndarray


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 is the upper half of a float32: shift the 16 bits into place."""
    flat = bits.reshape(-1).astype(np.uint32) << 16  # 1-D: numpy ops on 0-d arrays return scalars
    return flat.view(np.float32).reshape(bits.shape)


def _widen(raw: np.ndarray, kind: str) -> np.ndarray:
    if kind == "BFloat16Storage":
        return _bf16_bits_to_float32(raw)
    if kind == "DoubleStorage":
        return np.array(raw, dtype=np.float64)
    return np.array(raw, dtype=np.float32)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """Rebuild a tensor view (offset, size, stride in elements) of a storage as a fresh array.

    Bounds are checked before `as_strided`, which would otherwise read arbitrary memory
    for a malicious or truncated file.
    """
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("tensor rebuild without a storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"storage {storage.key}: invalid tensor geometry size={size} stride={stride} offset={offset}")
    n = storage.elements.size
    if 0 not in size:
        last = offset + sum((dim - 1) * st for dim, st in zip(size, stride))
        if last >= n:
            raise ValueError(
                f"storage {storage.key}: tensor of size {size} at offset {offset} needs element {last}, "
                f"but the storage holds only {n} (truncated file?)"
            )
    itemsize = storage.elements.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.elements[offset:] if n else storage.elements,
        shape=size,
        strides=tuple(st * itemsize for st in stride),
        writeable=False,
    )
    return _widen(np.array(view), storage.kind)


def _rebuild_parameter(data, _requires_grad, _backward_hooks, *_ignored):
    return data


# (module, name) → what the restricted unpickler hands back. Nothing here can run code
# beyond building arrays and dicts.
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, load_storage):
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name}: the checkpoint may only contain tensors "
            "(bf16/f16/f32/f64) in plain dicts"
        )

    def persistent_load(self, pid):
        # torch writes ('storage', storage_type, key, location, numel) for every storage.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"unsupported storage type {storage_type!r}")
        return self._load_storage(str(key), storage_type.name, int(numel))


def _archive_prefix(names: list[str]) -> str:
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise ValueError("not a torch.save zip archive (no single <name>/data.pkl inside)")
    return pkl[0][: -len("data.pkl")]


def load_torch_checkpoint(path: str | Path) -> dict:
    """Load a torch.save'd object made of dicts of tensors; tensors come back as NumPy arrays."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"{path}: cannot read as a torch.save zip archive ({e}); the file is truncated, corrupt, "
            "or in torch's legacy (pre-1.6) format"
        ) from e
    with archive:
        prefix = _archive_prefix(archive.namelist())
        big_endian = False
        if f"{prefix}byteorder" in archive.namelist():
            big_endian = archive.read(f"{prefix}byteorder").strip() == b"big"
        cache: dict[str, _Storage] = {}

        def load_storage(key: str, kind: str, numel: int) -> _Storage:
            if key not in cache:
                dtype = _STORAGE_DTYPES[kind]
                if big_endian:
                    dtype = dtype.newbyteorder(">")
                raw = archive.read(f"{prefix}data/{key}")
                if len(raw) < numel * dtype.itemsize:
                    raise ValueError(f"{path}: storage {key} holds {len(raw)} bytes, expected {numel * dtype.itemsize}")
                elements = np.frombuffer(raw, dtype=dtype, count=numel)
                cache[key] = _Storage(key, kind, elements.astype(dtype.newbyteorder("<")))
            return cache[key]

        try:
            return _RestrictedUnpickler(archive.read(f"{prefix}data.pkl"), load_storage).load()
        except ValueError:  # includes UnsafeCheckpointError and our own geometry checks
            raise
        except Exception as e:  # zip CRC errors, a cut-off pickle, malformed opcodes...
            raise ValueError(f"{path}: damaged torch checkpoint ({type(e).__name__}: {e})") from e
