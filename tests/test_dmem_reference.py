"""Sanity checks of the float64 δ-mem reference itself (tests/dmem_reference.py).

The engine is tested against this reference, so the reference must be right on its own:
hand-computed §3 arithmetic, read-before-write, masking, granularities, and the hooks
into the Hugging Face model (zero corrections change nothing; splitting calls is exact).
"""
from __future__ import annotations

import math

import pytest
import torch


from dmem_fixtures import VARIANTS, make_adapter, tiny_backbone  # noqa: E402
from dmem_reference import (  # noqa: E402
    DeltaMemReference, bare_logits_session, corrections, mean_write_ids, memory_features, ref_config,
    scan_mean_writes, scan_tokens, write,
)

ARCHS = ("qwen3", "llama", "smollm3")
PROMPT = [5, 17, 3, 42, 8, 23, 11, 60, 2, 31]


def session(arch: str, variant: str, seed: int = 0, **adapter_kw):
    model = tiny_backbone(arch)
    config, tensors = make_adapter(model.config, VARIANTS[variant], seed=seed, **adapter_kw)
    return model, DeltaMemReference(model, config, tensors)


# ----------------------------------------------------------------------------- hand-computed §3

def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def _matvec(W, x):
    return [sum(w * xi for w, xi in zip(row, x)) for row in W]


def _tanh_l2(v):
    t = [math.tanh(a) for a in v]
    n = max(math.sqrt(sum(a * a for a in t)), 1e-6)
    return [a / n for a in t]


HAND = {
    "memory_q_proj": [[1.0, 0.5], [-0.3, 0.8]],
    "memory_k_proj": [[0.2, -1.0], [0.7, 0.4]],
    "memory_v_proj": [[1.5, -0.5], [0.3, 0.9]],
    "beta_proj": [[0.4, -0.2], [0.1, 0.3]],
    "beta_bias": [0.1, -0.3],
    "lambda_proj": [[-0.6, 0.2], [0.5, 0.5]],
    "lambda_bias": [0.7, 0.2],
}
X = [[1.0, -0.5], [0.3, 0.8]]


@pytest.mark.parametrize("mode,coupled", [("standard", True), ("standard", False), ("lambda_outside", True),
                                          ("lambda_outside", False), ("no_lambda", True)])
