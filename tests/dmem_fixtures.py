"""Random δ-mem adapters in the official release format, for tiny Hugging Face backbones.

- `VARIANTS`: the adapter configurations the tests cover, as overrides of the official defaults
  (`OFFICIAL_CONFIG`: every key the official trainer writes; rank 8, alpha 16, all four heads,
  token writes, standard update, coupled λ, rankwise gates, one state head, every layer).
  Together they take every value of every option the runtime reads at least once, and every
  combination of learned scale (none, layer, head) with the Δo RMSNorm (off, on).
- `make_adapter(hf_config, overrides, seed)`: (config dict, {source key: bf16 torch tensor}),
  the config as the official `asdict` writes it and the tensors the official module saves:
  memory projections, all four W_Δ, the β gate, λ's weights when uncoupled, the Δo RMSNorm
  weight when enabled, the learned scale when trainable. Every weight is non-zero — the
  inactive heads' W_Δ too (the official stores zeros there), so an engine that applied them
  would be caught — and scaled so the adapter visibly moves logits.
- `write_adapter(folder, config, tensors, fmt)`: delta_mem_config.json + delta_mem_adapter.pt
  (torch.save of a dict of bf16 tensors) or .safetensors.
- `tiny_backbone(name)`: a tiny float32 HF model (from tests/tiny_models.py's specs).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dmem_reference import OFFICIAL_CONFIG

HEADS = ("q", "k", "v", "o")

QO = {"delta_heads": ["q", "o"]}   # the released adapter's heads
SCALE_LAYER = {"trainable_delta_scale": True}
SCALE_HEAD = {"trainable_delta_scale": True, "delta_scale_granularity": "head", "delta_scale_max": 1.5,
              "delta_scale_init": 0.5}
O_NORM = {"delta_o_rmsnorm": True, "delta_o_rmsnorm_eps": 1e-5}
VARIANTS: dict[str, dict] = {
    "released": QO,
    "defaults": {},
    "lambda_outside": {"state_update_mode": "lambda_outside"},
    "no_lambda": {"state_update_mode": "no_lambda"},
    "no_lambda_uncoupled": {"state_update_mode": "no_lambda", "couple_lambda": False},   # λ stored, unused
    "uncoupled_lambda": {"couple_lambda": False},
    "uncoupled_lambda_outside": {**QO, "couple_lambda": False, "state_update_mode": "lambda_outside"},
    "scalar_gates": {**QO, "rankwise_gates": False},
    "scalar_gates_uncoupled": {**QO, "rankwise_gates": False, "couple_lambda": False, "num_state_heads": 2},
    "state_heads_4": {"num_state_heads": 4},
    "no_qk_norm": {**QO, "normalize_qk": False},
    "message_mean": {**QO, "memory_write_granularity": "message_mean"},
    "sentence_mean": {"memory_write_granularity": "sentence_mean"},
    "target_subset": {**QO, "target_layers": [1]},
    "rank_4": {**QO, "rank": 4, "alpha": 8.0},
    "rank_16": {**QO, "rank": 16, "alpha": 16.0},
    "head_k": {"delta_heads": ["k"]},
    "head_v": {"delta_heads": ["v"]},
    "head_o": {"delta_heads": ["o"]},
    "o_rmsnorm": O_NORM,
    "learned_scale_layer": SCALE_LAYER,
    "learned_scale_head": SCALE_HEAD,
    "learned_scale_layer_rmsnorm": {**SCALE_LAYER, **O_NORM},
    "learned_scale_head_rmsnorm": {**SCALE_HEAD, **O_NORM},
    "learned_scale_head_rmsnorm_qo": {**QO, **SCALE_HEAD, "delta_o_rmsnorm": True},
}
NO_HEADS = {"delta_heads": []}   # a no-op adapter: valid in the official code, tested on its own


def adapter_config(overrides: dict | None = None) -> dict:
    return {**OFFICIAL_CONFIG, **(overrides or {})}


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
    layers = config["target_layers"] or range(hf_config.num_hidden_layers)

    def normal(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    def away_from_zero(*shape, std):
        # |N(0,std)| + std/4 with random sign: no element rounds to zero in bf16
        x = normal(*shape, std=std)
        return torch.sign(x + (x == 0)) * (x.abs() + std / 4)

    tensors = {}
    for layer in layers:
        p = f"model.layers.{layer}.self_attn."
        if config["trainable_delta_scale"]:
            n = 4 if config["delta_scale_granularity"] == "head" else 1
            tensors[p + "delta_scale_raw"] = away_from_zero(n, std=1.0)
        # RMSNormed x has entries ~1: std 1/sqrt(d) gives memory q/k/v entries ~1. Unnormalised keys
        # must stay short (‖k‖ < 1), or the delta rule's erase term makes the state grow without bound.
        qk_std = 1.0 if config["normalize_qk"] else 0.5 / math.sqrt(rank)
        for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
            std = qk_std if name != "memory_v_proj" else 1.0
            tensors[p + name] = away_from_zero(D, d_model, std=std / math.sqrt(d_model))
        for head in HEADS:
            std = 0.0 if zero_corrections else 0.3 / math.sqrt(D)
            tensors[p + f"delta_{head}_proj"] = away_from_zero(widths[head], D, std=std) if std else torch.zeros(widths[head], D)
        if config["delta_o_rmsnorm"]:
            tensors[p + "delta_o_rmsnorm_weight"] = 0.3 * (1.0 + 0.3 * normal(d_model, std=1.0))
        tensors[p + "beta_proj"] = away_from_zero(gate_width, d_model, std=0.5 / math.sqrt(d_model))
        tensors[p + "beta_bias"] = away_from_zero(gate_width, std=0.5)
        if not config["couple_lambda"]:
            tensors[p + "lambda_proj"] = away_from_zero(gate_width, d_model, std=0.5 / math.sqrt(d_model))
            tensors[p + "lambda_bias"] = away_from_zero(gate_width, std=0.5) + 1.0
    return config, {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}


def write_adapter(folder: Path, config: dict, tensors: dict, fmt: str = "pt", weight_suffix: bool = False) -> Path:
    """The official release layout: delta_mem_config.json (json.dumps(asdict(config), indent=2),
    as the official save_pretrained writes it) + delta_mem_adapter.{pt,safetensors}.

    weight_suffix=True appends `.weight` to every key (some exports do)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "delta_mem_config.json").write_text(json.dumps(config, indent=2))
    keyed = {(k + ".weight" if weight_suffix else k): v for k, v in tensors.items()}
    if fmt == "pt":
        torch.save(keyed, folder / "delta_mem_adapter.pt")
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(keyed, str(folder / "delta_mem_adapter.safetensors"))
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
    """A multi-call session: a prefill, single-token decodes with and without writes, another
    prefill, then the calls a mean granularity falls back to token writes for (official rule):
    ids all −1 (a generation prompt), no ids, sentence ids without message ids, and message
    ids whose sentence ids are all −1.

    Each call: tokens, message_ids (−1 = system/template glue, then increasing message ids;
    a decoded token carries the assistant message's id), sentence_ids (−1 on glue, several
    sentences per message), write flag."""
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
        {"tokens": tokens(3), "message_ids": [-1, -1, -1], "sentence_ids": [-1, -1, -1], "write": True},
        {"tokens": tokens(2), "message_ids": None, "sentence_ids": None, "write": True},
        {"tokens": tokens(2), "message_ids": None, "sentence_ids": [7, 7], "write": True},
        {"tokens": tokens(2), "message_ids": [4, 4], "sentence_ids": [-1, -1], "write": True},
    ]


def run_session(ref, calls: list[dict]) -> torch.Tensor:
    """Logits of every position of every call, concatenated ([sum T, vocab])."""
    return torch.cat([
        ref.decode(c["tokens"], message_ids=c.get("message_ids"), sentence_ids=c.get("sentence_ids"),
                   write=c.get("write", True))
        for c in calls
    ])
