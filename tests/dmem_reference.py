"""Independent float64 reference of δ-mem, the oracle for the engine.

Written from the specification only — the official δ-mem code's semantics (declare-lab/delta-Mem,
deltamem/core/delta_impl.py: defaults, correction order, write fallbacks) as DESIGN.md §3 restates
them — and sharing no code with the converter or the runtime. It wraps
a Hugging Face causal LM (Qwen3 / Llama / SmolLM3) converted to float64:

- a forward pre-hook on each targeted layer's `self_attn` sees x (the attention input,
  after the block's input RMSNorm), computes the memory readout o for every token of the
  call with the read-before-write scan, and updates that layer's state;
- forward hooks on q_proj / k_proj / v_proj add Δq/Δk/Δv to their outputs, i.e. to the raw
  projections, before q_norm/k_norm and RoPE; a forward hook on o_proj adds Δo after it.

The adapter is taken in its *source* form (the release tensors and config, unscaled, HF
row order), so the converter's folding and permutation are checked, not assumed.

    ref = DeltaMemReference(model, config_dict, {source key: tensor})
    logits = ref.decode(tokens, message_ids=None, sentence_ids=None, write=True)  # [T, vocab]
    ref.memory  # float64 [n_target_layers, H, r, r]
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch

HEADS = ("q", "k", "v", "o")
L2_EPS = 1e-6


# ----------------------------------------------------------------------------- configuration

@dataclass
class RefConfig:
    rank: int
    alpha: float
    heads: int  # H, number of state heads
    normalize_qk: bool
    couple_lambda: bool
    update_mode: str
    rankwise_gates: bool
    granularity: str
    delta_heads: tuple[str, ...]
    target_layers: tuple[int, ...]
    o_rmsnorm: bool
    o_rmsnorm_eps: float
    learned_scale: bool
    scale_max: float
    scale_granularity: str

    @property
    def width(self) -> int:  # D = r·H
        return self.rank * self.heads


# `delta_mem_config.json` exactly as the official trainer writes it for an adapter with every default:
# `asdict` of the official HFDeltaMemConfig (deltamem/core/delta_impl.py), tuples as JSON lists.
# Written down here from reading that dataclass, independently of the converter.
OFFICIAL_CONFIG = {
    "rank": 8, "alpha": 16.0, "beta_bias_init": -1.5, "normalize_qk": True, "couple_lambda": True,
    "state_update_mode": "standard", "rankwise_gates": True, "output_init": "zero", "base_slice_ref_width": 8,
    "online_gain": 0.05, "num_state_heads": 1, "num_memory_partitions": 1, "num_global_memory_partitions": 0,
    "memory_partition_routing": "soft", "memory_partition_basis": "shared", "tie_memory_partition_read_write": False,
    "memory_partition_read_mode": "softmax", "memory_partition_sigmoid_gate_bias_init": -2.0, "slot_read_top_k": 0,
    "global_memory_mode": "shared_rw", "global_memory_read_top_k": 0, "global_memory_merge_mode": "gated_residual",
    "global_memory_gate_bias_init": -2.0, "global_memory_read_logit_bias": 0.0, "memory_reader_layers": [],
    "memory_reader_hidden_size": 1024, "memory_reader_residual_scale": 0.1, "memory_reader_read_only": True,
    "memory_readout_mode": "delta", "memory_write_source": "learned_hidden", "memory_write_granularity": "token",
    "memory_write_proposals_per_message": 2, "synthetic_memory_slots": 1, "latent_memory_layers": [],
    "latent_memory_hidden_size": 1024, "latent_memory_residual_scale": 0.1, "latent_memory_slots": 4,
    "latent_memory_init_std": 0.002, "latent_gate_init": 0.01, "target_modules": ["self_attn"], "target_layers": [],
    "delta_heads": ["q", "k", "v", "o"], "delta_o_rmsnorm": False, "delta_o_rmsnorm_eps": 1e-6,
    "trainable_delta_scale": False, "delta_scale_init": 1.0, "delta_scale_max": 2.0, "delta_scale_granularity": "layer",
    "delta_scale_parameterization": "alpha_over_rank",
}


def _heads(value) -> tuple[str, ...]:
    """Official rule: a list or comma string; empty or "none" = no correction."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip().lower() for i in items if str(i).strip()]
    return () if items in ([], ["none"]) else tuple(h for h in HEADS if h in items)


