"""Model and Context: the Pythonic layer over the native core (pydeltamem._core)."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from . import _core

_LOGITS = {"none": _core.LOGITS_NONE, "last": _core.LOGITS_LAST, "all": _core.LOGITS_ALL}
_KV_TYPES = {"f16": _core.KV_F16, "f32": _core.KV_F32}


def _kv_type_code(kv_type: str) -> int:
    try:
        return _KV_TYPES[kv_type]
    except KeyError:
        raise ValueError(f"kv_type must be one of {sorted(_KV_TYPES)}, got {kv_type!r}") from None


def _metadata_value(type_name: str, raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    if type_name == "str":
        return text
    if type_name == "bool":
        return text == "true"
    if type_name[0] in "iu":   # i8 ... u64
        return int(text)
    if type_name[0] == "f":    # f32, f64
        return float(text)
    if text.startswith("[") and ";" not in text:
        return json.loads(text)
    return text   # a long array, summarised as "[type; n]"


class Model:
    """A GGUF model loaded into memory. Weights are shared by every context made from it.

    >>> with Model("model.gguf") as m:
    ...     ctx = m.context()
    ...     logits = ctx.decode(m.tokenize("Hello"))
    """

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 4096, n_batch: int = 512,
                 n_threads: int | None = None, kv_type: str = "f16", use_mmap: bool = True):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"model file not found: {path!r}")
        if n_ctx <= 0 or n_batch <= 0:
            raise ValueError(f"n_ctx and n_batch must be positive (got n_ctx={n_ctx}, n_batch={n_batch})")
        _kv_type_code(kv_type)
        self.model_path = path
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.kv_type = kv_type
        self._native = _core.Model(path, use_mmap)
        self._metadata: dict[str, Any] | None = None

    # ---- lifecycle ----
    def close(self) -> None:
        """Frees the weights. Contexts made from this model keep it alive until they close."""
        self._native.close()

    @property
    def closed(self) -> bool:
        return self._native.closed

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.arch}, {self.n_layer} layers, n_vocab={self.n_vocab}"
        return f"<pydeltamem.Model {os.path.basename(self.model_path)!r} ({state})>"

    # ---- facts about the model ----
    @property
    def arch(self) -> str:
        return self._native.arch

    @property
    def n_vocab(self) -> int:
        return self._native.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self._native.n_ctx_train

    @property
    def n_layer(self) -> int:
        return self._native.n_layer

    @property
    def n_embd(self) -> int:
        return self._native.n_embd

    @property
    def metadata(self) -> dict[str, Any]:
        """GGUF key/value metadata; long arrays (vocabularies, merges) are summarised as "[type; n]"."""
        if self._metadata is None:
            self._metadata = {key: _metadata_value(type_name, raw)
                              for key, type_name, raw in self._native.metadata_items()}
        return dict(self._metadata)

    # ---- contexts ----
    def context(self, *, n_ctx: int | None = None, n_batch: int | None = None,
                n_threads: int | None = None, kv_type: str | None = None) -> "Context":
        """A new sequence with its own KV cache; defaults come from the Model's arguments."""
        return Context(self, n_ctx=n_ctx or self.n_ctx, n_batch=n_batch or self.n_batch,
                       n_threads=n_threads if n_threads is not None else self.n_threads,
                       kv_type=kv_type or self.kv_type)


class Context:
    """One sequence being decoded: its KV cache, thread pool and position."""

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_threads: int | None, kv_type: str):
        if n_ctx <= 0 or n_batch <= 0:
            raise ValueError(f"n_ctx and n_batch must be positive (got n_ctx={n_ctx}, n_batch={n_batch})")
        self.model = model
        self._native = _core.Context(model._native, n_ctx, n_batch, n_threads or 0, _kv_type_code(kv_type))

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_ctx(self) -> int:
        return self._native.n_ctx

    @property
    def n_past(self) -> int:
        """Number of tokens in the sequence so far."""
        return self._native.n_past

    def reset(self) -> None:
        """Forgets every token of the sequence."""
        self._native.reset()

    def decode(self, tokens: Sequence[int] | np.ndarray, logits: str = "last") -> np.ndarray | None:
        """Appends tokens to the sequence and returns logits.

        logits="last": float32 [n_vocab] for the last token; "all": float32 [len(tokens), n_vocab];
        "none": None (prefill only).
        """
        if logits not in _LOGITS:
            raise ValueError(f"logits must be one of {sorted(_LOGITS)}, got {logits!r}")
        ids = _token_list(tokens)
        out = self._native.decode(ids, _LOGITS[logits])
        return None if logits == "none" else out


def _token_list(tokens: Iterable[int] | np.ndarray) -> list[int]:
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError("tokens must be a 1-D array of integers")
        tokens = tokens.tolist()
    ids = list(tokens)
    for t in ids:
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
            raise ValueError(f"token ids must be integers, got {t!r}")
        if not -(2**31) <= int(t) < 2**31:
            raise ValueError(f"token id {t} is out of range")
    return [int(t) for t in ids]
