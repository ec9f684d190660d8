"""One sampling policy: SamplingParams' defaults are the C engine's (read by a C program too), the CLI
and the Python API sample with them, and the rules (seed, logit_bias keys, ranges) live in one place."""
from __future__ import annotations

import math
import subprocess

import numpy as np
import pytest

from pydeltamem import _core, cli_text
from pydeltamem.sampling import CHAT_TEMPERATURE, SamplingParams, sampling_params
from test_c_api import build_c_program

PRINT_DEFAULTS_C = r"""
#include <deltamem.h>
#include <stdio.h>
int main(void) {
    struct dm_sampler_params p = dm_sampler_default_params();
    printf("%.9g %d %.9g %.9g %.9g %.9g %.9g %.9g %d %d\n", p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p,
           p.repeat_penalty, p.frequency_penalty, p.presence_penalty, p.penalty_last_n, p.seed == DM_SEED_RANDOM);
    return 0;
}
"""
FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
          "presence_penalty", "penalty_last_n")


def test_defaults_are_the_c_engines(tmp_path):
    source = tmp_path / "print_defaults.c"
    source.write_text(PRINT_DEFAULTS_C)
    out = subprocess.run([str(build_c_program(source, tmp_path))], capture_output=True, text=True, check=True).stdout
    *values, random_seed = out.split()
    defaults = SamplingParams()
    for name, text in zip(FIELDS, values):
        assert getattr(defaults, name) == pytest.approx(float(text), rel=1e-7), name
    assert random_seed == "1" and defaults.seed is None and defaults.logit_bias is None
    assert SamplingParams.chat() == SamplingParams(temperature=CHAT_TEMPERATURE)


def test_cli_samples_with_the_same_defaults():
    parser = cli_text.argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli_text.register_cli(sub)
    generate = cli_text._sampling(parser.parse_args(["generate", "x"]))
    chat = cli_text._sampling(parser.parse_args(["chat"]))
    assert generate == SamplingParams()
    assert chat == SamplingParams.chat()


@pytest.mark.parametrize("seed, expected", [(None, None), (-1, None), (0, 0), (2**32 - 1, 2**32 - 1)])
def test_seed_rule(seed, expected):
    assert SamplingParams(seed=seed).seed == expected


@pytest.mark.parametrize("kwargs, name", [
    (dict(seed=-2), "seed"), (dict(seed=2**32), "seed"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"), (dict(typical_p=2.0), "typical_p"),
    (dict(repeat_penalty=0.0), "repeat_penalty"), (dict(frequency_penalty=math.inf), "frequency_penalty"),
    (dict(top_k=10**10), "top_k"), (dict(top_k=1.5), "top_k"), (dict(penalty_last_n=-1), "penalty_last_n"),
    (dict(logit_bias={"abc": 1.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={1: math.inf}), "logit_bias"), (dict(logit_bias={1: math.nan}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"), (dict(temperature="hot"), "temperature"),
])
def test_bad_values_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_normalisation():
    p = SamplingParams(temperature=-1, top_k=np.int64(5), logit_bias={"7": 2, 3: -math.inf})
    assert p.temperature == 0.0 and p.top_k == 5 and type(p.top_k) is int
    assert dict(p.logit_bias) == {7: 2.0, 3: -math.inf}
    with pytest.raises(TypeError, match="read-only"):
        p.logit_bias[1] = 0.0
    assert p.native()["logit_bias"] == {7: 2.0, 3: -math.inf}
    assert set(p.native()) == set(FIELDS) | {"seed", "logit_bias"}


def test_sampling_params_merges_and_rejects_unknown_names():
    base = SamplingParams.chat(top_k=3)
    assert sampling_params(base, top_p=0.5) == SamplingParams(temperature=CHAT_TEMPERATURE, top_k=3, top_p=0.5)
    assert sampling_params(base, top_p=None) is base            # None keeps the value
    assert sampling_params(SamplingParams(seed=4), seed=None).seed == 4
    assert sampling_params(SamplingParams(seed=4), seed=-1).seed is None    # -1 asks for a random seed
    assert sampling_params(SamplingParams(logit_bias={1: 2.0}), logit_bias={}).logit_bias is None
    with pytest.raises(TypeError, match="SamplingParams"):
        sampling_params({"temperature": 0.0})
    with pytest.raises(TypeError, match="unknown sampling arguments: tempurature"):
        sampling_params(base, tempurature=1.0)


def test_the_native_sampler_takes_the_params_over_the_c_defaults():
    logits = np.random.default_rng(3).standard_normal(500).astype(np.float32)
    defaults = _core.Sampler(seed=1).probs(logits)
    explicit = _core.Sampler(**SamplingParams(seed=1).native()).probs(logits)
    np.testing.assert_array_equal(defaults, explicit)
    with pytest.raises(TypeError, match="tempurature"):
        _core.Sampler(tempurature=1.0)


def test_penalty_history_in_one_call_equals_token_by_token():
    logits = np.random.default_rng(4).standard_normal(64).astype(np.float32)
    history = [5, 9, 9, 17, 5, 33, 2, 9]
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.3,
                            frequency_penalty=0.4, presence_penalty=0.2, penalty_last_n=6, seed=2).native()
    one_by_one, at_once = _core.Sampler(**params), _core.Sampler(**params)
    for t in history:
        one_by_one.accept(t)
    at_once.accept_tokens(history)
    np.testing.assert_array_equal(one_by_one.probs(logits), at_once.probs(logits))
    assert not np.array_equal(_core.Sampler(**params).probs(logits), at_once.probs(logits))