def ref_config(config: dict, n_layers: int) -> RefConfig:
    """The official defaults fill missing (or null) keys; target_layers empty = every layer."""
    def get(key):
        value = config.get(key)
        return OFFICIAL_CONFIG[key] if value is None else value

    targets = get("target_layers")
    return RefConfig(
        rank=int(get("rank")),
        alpha=float(get("alpha")),
        heads=int(get("num_state_heads")),
        normalize_qk=bool(get("normalize_qk")),
        couple_lambda=bool(get("couple_lambda")),
        update_mode=get("state_update_mode"),
        rankwise_gates=bool(get("rankwise_gates")),
        granularity=get("memory_write_granularity"),
        delta_heads=_heads(get("delta_heads")),
        target_layers=tuple(sorted(targets)) if targets else tuple(range(n_layers)),
        o_rmsnorm=bool(get("delta_o_rmsnorm")),
        o_rmsnorm_eps=float(get("delta_o_rmsnorm_eps")),
        learned_scale=bool(get("trainable_delta_scale")),
        scale_max=float(get("delta_scale_max")),
        scale_granularity=get("delta_scale_granularity"),
    )


def layer_weights(tensors: dict, layer: int) -> dict[str, torch.Tensor]:
    """The source tensors of one layer as float64, keyed by bare name (no `.weight`)."""
    pattern = re.compile(rf"^model\.layers\.{layer}\.self_attn\.(.+?)(?:\.weight)?$")
    out = {}
    for key, value in tensors.items():
        match = pattern.match(key)
        if match:
            out[match.group(1)] = torch.as_tensor(value).to(torch.float64)
    return out


# ----------------------------------------------------------------------------- §3 arithmetic

