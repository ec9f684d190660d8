"""Independent float64 reference of δ-mem (DESIGN.md §3), the oracle for the engine.

Written from the spec only — it shares no code with the converter or the runtime. It wraps
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


def ref_config(config: dict, n_layers: int) -> RefConfig:
    """DESIGN §3/§4 defaults: normalize_qk, coupled λ, standard update, token writes, H = 1."""
    def get(key, default):
        value = config.get(key)
        return default if value is None else value

    targets = config.get("target_layers")
    return RefConfig(
        rank=int(config["rank"]),
        alpha=float(get("alpha", config["rank"])),
        heads=int(get("num_state_heads", 1)),
        normalize_qk=bool(get("normalize_qk", True)),
        couple_lambda=bool(get("couple_lambda", True)),
        update_mode=get("state_update_mode", "standard"),
        rankwise_gates=bool(get("rankwise_gates", True)),
        granularity=get("memory_write_granularity", "token"),
        delta_heads=tuple(h for h in HEADS if h in config["delta_heads"]),
        target_layers=tuple(range(n_layers)) if targets is None else tuple(sorted(targets)),
        o_rmsnorm=bool(get("delta_o_rmsnorm", False)),
        o_rmsnorm_eps=float(get("delta_o_rmsnorm_eps", 1e-6)),
        learned_scale=bool(get("trainable_delta_scale", False)),
        scale_max=float(get("delta_scale_max", 1.0)),
        scale_granularity=get("delta_scale_granularity", "scalar"),
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


def sigmoid_scale(raw: torch.Tensor, cfg: RefConfig, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """Learned multiplier per head kind: sigmoid(raw)·max, as a scalar or per output channel.
    Layouts: scalar (1 value), head (4 values, q,k,v,o), channel (q,k,v,o widths concatenated)."""
    g = torch.sigmoid(raw.reshape(-1)) * cfg.scale_max
    if cfg.scale_granularity == "scalar":
        return {h: g[0] for h in HEADS}
    if cfg.scale_granularity == "head":
        return {h: g[i] for i, h in enumerate(HEADS)}
    assert cfg.scale_granularity == "channel"
    out, start = {}, 0
    for h in HEADS:
        out[h] = g[start : start + widths[h]]
        start += widths[h]
    return out


def corrections(w: dict, cfg: RefConfig, o: torch.Tensor) -> dict[str, torch.Tensor]:
    """o: [T, D] → {head: Δ [T, out]} for the active heads (DESIGN §3 'Corrections')."""
    s = cfg.alpha / cfg.rank
    widths = {h: w[f"delta_{h}_proj"].shape[0] for h in HEADS}
    learned = sigmoid_scale(w["delta_scale_raw"], cfg, widths) if cfg.learned_scale else {}
    out = {}
    for h in cfg.delta_heads:
        delta = s * (o @ w[f"delta_{h}_proj"].T)
        if h == "o" and cfg.o_rmsnorm:
            rms = torch.sqrt(delta.pow(2).mean(dim=-1, keepdim=True) + cfg.o_rmsnorm_eps)
            delta = delta / rms * w["delta_o_rmsnorm_weight"]
        if h in learned:
            delta = delta * learned[h]
        out[h] = delta
    return out


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
        if call["ids"] is None:  # token granularity, or a mean granularity without ids
            o, S_new = scan_tokens(S, memory_features(w, self.cfg, x), do_write=call["write"])
        else:
            o, S_new = scan_mean_writes(S, w, self.cfg, x, call["ids"], do_write=call["write"])
        self.state[layer] = S_new
        return o

    # decoding -----------------------------------------------------------------------------
    def decode(self, tokens, message_ids=None, sentence_ids=None, write: bool = True) -> torch.Tensor:
        """Run one call (tokens continue the KV cache and the memory); float64 logits [T, vocab]."""
        ids = {"message_mean": message_ids, "sentence_mean": sentence_ids}.get(self.cfg.granularity)
        if ids is not None:
            ids = [int(i) for i in ids]
            assert len(ids) == len(tokens)
        self._call = {"ids": ids, "write": write}
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