def test_two_token_state_matches_hand_computation(mode, coupled):
    """rank 2, one head, d_model 2: every §3 step written out with scalars."""
    S = [[0.0, 0.0], [0.0, 0.0]]
    reads = []
    for x in X:
        q = _tanh_l2(_matvec(HAND["memory_q_proj"], x))
        k = _tanh_l2(_matvec(HAND["memory_k_proj"], x))
        v = _matvec(HAND["memory_v_proj"], x)
        beta = [_sig(z + b) for z, b in zip(_matvec(HAND["beta_proj"], x), HAND["beta_bias"])]
        if mode == "no_lambda":
            lam = [1.0, 1.0]
        elif coupled:
            lam = [1.0 - b for b in beta]
        else:
            lam = [_sig(z + b) for z, b in zip(_matvec(HAND["lambda_proj"], x), HAND["lambda_bias"])]
        reads.append([S[i][0] * q[0] + S[i][1] * q[1] for i in range(2)])  # read before write
        new = []
        for i in range(2):
            keep, erase, wr = {"standard": (lam[i], beta[i], beta[i]),
                               "lambda_outside": (lam[i], lam[i] * beta[i], beta[i]),
                               "no_lambda": (1.0, beta[i], beta[i])}[mode]
            recalled = S[i][0] * k[0] + S[i][1] * k[1]
            new.append([keep * S[i][j] - erase * recalled * k[j] + wr * v[i] * k[j] for j in range(2)])
        S = new

    cfg = ref_config({"rank": 2, "alpha": 2, "delta_heads": ["q"], "state_update_mode": mode,
                      "couple_lambda": coupled}, n_layers=1)
    w = {k: torch.tensor(v, dtype=torch.float64) for k, v in HAND.items()}
    o, S_ref = scan_tokens(torch.zeros(1, 2, 2, dtype=torch.float64),
                           memory_features(w, cfg, torch.tensor(X, dtype=torch.float64)))
    assert torch.allclose(S_ref[0], torch.tensor(S, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert torch.allclose(o[:, 0], torch.tensor(reads, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert torch.all(o[0] == 0) and torch.any(o[1] != 0), "first read sees the empty state"


def _features(seed=0, T=4, H=2, r=3, d=5, **cfg_kw):
    cfg = ref_config({"rank": r, "alpha": r, "num_state_heads": H, "delta_heads": ["q"], **cfg_kw}, n_layers=1)
    g = torch.Generator().manual_seed(seed)
    D = r * H
    w = {n: torch.randn(D, d, generator=g, dtype=torch.float64) for n in ("memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj")}
    w["beta_bias"] = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    return cfg, w, x


def test_masked_tokens_read_zero_and_never_write():
    cfg, w, x = _features()
    f = memory_features(w, cfg, x)
    S0 = torch.zeros(cfg.heads, cfg.rank, cfg.rank, dtype=torch.float64)
    valid = torch.tensor([True, False, True, False])
    o, S = scan_tokens(S0, f, valid=valid)
    assert torch.all(o[1] == 0) and torch.all(o[3] == 0)
    keep = [0, 2]
    f_valid = memory_features(w, cfg, x[keep])
    o_valid, S_valid = scan_tokens(S0, f_valid)
    assert torch.allclose(S, S_valid, rtol=1e-13, atol=1e-15)  # same math, batch-size rounding aside
    assert torch.allclose(o[keep], o_valid, rtol=1e-13, atol=1e-15)


def test_mean_writes_skip_minus_one_and_go_in_id_order():
    cfg, w, x = _features(T=5)
    S0 = torch.zeros(cfg.heads, cfg.rank, cfg.rank, dtype=torch.float64)
    ids = [-1, 1, 0, 1, -1]
    o, S = scan_mean_writes(S0, w, cfg, x, ids)
    # every token read the call-start state (zero)
    assert torch.all(o == 0)
    expected = S0
    for rows in ([2], [1, 3]):  # id 0 first, then id 1; the −1 tokens never write
        g = memory_features(w, cfg, x[rows].mean(0, keepdim=True))
        expected = write(expected, g.k[0], g.v[0], g.keep[0], g.erase[0], g.write[0])
    assert torch.allclose(S, expected, rtol=1e-13, atol=1e-15)


def test_mean_write_ids_follow_the_official_fallbacks():
    """message_mean groups by message ids, sentence_mean by sentence ids where both ids are >= 0;
    missing, mis-sized or all −1 ids: per-token writes (None)."""
    assert mean_write_ids("message_mean", 3, [-1, 0, 0], None) == [-1, 0, 0]
    assert mean_write_ids("message_mean", 3, [-1, -1, -1], [0, 0, 0]) is None
    assert mean_write_ids("message_mean", 3, None, [0, 0, 0]) is None
    assert mean_write_ids("message_mean", 3, [0, 0], None) is None
    assert mean_write_ids("sentence_mean", 3, [-1, 2, 2], [5, 5, 6]) == [-1, 5, 6]
    assert mean_write_ids("sentence_mean", 3, None, [5, 5, 6]) is None
    assert mean_write_ids("sentence_mean", 3, [2, 2, 2], [-1, -1, -1]) is None
    assert mean_write_ids("token", 3, [0, 0, 0], [0, 0, 0]) is None


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_corrections_scale_before_the_delta_o_rmsnorm(granularity):
    """The official order, written out: Δ_h = (alpha/rank)·g_h·W_h o for every head; Δo then goes
    through the RMSNorm with its weight, so the learned g_o only acts through eps there."""
    r, d, eps = 2, 3, 0.5   # a large eps, so that g_o visibly matters under the norm
    g = torch.Generator().manual_seed(3)
    w = {f"delta_{h}_proj": torch.randn(d, r, generator=g, dtype=torch.float64) for h in "qkvo"}
    w["delta_o_rmsnorm_weight"] = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    raw = [0.3, -1.2, 0.7, 2.0] if granularity == "head" else [1.5]
    w["delta_scale_raw"] = torch.tensor(raw, dtype=torch.float64)
    cfg = ref_config({"rank": r, "alpha": 3.0, "delta_heads": ["q", "v", "o"], "delta_o_rmsnorm": True,
                      "delta_o_rmsnorm_eps": eps, "trainable_delta_scale": True, "delta_scale_max": 1.5,
                      "delta_scale_granularity": granularity}, n_layers=1)
    o = [0.8, -0.6]
    got = corrections(w, cfg, torch.tensor([o], dtype=torch.float64))
    assert set(got) == {"q", "v", "o"}
    for i, h in enumerate("qkvo"):
        if h == "k":
            continue
        gh = _sig(raw[i] if granularity == "head" else raw[0]) * 1.5
        delta = [1.5 * gh * v for v in _matvec(w[f"delta_{h}_proj"].tolist(), o)]
        if h == "o":
            rms = math.sqrt(sum(v * v for v in delta) / d + eps)
            delta = [v / rms * n for v, n in zip(delta, w["delta_o_rmsnorm_weight"].tolist())]
            # scaling after the norm instead would be off by the factor g_o
            assert abs(gh - 1.0) > 0.1
        assert torch.allclose(got[h][0], torch.tensor(delta, dtype=torch.float64), rtol=1e-12, atol=0), h


def test_writes_disabled_leave_state_untouched():
    cfg, w, x = _features()
    S0 = torch.randn(cfg.heads, cfg.rank, cfg.rank, dtype=torch.float64)
    f = memory_features(w, cfg, x)
    o, S = scan_tokens(S0, f, do_write=False)
    assert torch.equal(S, S0)
    assert torch.allclose(o, torch.einsum("hij,thj->thi", S0, f.q))


# ----------------------------------------------------------------------------- the hooked model

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["released", "defaults", "o_rmsnorm", "learned_scale_head_rmsnorm"])
def test_zero_corrections_reproduce_bare_model(arch, variant):
    model, ref = session(arch, variant, zero_corrections=True)
    calls = [PROMPT[:6], PROMPT[6:7], PROMPT[7:]]
    got = torch.cat([ref.decode(c) for c in calls])
    ref.remove()
    bare = bare_logits_session(model, calls)
    assert torch.equal(got, bare)
    assert torch.any(ref.memory != 0), "the memory itself was still written"


@pytest.mark.parametrize("arch", ARCHS)
def test_first_token_reads_empty_memory(arch):
    model, ref = session(arch, "defaults")
    got = ref.decode(PROMPT)
    ref.remove()
    bare = bare_logits_session(model, [PROMPT])
    assert torch.equal(got[0], bare[0]), "position 0 reads S = 0, so no correction"
    assert (got[1:] - bare[1:]).abs().max() > 1e-2 * bare.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["released", "state_heads_4", "uncoupled_lambda"])
def test_split_prefill_equals_single_call_with_token_writes(arch, variant):
    _, one = session(arch, variant)
    whole = one.decode(PROMPT)
    _, two = session(arch, variant)
    parts = torch.cat([two.decode(PROMPT[:6]), two.decode(PROMPT[6:])])
    assert torch.allclose(whole, parts, rtol=1e-10, atol=1e-10)
    assert torch.allclose(one.memory, two.memory, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["message_mean", "sentence_mean"])
def test_mean_granularity_call_logits_do_not_depend_on_its_own_writes(variant):
    """In a mean-granularity call every token reads the call-start state, so the call's
    logits are the same whether or not it writes."""
    ids = {"message_ids": [-1, 0, 0, 0, 0, 0, -1, 1, 1, 1], "sentence_ids": [-1, 0, 0, 1, 1, 1, -1, 2, 2, 2]}
    _, a = session("llama", variant)
    _, b = session("llama", variant)
    for ref in (a, b):
        ref.decode(PROMPT[:5], message_ids=[0] * 5, sentence_ids=[0] * 5)
    la = a.decode(PROMPT, write=True, **ids)
    lb = b.decode(PROMPT, write=False, **ids)
    assert torch.equal(la, lb)
    assert not torch.equal(a.memory, b.memory)


@pytest.mark.parametrize("ids", [None, [-1] * len(PROMPT)])
def test_mean_granularity_without_usable_ids_writes_per_token(ids):
    _, mean = session("qwen3", "message_mean")
    _, token = session("qwen3", "released")  # same seed → same weights; only the granularity differs
    assert torch.allclose(mean.decode(PROMPT, message_ids=ids), token.decode(PROMPT), rtol=1e-12, atol=1e-12)
    assert torch.allclose(mean.memory, token.memory, rtol=1e-12, atol=1e-14)
