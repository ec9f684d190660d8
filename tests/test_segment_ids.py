"""Which ids a decode call's δ-mem writes group by, as the official module takes them: a call whose
ids are missing, of the wrong length or all -1 writes token by token; sentence_mean needs message
ids beside its sentence ids (a token writes only inside a message)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import pydeltamem
from test_session import adapted  # noqa: F401  (a fixture)

TOKENS = [5, 17, 33, 2, 40, 8, 21]


def _memory_after(gguf_path, adapter, **ids):
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64, n_threads=1) as m:
        ctx = m.context()
        ctx.decode(TOKENS, logits="none", **ids)
        return ctx.memory.copy()


@pytest.mark.parametrize("variant, key", [("message_mean", "message_ids"), ("sentence_mean", "sentence_ids")])
def test_mis_sized_ids_write_token_by_token_with_a_warning(adapted, variant, key):
    gguf_path, adapter = adapted(variant)
    per_token = _memory_after(gguf_path, adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = {"message_ids": [0] * len(TOKENS)} if key == "sentence_ids" else {}
        ids[key] = [0] * (len(TOKENS) - 2)
        mis_sized = _memory_after(gguf_path, adapter, **ids)
    assert any(issubclass(w.category, RuntimeWarning) and "token by token" in str(w.message) for w in caught)
    np.testing.assert_array_equal(mis_sized, per_token)
    grouped = _memory_after(gguf_path, adapter, message_ids=[0] * len(TOKENS), sentence_ids=[0] * len(TOKENS))
    assert not np.allclose(grouped, per_token)   # the ids do matter when they fit


def test_sentence_ids_without_message_ids_write_token_by_token(adapted):
    gguf_path, adapter = adapted("sentence_mean")
    per_token = _memory_after(gguf_path, adapter)
    np.testing.assert_array_equal(_memory_after(gguf_path, adapter, sentence_ids=[0] * len(TOKENS)), per_token)
    # Outside a message (message id -1) a sentence id does not count: all -1 in effect, token writes.
    outside = _memory_after(gguf_path, adapter, message_ids=[-1] * len(TOKENS), sentence_ids=[0] * len(TOKENS))
    np.testing.assert_array_equal(outside, per_token)
