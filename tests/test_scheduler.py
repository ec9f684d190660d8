"""BatchScheduler (continuous batching): requests that join and leave a running batch get exactly
what a single-request generation gives them (greedy), with their own stops, limits and memory;
cancellation frees the slot; bad requests fail alone."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

import pydeltamem
from dmem_fixtures import VARIANTS
from pydeltamem.sampling import new_sampler
from test_backbone import smollm2_gguf
from test_dmem import backbone, convert  # noqa: F401 (a fixture)

GREEDY = pydeltamem.SamplingParams(temperature=0.0)
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def fib(n):", "Water boils at",
           "My favourite colour is", "Here is a list of fruits:"]


@pytest.fixture(scope="module")
def smollm2():
    with pydeltamem.Model(smollm2_gguf(), n_ctx=256, n_threads=2) as m:
        yield m


def alone(model, prompt: str, **kw) -> dict:
    return model.create_completion(prompt, temperature=0.0, **kw)["choices"][0]


def test_concurrent_requests_equal_generating_alone(smollm2):
    want = [alone(smollm2, p, max_tokens=12) for p in PROMPTS]
    with pydeltamem.BatchScheduler(smollm2, max_batch=3) as sched:   # more requests than slots: some wait
        reqs = [sched.submit(smollm2.tokenize(p, add_special=True), max_tokens=12, sampling=GREEDY) for p in PROMPTS]
        streamed = ["".join(r) for r in reqs]
        steps = sched.steps
    for w, r, s in zip(want, reqs, streamed):
        assert r.result().text == w["text"] == s
        assert r.result().finish == w["finish_reason"]
    # batched: far fewer steps than tokens generated one request at a time
    assert steps < sum(len(r.result().tokens) for r in reqs)


def test_requests_join_a_running_batch_and_leave_it(smollm2):
    with pydeltamem.BatchScheduler(smollm2, max_batch=4) as sched:
        first = [sched.submit(smollm2.tokenize(p, add_special=True), max_tokens=n, sampling=GREEDY)
                 for p, n in zip(PROMPTS[:2], (40, 3))]
        next(iter(first[0]))               # the batch is running
        later = [sched.submit(smollm2.tokenize(p, add_special=True), max_tokens=8, sampling=GREEDY,
                              stop=["\n"]) for p in PROMPTS[2:5]]
        results = [r.result(timeout=120) for r in first + later]
    assert results[0].text == alone(smollm2, PROMPTS[0], max_tokens=40)["text"]
    assert results[1].text == alone(smollm2, PROMPTS[1], max_tokens=3)["text"] and len(results[1].tokens) == 3
    for p, res in zip(PROMPTS[2:5], results[2:]):
        w = alone(smollm2, p, max_tokens=8, stop=["\n"])
        assert res.text == w["text"] and "\n" not in res.text


def test_cancel_frees_the_slot(smollm2):
    with pydeltamem.BatchScheduler(smollm2, max_batch=1) as sched:
        long = sched.submit(smollm2.tokenize(PROMPTS[0], add_special=True), max_tokens=200, sampling=GREEDY)
        waiting = sched.submit(smollm2.tokenize(PROMPTS[1], add_special=True), max_tokens=6, sampling=GREEDY)
        next(iter(long))
        assert not waiting.done and sched.n_waiting == 1   # one slot: it waits for the long one
        long.cancel()
        assert long.result(timeout=60).finish == "cancelled" and len(long.result().tokens) < 200
        assert waiting.result(timeout=60).text == alone(smollm2, PROMPTS[1], max_tokens=6)["text"]
        queued = sched.submit(smollm2.tokenize(PROMPTS[2], add_special=True), max_tokens=50, sampling=GREEDY)
        queued.cancel()   # cancelled before or while it runs
        assert queued.result(timeout=60).finish == "cancelled"


def test_sampled_requests_follow_their_own_samplers(smollm2):
    """Seeded sampling: the same stream as the sampler alone would draw, whatever else runs."""
    params = pydeltamem.SamplingParams(temperature=0.8, top_k=40, seed=7)
    prompt = smollm2.tokenize(PROMPTS[3], add_special=True)
    ctx = smollm2.context(n_ctx=256)
    want = ctx.generate(prompt, new_sampler(params, prompt), max_tokens=20)
    with pydeltamem.BatchScheduler(smollm2, max_batch=4) as sched:
        others = [sched.submit(smollm2.tokenize(p, add_special=True), max_tokens=20, sampling=GREEDY) for p in PROMPTS[:3]]
        got = sched.submit(prompt, max_tokens=20, sampling=params).result(timeout=120)
        for o in others:
            o.result(timeout=120)
    assert got.tokens == want.tokens


def test_dmem_requests_continue_their_contexts(backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"], outtype="f32")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, hf_model.config.vocab_size, k).tolist() for k in (7, 3, 12)]
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64) as m:
        solo = [m.context(kv_type="f32") for _ in prompts]
        want = [c.generate(p, new_sampler(GREEDY, p), max_tokens=6, write=w)
                for c, p, w in zip(solo, prompts, (True, False, True))]
        mine = [m.context(kv_type="f32") for _ in prompts]
        with pydeltamem.BatchScheduler(m, max_batch=4) as sched:
            reqs = [sched.submit(p, context=c, max_tokens=6, sampling=GREEDY, write=w)
                    for c, p, w in zip(mine, prompts, (True, False, True))]
            got = [r.result(timeout=60) for r in reqs]
        for g, w, a, b in zip(got, want, mine, solo):
            assert g.tokens == w.tokens
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.memory, b.memory, rtol=1e-4, atol=1e-5)
        assert not np.any(mine[1].memory)   # write=False read the memory without writing it


def test_bad_requests_fail_alone(smollm2):
    with pydeltamem.BatchScheduler(smollm2, max_batch=4, max_queue=2) as sched:
        with pytest.raises(ValueError, match="more than the context has room"):
            sched.submit(list(range(300)))
        with pytest.raises(ValueError, match="empty"):
            sched.submit([])
        history = smollm2.tokenize("a b c d e f g h i j", add_special=True)
        ctx, twin = smollm2.context(n_ctx=16), smollm2.context(n_ctx=16)
        for c in (ctx, twin):
            c.decode(history)
        ok = sched.submit(smollm2.tokenize(PROMPTS[0], add_special=True), max_tokens=5, sampling=GREEDY)
        with pytest.raises(ValueError, match="already has a request"):
            sched.submit([1], context=ok.context)
        near_full = sched.submit([5, 6], context=ctx, max_tokens=30, sampling=GREEDY)   # runs out of context
        want = twin.generate([5, 6], new_sampler(GREEDY, history + [5, 6]), max_tokens=30)
        got = near_full.result(timeout=60)
        assert (got.tokens, got.finish) == (want.tokens, want.finish) and ctx.n_past <= 16
        assert ok.result(timeout=60).text == alone(smollm2, PROMPTS[0], max_tokens=5)["text"]
        ctx.close()
        twin.close()
    with pytest.raises(ValueError, match="closed"):
        sched.submit([1, 2])


def test_many_threads_submit_at_once(smollm2):
    want = {p: alone(smollm2, p, max_tokens=8)["text"] for p in PROMPTS}
    got: dict[str, str] = {}
    with pydeltamem.BatchScheduler(smollm2, max_batch=4) as sched:
        def client(p):
            got[p] = "".join(sched.submit(smollm2.tokenize(p, add_special=True), max_tokens=8, sampling=GREEDY))
        threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert time.monotonic() - t0 < 120
    assert got == want


def test_decode_joins_the_next_step_and_equals_decoding_alone(backbone, tmp_path):
    """BatchScheduler.decode: a prompt fed into a context inside the scheduler's steps, not waiting
    for a slot; the context ends as Context.decode alone leaves it (segment-mean ids included)."""
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["message_mean"], outtype="f32")
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, hf_model.config.vocab_size, 9).tolist()
    ids = [0] * 4 + [-1] + [1] * 4
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64) as m:
        solo, fed, read_only = (m.context(kv_type="f32") for _ in range(3))
        solo.decode(prompt, logits="none", message_ids=ids)
        # The only slot: a request that runs until its context (256) is full, hundreds of steps,
        # so that it is still running when the decodes return unless they waited for it.
        with pydeltamem.BatchScheduler(m, max_batch=1, n_ctx=256) as sched:
            endless = pydeltamem.SamplingParams(temperature=0.0, logit_bias={t: -math.inf for t in m.end_of_turn_tokens})
            busy = sched.submit(rng.integers(0, hf_model.config.vocab_size, 5).tolist(), max_tokens=None, sampling=endless)
            deadline = time.monotonic() + 60
            while sched.n_running == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            sched.decode(prompt, context=fed, seg_ids=ids)
            sched.decode(prompt, context=read_only, write=False)
            assert not busy.done   # they ran beside it: waiting for its slot would have waited for its end
            with pytest.raises(ValueError, match="out of range"):
                sched.decode([1, 10**6], context=fed)
            with pytest.raises(ValueError, match="more than the context has room"):
                sched.decode(list(range(60)), context=fed)
            busy.cancel()
        with pytest.raises(ValueError, match="closed"):
            sched.decode([1], context=fed)
        assert fed.tokens == solo.tokens == prompt and read_only.tokens == prompt
        np.testing.assert_allclose(fed.memory, solo.memory, rtol=1e-5, atol=1e-6)
        assert np.abs(solo.memory).max() > 0 and not np.any(read_only.memory)
        nxt = int(rng.integers(0, hf_model.config.vocab_size))
        np.testing.assert_allclose(fed.decode([nxt]), solo.decode([nxt]), rtol=1e-5, atol=1e-5)
