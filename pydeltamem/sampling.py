"""The sampling policy, in one place: SamplingParams, its defaults and its rules.

The defaults are the C engine's (`dm_sampler_default_params`, llama-cpp-python's create_completion
values); the one exception is the chat temperature, CHAT_TEMPERATURE (llama-cpp-python's
create_chat_completion and llama.cpp's chat examples use 0.2). Every layer — Model.create_completion,
create_chat_completion, chat sessions, the command line — builds a SamplingParams and hands it on;
the values are checked and normalised here, once, and the C side checks them again only as the C
API's own guarantee to C callers.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from . import _core

_C_DEFAULTS: dict[str, Any] = _core.sampler_default_params()
CHAT_TEMPERATURE = 0.2
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class SamplingParams:
    """What the sampler chain does with each row of logits (stages in this order: logit bias,
    penalties, top-k, typical-p, top-p, min-p, temperature, draw; temperature 0 is greedy).

    seed: None or -1 draw a random seed; else 0 .. 2**32-1, the same seed giving the same text.
    logit_bias: {token id: bias}, ids as ints or numeric strings (OpenAI's JSON keys); -inf bans."""

    temperature: float = _C_DEFAULTS["temperature"]
    top_k: int = _C_DEFAULTS["top_k"]
    top_p: float = _C_DEFAULTS["top_p"]
    min_p: float = _C_DEFAULTS["min_p"]
    typical_p: float = _C_DEFAULTS["typical_p"]
    repeat_penalty: float = _C_DEFAULTS["repeat_penalty"]
    frequency_penalty: float = _C_DEFAULTS["frequency_penalty"]
    presence_penalty: float = _C_DEFAULTS["presence_penalty"]
    penalty_last_n: int = _C_DEFAULTS["penalty_last_n"]
    seed: int | None = None
    logit_bias: Mapping[int, float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        for name, low, high in (("temperature", 0.0, math.inf), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0),
                                ("typical_p", 0.0, 1.0), ("repeat_penalty", 0.0, math.inf),
                                ("frequency_penalty", -math.inf, math.inf),
                                ("presence_penalty", -math.inf, math.inf)):
            value = _real(name, getattr(self, name))
            # temperature < 0 means greedy, as 0 does (llama-cpp-python's convention).
            if name == "temperature":
                value = max(value, 0.0)
            if not (low <= value <= high) or (name == "repeat_penalty" and value == 0.0):
                bounds = "> 0" if name == "repeat_penalty" else f"in [{low}, {high}]"
                raise ValueError(f"{name} must be {bounds}, got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "top_k", _integer("top_k", self.top_k, -2**31, 2**31 - 1))
        object.__setattr__(self, "penalty_last_n", _integer("penalty_last_n", self.penalty_last_n, 0, 2**31 - 1))
        object.__setattr__(self, "seed", _seed(self.seed))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))

    @classmethod
    def chat(cls, **overrides: Any) -> "SamplingParams":
        """The chat defaults (CHAT_TEMPERATURE) with overrides."""
        return cls(**{"temperature": CHAT_TEMPERATURE, **overrides})

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    def native(self) -> dict[str, Any]:
        """The keyword arguments of pydeltamem._core.Sampler."""
        values = asdict(self)
        values["logit_bias"] = dict(self.logit_bias) if self.logit_bias else None
        return values


def sampling_params(base: SamplingParams | None = None, **kwargs: Any) -> SamplingParams:
    """base (or the defaults) with the named fields changed; a value of None keeps base's (ask for a
    random seed with seed=-1, for no biases with logit_bias={}). An unknown name is a TypeError that
    lists the known ones."""
    unknown = set(kwargs) - SamplingParams.names()
    if unknown:
        raise TypeError(f"unknown sampling arguments: {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(sorted(SamplingParams.names()))})")
    if base is not None and not isinstance(base, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(base).__name__}")
    base = base if base is not None else SamplingParams()
    changes = {k: v for k, v in kwargs.items() if v is not None}
    return replace(base, **changes) if changes else base


def new_sampler(params: SamplingParams, history: Sequence[int] = ()) -> "_core.Sampler":
    """A native sampler for params that has seen history (the prompt): penalties look at the prompt
    too, as in llama.cpp; the history goes in in one call."""
    sampler = _core.Sampler(**params.native())
    if params.penalty_last_n > 0 and history:
        sampler.accept_tokens(list(history[-params.penalty_last_n:]))
    return sampler


def _real(name: str, value: Any, *, allow_minus_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) or (allow_minus_inf and value == -math.inf)):
        raise ValueError(f"{name} must be finite{' or -inf' if allow_minus_inf else ''}, got {value}")
    return value


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if seed == -1:
        return None
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [0, 2**32 - 1], -1 or None (random), got {seed}")
    return int(seed)


def _logit_bias(bias: Any) -> Mapping[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping {{token id: bias}}, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = key
        if isinstance(key, str):
            try:
                token = int(key.strip())
            except ValueError:
                raise ValueError(f"logit_bias key {key!r} is not a token id") from None
        token = _integer("logit_bias token id", token, 0, 2**31 - 1)
        out[token] = _real(f"logit_bias[{token}]", value, allow_minus_inf=True)
    return _FrozenDict(out) if out else None


class _FrozenDict(dict):
    """A read-only dict, so that a frozen SamplingParams stays frozen."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("SamplingParams.logit_bias is read-only; make new params with sampling_params(p, logit_bias=...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]
