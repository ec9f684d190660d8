"""Sampler chain (native/src/sampling): each stage against a NumPy reference on hand-made logits."""
import math

import numpy as np
import pytest

from pydeltamem import _core

# Every filter off at temperature 1: probs() is then the plain softmax of the adjusted logits.
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0)


def sampler(**kwargs):
    params = dict(PLAIN, seed=1234)
    params.update(kwargs)
    return _core.Sampler(**params)


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def renormalised(logits, keep):
    """Softmax over the kept tokens, 0 elsewhere."""
    out = np.zeros(len(logits))
    out[keep] = softmax(np.asarray(logits, dtype=np.float64)[keep])
    return out


def logits_seen(s, logits, ref_token):
    """Logits the draw sees, recovered from probs() up to a constant (pinned by an untouched token)."""
    p = s.probs(np.asarray(logits, dtype=np.float32)).astype(np.float64)
    return np.log(p) - math.log(p[ref_token]) + float(logits[ref_token])


def random_logits(rng, n, scale=2.0):
    return (rng.standard_normal(n) * scale).astype(np.float32)


# ---- references ----------------------------------------------------------------------------------

def ref_top_p(logits, p):
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    probs = softmax(logits)[order]
    cum = np.cumsum(probs)
    n_keep = int(np.searchsorted(cum, p, side="left")) + 1   # smallest prefix with mass >= p
    return order[:min(n_keep, len(order))], cum


def ref_min_p(logits, min_p):
    probs = softmax(logits)
    return np.nonzero(probs >= min_p * probs.max())[0], probs / probs.max()


def ref_typical(logits, p):
    probs = softmax(logits)
    entropy = -np.sum(probs * np.log(probs))
    scores = np.abs(-np.log(probs) - entropy)
    order = np.argsort(scores, kind="stable")
    cum = np.cumsum(probs[order])
    above = np.nonzero(cum > p)[0]
    n_keep = int(above[0]) + 1 if len(above) else len(order)
    return order[:n_keep], cum


def far_from(values, threshold, margin=1e-4):
    return np.min(np.abs(np.asarray(values, dtype=np.float64) - threshold)) > margin


# ---- construction and API surface -----------------------------------------------------------------

def test_defaults_and_close():
    s = _core.Sampler()
    token = s.sample(np.array([0.0, 5.0, 1.0], dtype=np.float32))
    assert 0 <= token < 3
    assert not s.closed
    s.close()
    s.close()   # closing twice is fine
    assert s.closed
    with pytest.raises(ValueError, match="the sampler is closed"):
        s.sample(np.array([0.0, 5.0, 1.0], dtype=np.float32))


def test_accepts_float64_and_strided_input():
    logits = np.array([0.0, 1.0, 9.0, 2.0, 0.5, 3.0], dtype=np.float64)
    s = sampler(temperature=0.0)
    assert s.sample(logits) == 2
    assert s.sample(logits[::2]) == 1   # non-contiguous view: tokens 0, 2, 4
    assert s.probs(logits).dtype == np.float32


# ---- filters ------------------------------------------------------------------------------------

def test_top_k_never_samples_outside_k_best():
    rng = np.random.default_rng(0)
    logits = random_logits(rng, 200, scale=1.0)
    k = 7
    best = set(np.argsort(-logits)[:k].tolist())
    s = sampler(top_k=k, temperature=1.5)   # a high temperature spreads the draws over all k
    drawn = {s.sample(logits) for _ in range(3000)}
    assert drawn <= best
    assert len(drawn) == k
    np.testing.assert_allclose(s.probs(logits), renormalised(logits / 1.5, sorted(best)), atol=1e-6)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_top_p_on_a_large_vocabulary(scale):
    # Wide nuclei (hundreds to thousands of tokens) cross the chunks that top-p sorts lazily.
    rng = np.random.default_rng(10)
    checked = 0
    for _ in range(6):
        logits = random_logits(rng, 5000, scale=scale)
        keep, cum = ref_top_p(logits, 0.9)
        if not far_from(cum, 0.9, margin=1e-5):
            continue
        checked += 1
        np.testing.assert_allclose(sampler(top_p=0.9).probs(logits), renormalised(logits, keep), atol=1e-6)
    assert checked >= 4


