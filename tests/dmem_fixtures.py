"""Random δ-mem adapters in the reference release format, for tiny Hugging Face backbones.

- `VARIANTS`: the adapter configurations the tests cover (issue 4's list), as overrides of
  `RELEASED_CONFIG` (rank 8, alpha 16, heads q,o, token writes, standard update,
  coupled λ, rankwise gates, one state head).
- `make_adapter(hf_config, overrides, seed)`: (config dict, {source key: bf16 torch tensor}).
  Every weight is non-zero — also the inactive heads' W_Δ and an unused λ projection, so an
  engine that applied them would be caught — and scaled so the adapter visibly moves logits.
- `write_adapter(folder, config, tensors, fmt)`: delta_mem_config.json + delta_mem_adapter.pt
  (torch.save of a dict of bf16 tensors) or .safetensors.
- `tiny_backbone(name)`: a tiny float32 HF model (from tests/tiny_models.py's specs).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pydeltamem.bench.make_models import RELEASE_ADAPTER_CONFIG as RELEASED_CONFIG   # the benchmark's too

HEADS = ("q", "k", "v", "o")

ALL_HEADS = {"delta_heads": ["q", "k", "v", "o"]}
VARIANTS: dict[str, dict] = {
    "released": {},
    "all_heads": ALL_HEADS,
    "lambda_outside": {**ALL_HEADS, "state_update_mode": "lambda_outside"},
    "no_lambda": {**ALL_HEADS, "state_update_mode": "no_lambda"},
    "uncoupled_lambda": {**ALL_HEADS, "couple_lambda": False},
    "uncoupled_lambda_outside": {"couple_lambda": False, "state_update_mode": "lambda_outside"},
    "scalar_gates": {"rankwise_gates": False},
    "scalar_gates_uncoupled": {"rankwise_gates": False, "couple_lambda": False, "num_state_heads": 2},
    "state_heads_4": {**ALL_HEADS, "num_state_heads": 4},
    "message_mean": {"memory_write_granularity": "message_mean"},
    "sentence_mean": {**ALL_HEADS, "memory_write_granularity": "sentence_mean"},
    "target_subset": {"target_layers": [1]},
    "rank_4": {"rank": 4, "alpha": 8},
    "rank_16": {"rank": 16, "alpha": 16},
    "o_rmsnorm": {"delta_o_rmsnorm": True, "delta_o_rmsnorm_eps": 1e-5},
    "learned_scale_scalar": {"trainable_delta_scale": True, "delta_scale_max": 2.0, "delta_scale_granularity": "scalar"},
    "learned_scale_head": {**ALL_HEADS, "trainable_delta_scale": True, "delta_scale_max": 1.5, "delta_scale_granularity": "head"},
    "learned_scale_channel": {
        **ALL_HEADS, "trainable_delta_scale": True, "delta_scale_max": 3.0, "delta_scale_granularity": "channel",
    },
    "learned_scale_rmsnorm": {
        "trainable_delta_scale": True, "delta_scale_max": 2.0, "delta_scale_granularity": "channel",
        "delta_o_rmsnorm": True,
    },
}


def adapter_config(overrides: dict | None = None) -> dict:
    return {**RELEASED_CONFIG, **(overrides or {})}


def backbone_widths(hf_config) -> dict[str, int]:
    """Output widths of q/k/v/o projections of a HF config (o = hidden size)."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    return {
        "q": hf_config.num_attention_heads * head_dim,
        "k": n_kv * head_dim,
        "v": n_kv * head_dim,
        "o": hf_config.hidden_size,
    }