@dataclass
class Features:
    """Per-token memory inputs: q, k, v as [T, H, r]; keep/erase/write coefficients [T, H, r]."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor
    erase: torch.Tensor
    write: torch.Tensor


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.clamp(torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=L2_EPS)


def gate_per_row(g: torch.Tensor, cfg: RefConfig) -> torch.Tensor:
    """[T, D] (rankwise) or [T, H] (one per head, broadcast over its r rows) → [T, H, r]."""
    T = g.shape[0]
    if cfg.rankwise_gates:
        return g.reshape(T, cfg.heads, cfg.rank)
    return g.reshape(T, cfg.heads, 1).expand(T, cfg.heads, cfg.rank)


def memory_features(w: dict, cfg: RefConfig, x: torch.Tensor) -> Features:
    """x: [T, d_model] float64 → the §3 projections, normalisation and gates."""
    T, H, r = x.shape[0], cfg.heads, cfg.rank
    q = (x @ w["memory_q_proj"].T).reshape(T, H, r)
    k = (x @ w["memory_k_proj"].T).reshape(T, H, r)
    v = (x @ w["memory_v_proj"].T).reshape(T, H, r)
    if cfg.normalize_qk:
        q = l2_normalize(torch.tanh(q))
        k = l2_normalize(torch.tanh(k))
    beta = gate_per_row(torch.sigmoid(x @ w["beta_proj"].T + w["beta_bias"].reshape(-1)), cfg)
    if cfg.update_mode == "no_lambda":
        lam = torch.ones_like(beta)
    elif cfg.couple_lambda:
        lam = 1.0 - beta
    else:
        lam = gate_per_row(torch.sigmoid(x @ w["lambda_proj"].T + w["lambda_bias"].reshape(-1)), cfg)
    keep, erase, write = {
        "standard": (lam, beta, beta),
        "lambda_outside": (lam, lam * beta, beta),
        "no_lambda": (torch.ones_like(beta), beta, beta),
    }[cfg.update_mode]
    return Features(q, k, v, keep, erase, write)


def read(S: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """o = S m_q per head. S: [H, r, r], q: [H, r] → [H, r]."""
    return torch.einsum("hij,hj->hi", S, q)


def write(S: torch.Tensor, k, v, keep, erase, write_c) -> torch.Tensor:
    """One delta-rule write, row i of each head:
    S[i,:] = keep_i S[i,:] − erase_i (S[i,:]·k) kᵀ + write_i v_i kᵀ.  All args per head [H, r]."""
    recalled = torch.einsum("hij,hj->hi", S, k)  # S[i,:]·k
    return (
        keep[:, :, None] * S
        - (erase * recalled)[:, :, None] * k[:, None, :]
        + (write_c * v)[:, :, None] * k[:, None, :]
    )


def scan_tokens(S: torch.Tensor, f: Features, valid: torch.Tensor | None = None, do_write: bool = True):
    """Token writes, read before write. Invalid (masked) tokens read 0 and leave S alone.
    Returns (o [T, H, r], final S)."""
    T = f.q.shape[0]
    outs = []
    for t in range(T):
        if valid is not None and not bool(valid[t]):
            outs.append(torch.zeros_like(f.q[t]))
            continue
        outs.append(read(S, f.q[t]))
        if do_write:
            S = write(S, f.k[t], f.v[t], f.keep[t], f.erase[t], f.write[t])
    return torch.stack(outs), S


def scan_mean_writes(S: torch.Tensor, w: dict, cfg: RefConfig, x: torch.Tensor, ids: list[int], do_write: bool = True):
    """message_mean / sentence_mean: every token reads the state at call start; then one write
    per id ≥ 0 present in the call, in increasing id order, from the mean x of its tokens."""
    f = memory_features(w, cfg, x)
    o = torch.stack([read(S, f.q[t]) for t in range(x.shape[0])])
    if do_write:
        ids_t = torch.as_tensor(ids)
        for group in sorted({i for i in ids if i >= 0}):
            x_mean = x[ids_t == group].mean(dim=0, keepdim=True)
            g = memory_features(w, cfg, x_mean)
            S = write(S, g.k[0], g.v[0], g.keep[0], g.erase[0], g.write[0])
    return o, S


def learned_scale(raw: torch.Tensor, cfg: RefConfig) -> dict[str, torch.Tensor]:
    """The official learned multiplier per head kind: sigmoid(raw)·max, raw holding one value
    (granularity "layer", shared) or four (granularity "head", in q, k, v, o order)."""
    g = torch.sigmoid(raw.reshape(-1)) * cfg.scale_max
    if cfg.scale_granularity == "head":
        assert g.numel() == 4
        return {h: g[i] for i, h in enumerate(HEADS)}
    assert cfg.scale_granularity == "layer" and g.numel() == 1
    return {h: g[0] for h in HEADS}


def corrections(w: dict, cfg: RefConfig, o: torch.Tensor) -> dict[str, torch.Tensor]:
    """o: [T, D] → {head: Δ [T, out]} for the active heads, in the official order: each head's
    projection times alpha/rank times its learned scale; then, for Δo, the optional RMSNorm
    (with its weight) of that product."""
    s = cfg.alpha / cfg.rank
    g = learned_scale(w["delta_scale_raw"], cfg) if cfg.learned_scale else {}
    out = {}
    for h in cfg.delta_heads:
        delta = (o @ w[f"delta_{h}_proj"].T) * s * g.get(h, 1.0)
        if h == "o" and cfg.o_rmsnorm:
            rms = torch.sqrt(delta.pow(2).mean(dim=-1, keepdim=True) + cfg.o_rmsnorm_eps)
            delta = delta / rms * w["delta_o_rmsnorm_weight"]
        out[h] = delta
    return out


def mean_write_ids(granularity: str, n: int, message_ids, sentence_ids) -> list[int] | None:
    """The ids a mean write groups by, or None for per-token writes (official `_message_write_inputs`,
    `_sentence_write_inputs`): message_mean needs message ids, sentence_mean both message and sentence
    ids (a token takes part when both are >= 0); ids missing, mis-sized or with no token taking part
    fall back to token writes."""
    if granularity == "token" or message_ids is None or len(message_ids) != n:
        return None
    if granularity == "sentence_mean":
        if sentence_ids is None or len(sentence_ids) != n:
            return None
        ids = [int(s) if int(m) >= 0 and int(s) >= 0 else -1 for m, s in zip(message_ids, sentence_ids)]
    else:
        ids = [int(m) for m in message_ids]
    return ids if any(i >= 0 for i in ids) else None


# ----------------------------------------------------------------------------- the wrapped model

def _attention_modules(model):
    layers = model.model.layers
    return [layer.self_attn for layer in layers]


class DeltaMemReference:
    """A float64 HF model with δ-mem hooked into its attention layers, state carried across calls."""

    def __init__(self, model, config: dict, tensors: dict):
        self.model = model.to(torch.float64).eval()
        attns = _attention_modules(self.model)
        self.cfg = ref_config(config, len(attns))
        self.weights = {i: layer_weights(tensors, i) for i in self.cfg.target_layers}
        self.reset()
        self._call = None
        self._pending: dict[int, tuple[torch.Tensor, dict]] = {}
        self._handles = []
        for i in self.cfg.target_layers:
            attn = attns[i]
            self._handles.append(attn.register_forward_pre_hook(self._memory_hook(i), with_kwargs=True))
            for h, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj)):
                self._handles.append(proj.register_forward_hook(self._correction_hook(i, h)))

    # state --------------------------------------------------------------------------------
    def reset(self) -> None:
        H, r = self.cfg.heads, self.cfg.rank
        self.state = {i: torch.zeros(H, r, r, dtype=torch.float64) for i in self.cfg.target_layers}
        self.cache = None

    @property
    def memory(self) -> torch.Tensor:
        return torch.stack([self.state[i] for i in self.cfg.target_layers])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    # hooks --------------------------------------------------------------------------------
    def _memory_hook(self, layer: int):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            assert x.shape[0] == 1, "the reference runs one sequence"
            o = self._scan(layer, x[0])
            self._pending[layer] = (x, corrections(self.weights[layer], self.cfg, o.reshape(o.shape[0], -1)))
        return hook

    def _correction_hook(self, layer: int, head: str):
        def hook(module, inputs, output):
            x, deltas = self._pending[layer]
            if head != "o":
                # The memory must see exactly what q/k/v projections see (the normed input).
                assert torch.equal(inputs[0], x), "q/k/v projection input differs from the attention input"
            if head not in deltas:
                return output
            return output + deltas[head].unsqueeze(0)
        return hook

    def _scan(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        call = self._call
        w, S = self.weights[layer], self.state[layer]
        if call["ids"] is None:  # token granularity, or a mean granularity without usable ids
            o, S_new = scan_tokens(S, memory_features(w, self.cfg, x), do_write=call["write"])
        else:
            o, S_new = scan_mean_writes(S, w, self.cfg, x, call["ids"], do_write=call["write"])
        self.state[layer] = S_new
        return o

    # decoding -----------------------------------------------------------------------------
    def decode(self, tokens, message_ids=None, sentence_ids=None, write: bool = True) -> torch.Tensor:
        """Run one call (tokens continue the KV cache and the memory); float64 logits [T, vocab]."""
        self._call = {"ids": mean_write_ids(self.cfg.granularity, len(tokens), message_ids, sentence_ids),
                      "write": write}
        if self.cache is None:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
        cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(tokens)]), use_cache=True, **{cache_kw: self.cache})
        self._pending.clear()
        return out.logits[0]


def bare_logits_session(model, calls: list[list[int]]) -> torch.Tensor:
    """The backbone alone (no hooks) over the same calls, KV cache carried: [sum T, vocab]."""
    from transformers import DynamicCache

    model = model.to(torch.float64).eval()
    cache = DynamicCache(config=model.config)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    outs = []
    with torch.no_grad():
        for tokens in calls:
            outs.append(model(input_ids=torch.tensor([list(tokens)]), use_cache=True, **{cache_kw: cache}).logits[0])
    return torch.cat(outs)