def test_top_k_larger_than_vocab_is_off():
    logits = np.array([0.3, -1.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(sampler(top_k=10).probs(logits), softmax(logits), atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99])
def test_top_p_keeps_smallest_prefix_reaching_p(p):
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(20):
        logits = random_logits(rng, 64)
        keep, cum = ref_top_p(logits, p)
        if not far_from(cum, p):
            continue   # a float32 rounding could flip the boundary token
        checked += 1
        np.testing.assert_allclose(sampler(top_p=p).probs(logits), renormalised(logits, keep), atol=1e-6)
    assert checked >= 15


@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.1, 0.3, 1.0])
def test_min_p_threshold(min_p):
    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(20):
        logits = random_logits(rng, 64)
        keep, ratio = ref_min_p(logits, min_p)
        if min_p < 1.0 and not far_from(ratio, min_p):
            continue
        checked += 1
        probs = sampler(min_p=min_p).probs(logits)
        np.testing.assert_allclose(probs, renormalised(logits, keep), atol=1e-6)
        kept = probs > 0
        assert np.all(softmax(logits)[kept] >= min_p * softmax(logits).max() * (1 - 1e-5))
    assert checked >= 15


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9, 0.95])
def test_typical_p_matches_reference(p):
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(20):
        logits = random_logits(rng, 48)
        keep, cum = ref_typical(logits, p)
        if not far_from(cum, p):
            continue
        checked += 1
        np.testing.assert_allclose(sampler(typical_p=p).probs(logits), renormalised(logits, keep), atol=1e-6)
    assert checked >= 15


def test_chain_order_filters_then_temperature():
    # top-k first, then top-p on the renormalised k survivors, then min-p, all at temperature 1;
    # the temperature only reshapes the survivors.
    rng = np.random.default_rng(4)
    checked = 0
    for _ in range(20):
        logits = random_logits(rng, 100)
        k, top_p, min_p, temp = 12, 0.7, 0.1, 0.6
        top = np.argsort(-logits.astype(np.float64), kind="stable")[:k]
        sub_keep, cum = ref_top_p(logits[top], top_p)
        kept = top[sub_keep]
        sub_probs = softmax(logits[kept])
        ratio = sub_probs / sub_probs.max()
        if not (far_from(cum, top_p) and far_from(ratio, min_p)):
            continue
        checked += 1
        kept = kept[ratio >= min_p]
        s = sampler(top_k=k, top_p=top_p, min_p=min_p, temperature=temp)
        np.testing.assert_allclose(s.probs(logits), renormalised(logits / temp, kept), atol=1e-6)
    assert checked >= 10


def test_filters_always_keep_one_candidate():
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    for kwargs in (dict(top_k=1), dict(top_p=0.0), dict(min_p=1.0), dict(typical_p=0.0)):
        probs = sampler(**kwargs).probs(logits)
        assert np.count_nonzero(probs) == 1, kwargs
        assert probs.sum() == pytest.approx(1.0)


# ---- penalties ----------------------------------------------------------------------------------

LOGITS = np.array([1.5, -0.5, 2.0, 0.25, -1.25, 0.75, -2.0, 0.0], dtype=np.float32)


def test_repetition_penalty_divides_positive_multiplies_negative():
    s = sampler(repeat_penalty=1.5)
    for t in (2, 4, 2, 7):
        s.accept(t)
    expected = LOGITS.astype(np.float64).copy()
    expected[2] /= 1.5     # positive: divided (once, however often it occurred)
    expected[4] *= 1.5     # negative: multiplied
    # token 7 has logit 0: unchanged either way
    np.testing.assert_allclose(logits_seen(s, LOGITS, ref_token=0), expected, atol=1e-4)


def test_frequency_and_presence_penalties_subtract_exact_amounts():
    s = sampler(frequency_penalty=0.4, presence_penalty=0.3)
    history = [3, 5, 3, 3, 6]
    for t in history:
        s.accept(t)
    expected = LOGITS.astype(np.float64).copy()
    for t in set(history):
        expected[t] -= history.count(t) * 0.4 + 0.3
    np.testing.assert_allclose(logits_seen(s, LOGITS, ref_token=0), expected, atol=1e-4)


