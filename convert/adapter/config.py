"""The adapter configuration: `delta_mem_config.json` as the official δ-mem code writes it.

The official trainer saves its configuration dataclass (`HFDeltaMemConfig`) with every field,
defaults included. Each key falls in one of four groups:

- RUNTIME: what the converted adapter computes; the defaults are the official ones.
- TRAINING: initialisation and training knobs, meaningless once trained: accepted, ignored
  (checked the way the official code checks them, so a file it refuses is refused here too).
- ARCHIVED: switches of readouts the official code itself has retired; they must hold their
  default, as the official code requires (the error names the key).
- ARCHIVED_PARAMETERS: numbers that only configure an archived path: accepted, ignored.

A key in none of the groups is refused: the official loader raises on unknown keys too, and
ignoring one could silently drop a setting that changes the arithmetic. `null` stands for the
key's default.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

HEAD_KINDS = ("q", "k", "v", "o")
UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")
GRANULARITIES = ("token", "message_mean", "sentence_mean")
SCALE_GRANULARITIES = ("layer", "head")   # one learned scale per layer, or one per head kind (q, k, v, o)

RUNTIME_DEFAULTS = {
    "rank": 8,
    "alpha": 16.0,
    "num_state_heads": 1,
    "normalize_qk": True,
    "couple_lambda": True,
    "state_update_mode": "standard",
    "rankwise_gates": True,
    "memory_write_granularity": "token",
    "delta_heads": list(HEAD_KINDS),
    "target_layers": [],          # empty: every layer
    "target_modules": ["self_attn"],
    "memory_readout_mode": "delta",
    "delta_o_rmsnorm": False,
    "delta_o_rmsnorm_eps": 1e-6,
    "trainable_delta_scale": False,
    "delta_scale_max": 2.0,
    "delta_scale_granularity": "layer",
}
TRAINING_DEFAULTS = {
    "beta_bias_init": -1.5,
    "output_init": "zero",
    "base_slice_ref_width": 8,
    "online_gain": 0.05,
    "delta_scale_init": 1.0,
    "delta_scale_parameterization": "alpha_over_rank",
}
# key -> (the only accepted value, what the key switches on, for the message)
ARCHIVED = {
    "num_memory_partitions": (1, "memory partitions"),
    "num_global_memory_partitions": (0, "global memory partitions"),
    "memory_partition_routing": ("soft", "partition routing"),
    "memory_partition_basis": ("shared", "partition bases"),
    "tie_memory_partition_read_write": (False, "tied partition reads and writes"),
    "memory_partition_read_mode": ("softmax", "partition read modes"),
    "slot_read_top_k": (0, "top-k slot reads"),
    "global_memory_mode": ("shared_rw", "global memory modes"),
    "global_memory_read_top_k": (0, "top-k global memory reads"),
    "global_memory_merge_mode": ("gated_residual", "global memory merges"),
    "memory_reader_layers": ([], "memory reader layers"),
    "memory_write_source": ("learned_hidden", "other memory write sources"),
    "memory_write_proposals_per_message": (2, "message-proposal writes"),
    "synthetic_memory_slots": (1, "synthetic memory slots"),
    "latent_memory_layers": ([], "latent memory readouts"),
}
ARCHIVED_PARAMETERS = {
    "memory_partition_sigmoid_gate_bias_init": -2.0,
    "global_memory_gate_bias_init": -2.0,
    "global_memory_read_logit_bias": 0.0,
    "memory_reader_hidden_size": 1024,
    "memory_reader_residual_scale": 0.1,
    "memory_reader_read_only": True,
    "latent_memory_hidden_size": 1024,
    "latent_memory_residual_scale": 0.1,
    "latent_memory_slots": 4,
    "latent_memory_init_std": 0.002,
    "latent_gate_init": 0.01,
}
OUTPUT_INITS = ("zero", "random", "base_slice", "base_slice_fixed")
KNOWN_KEYS = {**RUNTIME_DEFAULTS, **TRAINING_DEFAULTS, **{k: v for k, (v, _) in ARCHIVED.items()}, **ARCHIVED_PARAMETERS}


@dataclass(frozen=True)
class AdapterConfig:
    """The configuration values the runtime needs, every default resolved."""

    rank: int
    alpha: float
    num_state_heads: int
    normalize_qk: bool
    couple_lambda: bool
    update_mode: str
    rankwise_gates: bool
    write_granularity: str
    delta_heads: tuple[str, ...]              # in q, k, v, o order; empty: a no-op adapter
    target_layers: tuple[int, ...] | None     # None: every layer
    delta_o_rmsnorm: bool
    delta_o_rmsnorm_eps: float
    trainable_delta_scale: bool
    delta_scale_max: float
    delta_scale_granularity: str              # layer | head

    @property
    def state_width(self) -> int:
        return self.rank * self.num_state_heads

    @property
    def gate_width(self) -> int:
        return self.state_width if self.rankwise_gates else self.num_state_heads

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def uses_lambda_weights(self) -> bool:
        return not self.couple_lambda and self.update_mode != "no_lambda"


def _normalized(value):
    """Enumerated values compare as the official code compares them: stripped, lower case."""
    return value.strip().lower() if isinstance(value, str) else value


class _Keys:
    """Typed access to the raw JSON object, each complaint naming its key."""

    def __init__(self, raw: dict):
        self.raw = raw

    def get(self, key: str):
        value = self.raw.get(key)
        return KNOWN_KEYS[key] if value is None else value

    def fail(self, key: str, why: str):
        raise ValueError(f"config key {key!r} = {self.raw.get(key)!r}: {why}")

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        self.fail(key, "expected true or false")

    def integer(self, key: str, minimum: int) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, "expected an integer")
        if value < minimum:
            self.fail(key, f"must be >= {minimum}")
        return value

    def real(self, key: str, positive: bool = False) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, "expected a finite number")
        if positive and value <= 0:
            self.fail(key, "must be > 0")
        return float(value)

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        normalized = _normalized(self.get(key))
        if normalized not in choices:
            self.fail(key, f"not supported (expected one of {', '.join(choices)})")
        return normalized

    def int_list(self, key: str) -> list[int]:
        value = self.get(key)
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            self.fail(key, "expected a list of layer indices")
        return list(value)


def parse_delta_heads(value) -> tuple[str, ...]:
    """A list (or comma-separated string) of q, k, v, o; empty or "none" = no correction."""
    if isinstance(value, str):
        items = [part.strip().lower() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = [str(part).strip().lower() for part in value if str(part).strip()]
    else:
        raise ValueError(f"config key 'delta_heads' must be a list like ['q', 'o'], got {value!r}")
    if items in ([], ["none"]):
        return ()
    unknown = [h for h in items if h not in HEAD_KINDS]
    if unknown:
        raise ValueError(f"config key 'delta_heads' holds {unknown}; allowed: q, k, v, o")
    return tuple(h for h in HEAD_KINDS if h in items)


def _check_unknown_and_archived(keys: _Keys) -> None:
    unknown = sorted(k for k in keys.raw if k not in KNOWN_KEYS)
    if unknown:
        raise ValueError(
            f"config key(s) {', '.join(map(repr, unknown))} are not keys of the official δ-mem configuration "
            "(HFDeltaMemConfig); refusing rather than ignoring a setting that could change the arithmetic"
        )
    for key, (only, what) in ARCHIVED.items():
        value = keys.get(key)
        if isinstance(value, str):
            value = value.strip().lower()
        elif isinstance(value, tuple):
            value = list(value)
        if value != only:
            keys.fail(key, f"{what} are archived in the official δ-mem and not supported (only {only!r} is)")
    if _normalized(keys.get("memory_readout_mode")) != "delta":
        keys.fail("memory_readout_mode", "only the 'delta' readout is supported; the other readouts are archived")
    modules = keys.get("target_modules")
    modules = [modules] if isinstance(modules, str) else modules
    if not isinstance(modules, (list, tuple)) or "self_attn" not in modules:
        keys.fail("target_modules", "δ-mem wraps the attention modules: the list must hold 'self_attn'")


def _check_training_keys(keys: _Keys) -> None:
    """Values the official code refuses, although they no longer matter once trained."""
    keys.real("beta_bias_init")
    keys.real("online_gain")
    keys.choice("output_init", OUTPUT_INITS)
    keys.integer("base_slice_ref_width", 1)
    keys.choice("delta_scale_parameterization", ("alpha_over_rank",))
    for key in ("memory_partition_sigmoid_gate_bias_init", "global_memory_gate_bias_init",
                "global_memory_read_logit_bias", "memory_reader_residual_scale", "latent_memory_residual_scale"):
        keys.real(key)
    for key in ("memory_reader_hidden_size", "latent_memory_hidden_size", "latent_memory_slots"):
        keys.integer(key, 1)
    for key in ("latent_memory_init_std", "latent_gate_init"):
        keys.real(key, positive=True)
    keys.boolean("memory_reader_read_only")


def _target_layers(keys: _Keys) -> tuple[int, ...] | None:
    layers = keys.int_list("target_layers")
    return tuple(sorted(set(layers))) if layers else None


def parse_config(raw: dict) -> AdapterConfig:
    """Resolves the official defaults and refuses what the runtime (or the official code) does not support."""
    if not isinstance(raw, dict):
        raise ValueError("delta_mem_config.json must hold a JSON object")
    keys = _Keys(raw)
    _check_unknown_and_archived(keys)
    _check_training_keys(keys)
    scale_max = keys.real("delta_scale_max", positive=True)
    if keys.real("delta_scale_init", positive=True) >= scale_max:
        keys.fail("delta_scale_init", f"must be smaller than delta_scale_max ({scale_max})")
    if _normalized(keys.get("memory_write_granularity")) == "message_proposals":
        keys.fail("memory_write_granularity", "message_proposals writes are archived in the official δ-mem")
    delta_heads = parse_delta_heads(keys.get("delta_heads"))
    if not delta_heads:
        warnings.warn("config key 'delta_heads' is empty: the adapter applies no correction (its memory is still "
                      "written and read, as the official code does), so the model behaves as the bare backbone",
                      stacklevel=3)
    return AdapterConfig(
        rank=keys.integer("rank", 1),
        alpha=keys.real("alpha"),
        num_state_heads=keys.integer("num_state_heads", 1),
        normalize_qk=keys.boolean("normalize_qk"),
        couple_lambda=keys.boolean("couple_lambda"),
        update_mode=keys.choice("state_update_mode", UPDATE_MODES),
        rankwise_gates=keys.boolean("rankwise_gates"),
        write_granularity=keys.choice("memory_write_granularity", GRANULARITIES),
        delta_heads=delta_heads,
        target_layers=_target_layers(keys),
        delta_o_rmsnorm=keys.boolean("delta_o_rmsnorm"),
        delta_o_rmsnorm_eps=keys.real("delta_o_rmsnorm_eps", positive=True),
        trainable_delta_scale=keys.boolean("trainable_delta_scale"),
        delta_scale_max=scale_max,
        delta_scale_granularity=keys.choice("delta_scale_granularity", SCALE_GRANULARITIES),
    )
