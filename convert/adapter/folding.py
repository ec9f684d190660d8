"""From source weights to the GGUF tensors: constant scales folded in, q/k rows permuted, dtypes chosen.

The official module computes each correction as (alpha/rank) · g · W_Δ o, g the learned scale
(1 when not trainable), and for Δo then applies the optional RMSNorm (with its weight) to that
product. Both factors are constants, so they go into W_Δ's rows, for every head and with or
without the norm: the runtime computes W'_Δ o (and rmsnorm(W'_Δo o) · w_norm) and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backbone import ROPE_PERMUTED_ARCHS, Backbone
from .config import HEAD_KINDS, AdapterConfig
from .source import LayerWeights

OUTTYPES = ("auto", "f32", "f16")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def learned_scales(raw: np.ndarray, cfg: AdapterConfig, where: str) -> dict[str, float]:
    """g = sigmoid(raw) · delta_scale_max per active head: raw holds 1 value (granularity
    "layer", shared by every head) or 4 (granularity "head", in q, k, v, o order)."""
    expected = 4 if cfg.delta_scale_granularity == "head" else 1
    if raw.size != expected:
        raise ValueError(
            f"{where} delta_scale_raw: {raw.size} values, but delta_scale_granularity={cfg.delta_scale_granularity!r} "
            f"stores {expected}"
        )
    g = sigmoid(raw.reshape(-1)) * cfg.delta_scale_max
    return {h: float(g[HEAD_KINDS.index(h)] if expected == 4 else g[0]) for h in cfg.delta_heads}


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


def _matrix(name: str, values: np.ndarray, outtype: str) -> OutputTensor:
    if outtype == "f16":
        if np.abs(values).max(initial=0.0) > np.finfo(np.float16).max:
            raise ValueError(f"{name}: values beyond f16's range; convert with --outtype f32")
        return OutputTensor(name, values.astype(np.float16))
    return OutputTensor(name, values.astype(np.float32))


def layer_output_tensors(index: int, w: LayerWeights, cfg: AdapterConfig, outtype: str, backbone: Backbone | None,
                         arch: str) -> list[OutputTensor]:
    prefix = f"blk.{index}.dmem_"
    out = [
        _matrix(prefix + "mq.weight", w.mq, outtype),
        _matrix(prefix + "mk.weight", w.mk, outtype),
        _matrix(prefix + "mv.weight", w.mv, outtype),
        _matrix(prefix + "beta.weight", w.beta_w, outtype),
        OutputTensor(prefix + "beta.bias", w.beta_b.astype(np.float32)),
    ]
    if w.lambda_w is not None:
        out.append(_matrix(prefix + "lambda.weight", w.lambda_w, outtype))
        out.append(OutputTensor(prefix + "lambda.bias", w.lambda_b.astype(np.float32)))

    g = learned_scales(w.scale_raw, cfg, f"layer {index}") if cfg.trainable_delta_scale else {}
    for head in cfg.delta_heads:
        folded = w.delta[head].astype(np.float64) * (cfg.scale * g.get(head, 1.0))   # in float64, rounded once
        if arch in ROPE_PERMUTED_ARCHS and head in ("q", "k"):
            folded = permute_rope_rows(folded, backbone.n_head if head == "q" else backbone.n_head_kv)
        out.append(_matrix(f"{prefix}d{head}.weight", folded, outtype))
    if w.o_norm is not None:
        out.append(OutputTensor(prefix + "do_norm.weight", w.o_norm.astype(np.float32)))
    return out


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
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if outtype != "auto":
        return outtype
    matrices = [t for t in tensors.values() if t.ndim == 2]
    return "f16" if matrices and all(is_16bit(t) for t in matrices) else "f32"