def test_all_penalties_combined():
    s = sampler(repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.5)
    for t in (1, 2, 1):
        s.accept(t)
    expected = LOGITS.astype(np.float64).copy()
    expected[1] = expected[1] * 1.3 - 2 * 0.2 - 0.5
    expected[2] = expected[2] / 1.3 - 1 * 0.2 - 0.5
    np.testing.assert_allclose(logits_seen(s, LOGITS, ref_token=0), expected, atol=1e-4)


def test_penalty_window_only_covers_last_n_tokens():
    s = sampler(repeat_penalty=2.0, frequency_penalty=0.5, penalty_last_n=3)
    for t in (2, 5, 2, 3, 5, 1):    # the window holds 3, 5, 1: both 2s have left it
        s.accept(t)
    expected = LOGITS.astype(np.float64).copy()
    for t in (3, 5, 1):
        x = expected[t]
        expected[t] = (x / 2.0 if x > 0 else x * 2.0) - 0.5
    np.testing.assert_allclose(logits_seen(s, LOGITS, ref_token=0), expected, atol=1e-4)


def test_penalty_last_n_zero_and_reset_disable_penalties():
    plain = softmax(LOGITS)
    s = sampler(repeat_penalty=2.0, presence_penalty=1.0, penalty_last_n=0)
    s.accept(2)
    np.testing.assert_allclose(s.probs(LOGITS), plain, atol=1e-6)

    s = sampler(repeat_penalty=2.0, presence_penalty=1.0)
    s.accept(2)
    assert not np.allclose(s.probs(LOGITS), plain, atol=1e-6)
    s.reset()
    np.testing.assert_allclose(s.probs(LOGITS), plain, atol=1e-6)


def test_sample_accepts_its_choice():
    s = sampler(temperature=0.0, presence_penalty=10.0)
    first = s.sample(LOGITS)
    assert first == 2
    assert s.sample(LOGITS) == 0    # 2 is now penalised; the next best is 0
    assert s.sample(LOGITS) == 5


def test_probs_does_not_accept_or_draw():
    a = sampler(seed=9, presence_penalty=1.0)
    b = sampler(seed=9, presence_penalty=1.0)
    for _ in range(5):
        a.probs(LOGITS)
    assert [a.sample(LOGITS) for _ in range(50)] == [b.sample(LOGITS) for _ in range(50)]


# ---- logit bias ---------------------------------------------------------------------------------

def test_logit_bias_adds_to_logits():
    s = sampler(logit_bias={3: 2.5, 6: -1.0, "5": 0.5})   # OpenAI-style string keys work too
    expected = LOGITS.astype(np.float64).copy()
    expected[3] += 2.5
    expected[6] -= 1.0
    expected[5] += 0.5
    np.testing.assert_allclose(logits_seen(s, LOGITS, ref_token=0), expected, atol=1e-4)


def test_logit_bias_runs_before_penalties():
    s = sampler(logit_bias={1: 1.5}, repeat_penalty=2.0)   # -0.5 + 1.5 = 1.0 > 0: divided
    s.accept(1)
    expected = LOGITS.astype(np.float64).copy()
    expected[1] = (expected[1] + 1.5) / 2.0
    np.testing.assert_allclose(logits_seen(s, LOGITS, ref_token=0), expected, atol=1e-4)


def test_logit_bias_minus_inf_bans():
    s = sampler(logit_bias={2: -math.inf, 0: -math.inf}, seed=5)
    probs = s.probs(LOGITS)
    assert probs[2] == 0.0 and probs[0] == 0.0
    drawn = {s.sample(LOGITS) for _ in range(500)}
    assert 2 not in drawn and 0 not in drawn
    assert sampler(temperature=0.0, logit_bias={2: -math.inf}).sample(LOGITS) == 0


def test_set_logit_bias_replaces_and_clears():
    s = sampler(temperature=0.0, logit_bias={2: -math.inf})
    assert s.sample(LOGITS) == 0
    s.set_logit_bias({7: 10.0})
    assert s.sample(LOGITS) == 7
    s.set_logit_bias(None)
    assert s.sample(LOGITS) == 2


