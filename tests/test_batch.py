"""decode_batch: several contexts of one model in shared forward passes, each ending exactly as its
own ctx.decode would leave it (logits, KV cache, δ-mem memory), for every mix of lengths, n_past,
adapter write modes and ids; errors leave every context as it was."""
from __future__ import annotations

import numpy as np
import pytest

import pydeltamem
from dmem_fixtures import VARIANTS
from test_dmem import backbone, convert, rel_err  # noqa: F401 (a fixture)

F32_TOL = 1e-5


def histories(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    """What each context has decoded before the batch: different lengths (0 included)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(k)).tolist() for k in ([0, 9, 1, 30, 4, 17, 2, 11][:n])]


def twins(model: pydeltamem.Model, hist: list[list[int]], **ctx_kwargs):
    """Two contexts per history, in the same state: one for the batch, one decoded alone."""
    pairs = []
    for h in hist:
        a, b = model.context(kv_type="f32", **ctx_kwargs), model.context(kv_type="f32", **ctx_kwargs)
        for c in (a, b):
            if h:
                c.decode(h, logits="none")
        pairs.append((a, b))
    return pairs


def check_batch_equals_alone(pairs, token_lists, logits, tol=F32_TOL, **kw):
    ids = kw.pop("message_ids", None)
    writes = kw.pop("write", True)
    got = pydeltamem.decode_batch([a for a, _ in pairs], token_lists, logits, message_ids=ids, write=writes)
    for i, ((a, b), toks) in enumerate(zip(pairs, token_lists)):
        w = writes if isinstance(writes, bool) else writes[i]
        want = b.decode(toks, logits, message_ids=None if ids is None else ids[i], write=w)
        if logits != "none":
            assert rel_err(got[i], want) <= tol, f"context {i}"
        assert a.tokens == b.tokens
        if a.model.adapter is not None:
            np.testing.assert_allclose(a.memory, b.memory, rtol=1e-4, atol=1e-5, err_msg=f"context {i}")


@pytest.mark.parametrize("arch", ["qwen3", "llama", "smollm3"])
def test_mixed_lengths_and_positions(arch, backbone):
    gguf_path, hf_model, _ = backbone(arch)
    vocab = hf_model.config.vocab_size
    rng = np.random.default_rng(1)
    with pydeltamem.Model(gguf_path, n_ctx=128) as m:
        pairs = twins(m, histories(vocab, 5))
        # some prefill hundreds... here tens (n_ctx 128), others decode one token
        check_batch_equals_alone(pairs, [rng.integers(0, vocab, k).tolist() for k in (40, 1, 7, 1, 23)], "all")
        for _ in range(3):   # decode steps of everyone
            check_batch_equals_alone(pairs, [[int(rng.integers(0, vocab))] for _ in pairs], "last")
        check_batch_equals_alone(pairs, [rng.integers(0, vocab, k).tolist() for k in (3, 5, 1, 2, 8)], "none")
        check_batch_equals_alone(pairs, [[1], [2], [3], [4], [5]], "last")


@pytest.mark.parametrize("variant", ["released", "defaults", "uncoupled_lambda", "state_heads_4", "lambda_outside",
                                     "scalar_gates", "o_rmsnorm", "target_subset"])
@pytest.mark.parametrize("fused", [True, False])
def test_dmem_variants(variant, fused, backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    vocab = hf_model.config.vocab_size
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS[variant], outtype="f32")
    rng = np.random.default_rng(2)
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=128) as m:
        pairs = twins(m, histories(vocab, 4), dmem_fused=fused)
        check_batch_equals_alone(pairs, [rng.integers(0, vocab, k).tolist() for k in (12, 1, 30, 3)], "all")
        # some contexts read-only while others write
        check_batch_equals_alone(pairs, [[7], [8], [9], [10]], "last", write=[True, False, True, False])
        for _ in range(2):
            check_batch_equals_alone(pairs, [[int(rng.integers(0, vocab))] for _ in pairs], "last")
        assert all(np.abs(a.memory).max() > 0 for a, _ in pairs)


@pytest.mark.parametrize("variant", ["message_mean", "sentence_mean"])
def test_segment_mean_writes_with_ids(variant, backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    vocab = hf_model.config.vocab_size
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS[variant], outtype="f32")
    rng = np.random.default_rng(3)
    lengths = (10, 6, 1, 14)
    tokens = [rng.integers(0, vocab, k).tolist() for k in lengths]
    ids = [[-1] * 2 + [0] * 4 + [1] * 4, [3] * 6, [5], [-1] * 14]   # the last: all -1, so token writes
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64, n_batch=4) as m:   # n_batch < a call
        pairs = twins(m, histories(vocab, 4))
        got = pydeltamem.decode_batch([a for a, _ in pairs], tokens, "all", message_ids=ids, sentence_ids=ids)
        for i, (a, b) in enumerate(pairs):
            want = b.decode(tokens[i], "all", message_ids=ids[i], sentence_ids=ids[i])
            assert rel_err(got[i], want) <= F32_TOL
            np.testing.assert_allclose(a.memory, b.memory, rtol=1e-4, atol=1e-5)


def test_long_prompts_are_chunked_like_decode(backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("llama")
    vocab = hf_model.config.vocab_size
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"], outtype="f32")
    rng = np.random.default_rng(4)
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=512, n_batch=64) as m:
        pairs = twins(m, histories(vocab, 3))
        check_batch_equals_alone(pairs, [rng.integers(0, vocab, k).tolist() for k in (300, 1, 130)], "last")


def test_quantized_model(backbone, tiny_gguf, tmp_path):
    _, hf_model, _ = backbone("qwen3")
    gguf_path = tiny_gguf("qwen3-untied", "q8_0")
    vocab = hf_model.config.vocab_size
    rng = np.random.default_rng(5)
    with pydeltamem.Model(gguf_path, n_ctx=128) as m:
        pairs = twins(m, histories(vocab, 4))
        toks = [rng.integers(0, vocab, k).tolist() for k in (20, 1, 9, 1)]
        got = pydeltamem.decode_batch([a for a, _ in pairs], toks, "all")
        for i, (a, b) in enumerate(pairs):
            want = b.decode(toks[i], "all")
            assert rel_err(got[i], want) <= 1e-3
            assert got[i].argmax(-1).tolist() == want.argmax(-1).tolist()


def state_of(ctx) -> tuple:
    return ctx.n_past, ctx.tokens, None if ctx.model.adapter is None else ctx.memory.copy()


def assert_unchanged(contexts, before):
    for c, (n_past, tokens, memory) in zip(contexts, before):
        assert c.n_past == n_past and c.tokens == tokens
        if memory is not None:
            np.testing.assert_array_equal(c.memory, memory)


def test_errors_name_the_context_and_change_nothing(backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    vocab = hf_model.config.vocab_size
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"], outtype="f32")
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=32) as m, \
            pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=32) as other:
        ctxs = [m.context() for _ in range(3)]
        for c in ctxs:
            c.decode([1, 2, 3])
        before = [state_of(c) for c in ctxs]
        cases = [
            (ctxs[:2] + [other.context()], r"context 2 belongs to another Model"),
            ([ctxs[0], ctxs[1], ctxs[0]], r"context 2 is context 0 again"),
        ]
        for contexts, match in cases:
            with pytest.raises(ValueError, match=match):
                pydeltamem.decode_batch(contexts, [[4]] * len(contexts))
            assert_unchanged(ctxs, before)
        # overflow of one context's n_ctx: the others are not decoded either
        with pytest.raises(ValueError, match=r"context 1: decode: context overflow"):
            pydeltamem.decode_batch(ctxs, [[4], list(range(40)), [5]])
        assert_unchanged(ctxs, before)
        with pytest.raises(ValueError, match=r"context 2: decode: token id .* out of range"):
            pydeltamem.decode_batch(ctxs, [[4], [5], [vocab + 3]])
        assert_unchanged(ctxs, before)
        with pytest.raises(ValueError, match=r"context 0: decode: empty input"):
            pydeltamem.decode_batch(ctxs, [[], [5], [6]])
        assert_unchanged(ctxs, before)
        closed = m.context()
        closed.close()
        with pytest.raises(ValueError, match=r"context 1: .*closed"):
            pydeltamem.decode_batch([ctxs[0], closed], [[4], [5]])
        assert_unchanged(ctxs, before)
        with pytest.raises(ValueError, match="no contexts"):
            pydeltamem.decode_batch([], [])
        with pytest.raises(ValueError, match="entries in tokens"):
            pydeltamem.decode_batch(ctxs, [[4]])
        with pytest.raises(ValueError, match="another Model"):
            other.decode_batch(ctxs, [[1]] * 3)
        # and the batch still works afterwards, as Model.decode_batch too
        out = m.decode_batch(ctxs, [[4], [5], [6]])
        assert all(o.shape == (vocab,) for o in out)


def test_aborted_batch_puts_every_context_back(backbone, tmp_path):
    """A pass that fails after earlier passes wrote memories (here: the leader's context is closed
    by another thread mid-call) leaves every context as it was."""
    import threading

    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"], outtype="f32")
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=4096, n_batch=2) as m:
        ctxs = [m.context(n_threads=1) for _ in range(2)]
        for c in ctxs:
            c.decode([1, 2, 3])
        before = [state_of(c) for c in ctxs]
        tokens = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, 4000).tolist()
        timer = threading.Timer(0.2, ctxs[0].close)
        timer.start()
        with pytest.raises(ValueError, match="abort|closed"):
            pydeltamem.decode_batch(ctxs, [tokens, tokens[:10]])
        timer.join()
        assert_unchanged(ctxs[1:], before[1:])


def test_one_context_one_token(backbone):
    """The degenerate batch: one context, one token (every tensor's token dimension is 1)."""
    gguf_path, hf_model, _ = backbone("qwen3")
    with pydeltamem.Model(gguf_path, n_ctx=32) as m:
        pairs = twins(m, [[3, 4]])
        for t in ([5], [6, 7], [8]):
            check_batch_equals_alone(pairs, [t], "all")


def test_a_leader_can_lead_larger_batches_later(backbone):
    """The batch's graph grows with its sequences: a batch of 2, then of 8, led by the same context."""
    gguf_path, hf_model, _ = backbone("llama")
    with pydeltamem.Model(gguf_path, n_ctx=64) as m:
        pairs = twins(m, histories(hf_model.config.vocab_size, 8))
        check_batch_equals_alone(pairs[:2], [[11], [12]], "last")
        check_batch_equals_alone(pairs, [[i + 13] for i in range(8)], "last")
        check_batch_equals_alone(pairs[:3], [[24], [25, 26], [27]], "all")