def make_adapter(hf_config, overrides: dict | None = None, seed: int = 0, zero_corrections: bool = False):
    """A random adapter for `hf_config`: (config dict, {source key: bf16 tensor})."""
    config = adapter_config(overrides)
    gen = torch.Generator().manual_seed(seed)
    d_model = hf_config.hidden_size
    rank, heads = config["rank"], config["num_state_heads"]
    D = rank * heads
    gate_width = D if config["rankwise_gates"] else heads
    widths = backbone_widths(hf_config)
    n_layers = hf_config.num_hidden_layers
    layers = range(n_layers) if config["target_layers"] is None else config["target_layers"]

    def normal(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    def away_from_zero(*shape, std):
        # |N(0,std)| + std/4 with random sign: no element rounds to zero in bf16
        x = normal(*shape, std=std)
        return torch.sign(x + (x == 0)) * (x.abs() + std / 4)

    tensors = {}
    for layer in layers:
        p = f"model.layers.{layer}.self_attn."
        # RMSNormed x has entries ~1: std 1/sqrt(d) gives memory q/k/v entries ~1.
        for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
            tensors[p + name] = away_from_zero(D, d_model, std=1.0 / math.sqrt(d_model))
        tensors[p + "beta_proj"] = away_from_zero(gate_width, d_model, std=0.5 / math.sqrt(d_model))
        tensors[p + "beta_bias"] = away_from_zero(gate_width, std=0.5)
        tensors[p + "lambda_proj"] = away_from_zero(gate_width, d_model, std=0.5 / math.sqrt(d_model))
        tensors[p + "lambda_bias"] = away_from_zero(gate_width, std=0.5) + 1.0
        for head in HEADS:
            std = 0.0 if zero_corrections else 0.3 / math.sqrt(D)
            tensors[p + f"delta_{head}_proj"] = away_from_zero(widths[head], D, std=std) if std else torch.zeros(widths[head], D)
        tensors[p + "delta_o_rmsnorm_weight"] = 0.3 * (1.0 + 0.3 * normal(d_model, std=1.0))
        if config["trainable_delta_scale"]:
            granularity = config["delta_scale_granularity"]
            n = {"scalar": None, "head": 4, "channel": sum(widths.values())}[granularity]
            tensors[p + "delta_scale_raw"] = away_from_zero(1, std=1.0)[0] if n is None else away_from_zero(n, std=1.0)
    return config, {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}


def write_adapter(folder: Path, config: dict, tensors: dict, fmt: str = "pt", weight_suffix: bool = False) -> Path:
    """The reference release layout: delta_mem_config.json + delta_mem_adapter.{pt,safetensors}.

    weight_suffix=True appends `.weight` to every key (some exports do)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "delta_mem_config.json").write_text(json.dumps(config, indent=2))
    keyed = {(k + ".weight" if weight_suffix else k): v for k, v in tensors.items()}
    if fmt == "pt":
        torch.save(keyed, folder / "delta_mem_adapter.pt")
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.reshape(v.shape) for k, v in keyed.items()}, str(folder / "delta_mem_adapter.safetensors"))
    else:
        raise ValueError(fmt)
    return folder


# ----------------------------------------------------------------------------- backbones

# Which tests/tiny_models.py spec each architecture uses (small, GQA, distinct head_dim for Qwen3).
BACKBONE_SPECS = {"qwen3": "qwen3-untied", "llama": "llama-gqa", "smollm3": "smollm3-nope"}
TINY_VOCAB = 96


def tiny_backbone(arch: str, vocab_size: int = TINY_VOCAB):
    """A tiny random float32 HF causal LM of the given architecture (eval mode)."""
    import float64_attention
    from tiny_models import TINY_SPECS, make_config, random_model

    spec = TINY_SPECS[BACKBONE_SPECS[arch]]
    config = make_config(spec, vocab_size, {"bos": None, "eos": 1, "pad": 0})
    float64_attention.register()
    config._attn_implementation = float64_attention.FLOAT64_ATTENTION
    return random_model(config, spec.seed)


# ----------------------------------------------------------------------------- sessions

def session_calls(vocab_size: int = TINY_VOCAB, seed: int = 0) -> list[dict]:
    """A multi-call session as issue 4 asks: a prefill, single-token decodes, another prefill.

    Each call: tokens, message_ids (−1 = system/template glue, then increasing message ids;
    a decoded token carries the assistant message's id), sentence_ids (−1 on glue, several
    sentences per message), write flag. Pass the ids the adapter's granularity needs."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(2, vocab_size, (n,), generator=gen).tolist()

    return [
        {"tokens": tokens(12), "message_ids": [-1, -1, 0, 0, 0, 0, 0, 0, -1, 1, 1, 1],
         "sentence_ids": [-1, -1, 0, 0, 0, 1, 1, 1, -1, 2, 2, 2], "write": True},
        {"tokens": tokens(1), "message_ids": [1], "sentence_ids": [2], "write": True},
        {"tokens": tokens(1), "message_ids": [1], "sentence_ids": [3], "write": True},
        {"tokens": tokens(1), "message_ids": [1], "sentence_ids": [3], "write": False},
        {"tokens": tokens(9), "message_ids": [-1, -1, 2, 2, 2, 2, 2, -1, 3],
         "sentence_ids": [-1, -1, 4, 4, 5, 5, 5, -1, 6], "write": True},
    ]


def run_session(ref, calls: list[dict]) -> torch.Tensor:
    """Logits of every position of every call, concatenated ([sum T, vocab])."""
    return torch.cat([
        ref.decode(c["tokens"], message_ids=c.get("message_ids"), sentence_ids=c.get("sentence_ids"),
                   write=c.get("write", True))
        for c in calls
    ])