def test_banned_tokens_stay_banned_under_penalties():
    s = sampler(logit_bias={1: -math.inf}, frequency_penalty=-5.0, repeat_penalty=0.5)
    s.accept(1)
    assert s.probs(LOGITS)[1] == 0.0


def test_masked_logits_are_never_drawn():
    logits = LOGITS.copy()
    logits[[2, 0, 5]] = -np.inf
    s = sampler(top_p=0.9, min_p=0.05, top_k=5)
    assert not ({s.sample(logits) for _ in range(300)} & {0, 2, 5})


# ---- greedy, seeds, distribution ------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_zero_or_below_is_argmax(temperature):
    rng = np.random.default_rng(6)
    for _ in range(20):
        logits = random_logits(rng, 1000)
        s = _core.Sampler(temperature=temperature)
        assert s.sample(logits) == int(np.argmax(logits))
        probs = s.probs(logits)
        assert probs[np.argmax(logits)] == 1.0 and probs.sum() == 1.0


def test_same_seed_same_sequence_different_seed_differs():
    rng = np.random.default_rng(7)
    logits = random_logits(rng, 500, scale=0.5)

    def run(seed):
        s = _core.Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        return [s.sample(logits) for _ in range(200)]

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert run(0) == run(0)
    assert run(None) != run(None)   # a random seed each time


def test_empirical_distribution_matches_softmax():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.25], dtype=np.float32)
    n = 20000
    for temperature in (1.0, 0.7):
        s = sampler(temperature=temperature, seed=2024)
        draws = np.array([s.sample(logits) for _ in range(n)])
        freq = np.bincount(draws, minlength=len(logits)) / n
        expected = softmax(logits / temperature)
        np.testing.assert_allclose(s.probs(logits), expected, atol=1e-6)
        assert np.max(np.abs(freq - expected)) < 0.015


def test_uses_default_chain():
    # Defaults are llama-cpp-python's: top_k 40, top_p 0.95, min_p 0.05, temperature 0.8.
    rng = np.random.default_rng(8)
    logits = random_logits(rng, 1000, scale=1.0)
    probs = _core.Sampler(seed=1).probs(logits)
    assert 1 <= np.count_nonzero(probs) <= 40
    assert set(np.nonzero(probs)[0]) <= set(np.argsort(-logits)[:40].tolist())


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(temperature=math.nan), dict(temperature=math.inf),
    dict(top_p=1.5), dict(top_p=-0.1), dict(top_p=math.nan),
    dict(min_p=2.0), dict(min_p=-0.5), dict(typical_p=math.nan), dict(typical_p=1.01),
    dict(repeat_penalty=0.0), dict(repeat_penalty=-1.0), dict(repeat_penalty=math.inf),
    dict(frequency_penalty=math.nan), dict(presence_penalty=math.inf),
    dict(penalty_last_n=-1), dict(seed=-2), dict(seed=2**32),
    dict(logit_bias={1: math.inf}), dict(logit_bias={1: math.nan}), dict(logit_bias={-3: 1.0}),
])
def test_bad_params_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        _core.Sampler(**kwargs)


@pytest.mark.parametrize("logits", [
    np.zeros(0, dtype=np.float32),
    np.zeros((2, 3), dtype=np.float32),
    np.array([0.0, math.nan, 1.0], dtype=np.float32),
    np.array([0.0, math.inf, 1.0], dtype=np.float32),
    np.full(4, -np.inf, dtype=np.float32),
])
def test_bad_logits_raise_value_error(logits):
    for temperature in (0.0, 0.8):
        s = _core.Sampler(temperature=temperature)
        with pytest.raises(ValueError):
            s.sample(logits)
        with pytest.raises(ValueError):
            s.probs(logits)


def test_bias_token_outside_vocab_raises_at_sampling():
    s = sampler(logit_bias={10: 1.0})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.sample(LOGITS)
    assert 0 <= sampler(logit_bias={7: 1.0}).sample(LOGITS) < len(LOGITS)


def test_all_banned_by_bias_raises():
    s = sampler(logit_bias={i: -math.inf for i in range(len(LOGITS))})
    with pytest.raises(ValueError, match="-inf"):
        s.sample(LOGITS)
    # a failed call leaves the sampler usable
    s.set_logit_bias(None)
    assert 0 <= s.sample(LOGITS) < len(LOGITS)
