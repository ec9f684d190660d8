"""Threads and closing: work in flight on another thread, one context shared by two threads, calls
from a generation's own callback, and an interpreter that exits with a stream still running.

Each case runs in a subprocess (a use-after-free or an abort then fails the test instead of killing
pytest; a deadlock runs into the timeout) and tries its race repeatedly. The script reports what each
attempt saw; the test checks that every outcome is an allowed one: the call's normal result, or a
ValueError saying the object is (or was, during the call) closed.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pydeltamem.defaults import default_model_path

PROMPT = "The capital of France is"

_PRELUDE = textwrap.dedent("""
    import collections, sys, threading, time
    import numpy as np
    import pydeltamem
    from pydeltamem import _core
    MODEL = sys.argv[1]
    FAST = dict(n_threads=1, poll=0)   # the races need no speed; spinning workers would slow a busy machine
    outcomes = collections.Counter()

    def outcome(fn):
        # Runs fn; records "ok", or the closed-handle ValueError; anything else propagates (exit 1).
        try:
            fn()
            outcomes["ok"] += 1
        except ValueError as e:
            if "closed" not in str(e):
                raise
            outcomes["during" if "during the call" in str(e) else "closed"] += 1

    def no_end(m):
        # logit_bias that bans the end-of-generation tokens: a generation runs until max_tokens.
        return {t: float("-inf") for t in range(m.n_vocab) if _core.token_is_eog(m._native, t)}

    def in_thread(fn):
        errors = []
        def run():
            try:
                fn()
            except BaseException as e:
                errors.append(e)
        t = threading.Thread(target=run)
        t.start()
        return t, errors

    def close_during(work, close, delay):
        # Runs work() in a thread, close() once it has started (after delay seconds); re-raises work's errors.
        started = threading.Event()
        def run():
            started.set()
            work()
        t, errors = in_thread(run)
        started.wait()
        time.sleep(delay)
        close()
        t.join()
        if errors:
            raise errors[0]
""")


def run_script(body: str, *args: str, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body), default_model_path(), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"exit code {proc.returncode} (negative: killed by a signal)\n"
                                  f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc.stdout


def outcomes_of(stdout: str) -> dict[str, int]:
    line = next(li for li in stdout.splitlines() if li.startswith("outcomes "))
    return eval(line[len("outcomes "):])   # a dict literal printed by the script


def test_leaving_the_with_block_during_a_stream_aborts_the_generation():
    """`with Model(p) as m: g = m(prompt, stream=True); next(g)`, then leaving the block: the close
    aborts the generation the stream's worker thread is running, and the stream then raises."""
    out = run_script("""
        for attempt in range(4):
            with pydeltamem.Model(MODEL, n_ctx=512, **FAST) as m:
                g = m("Once upon a time", stream=True, max_tokens=300, seed=attempt, logit_bias=no_end(m))
                first = next(g)
                assert first["choices"][0]["text"]
            assert m.closed
            outcome(lambda: list(g))
            outcome(lambda: m.tokenize("after close"))
        print("outcomes", dict(outcomes))
    """)
    # The generation was in flight at the close (300 tokens cannot be done by then): it was aborted.
    assert outcomes_of(out) == {"during": 4, "closed": 4}


def test_model_close_while_another_thread_completes():
    out = run_script("""
        for attempt in range(8):
            m = pydeltamem.Model(MODEL, n_ctx=256, **FAST)
            m.create_completion("warm up", max_tokens=1)   # the generation context exists
            def complete():
                for i in range(2):
                    outcome(lambda: m.create_completion("The capital of France is", max_tokens=24, temperature=0))
            close_during(complete, m.close, 0.02 * attempt)
        print("outcomes", dict(outcomes))
    """)
    seen = outcomes_of(out)
    assert set(seen) <= {"ok", "during", "closed"} and sum(seen.values()) == 16, seen


def test_context_close_while_another_thread_decodes():
    out = run_script("""
        with pydeltamem.Model(MODEL, **FAST) as m:
            prompt = m.tokenize("The quick brown fox jumps over the lazy dog. " * 20)
            for attempt in range(10):
                ctx = m.context(n_ctx=1024, n_batch=64)
                close_during(lambda: outcome(lambda: ctx.decode(prompt, logits="last")), ctx.close, 0.01 * attempt)
                assert ctx._native.closed
                outcome(lambda: ctx.decode([1]))   # after the close
        print("outcomes", dict(outcomes))
    """)
    seen = outcomes_of(out)
    assert set(seen) <= {"ok", "during", "closed"} and sum(seen.values()) == 20, seen
    assert seen["closed"] >= 10   # every decode after a close raises


def test_model_close_during_a_long_tokenize_waits_for_it():
    """The tokenizer is not cancellable: the close waits, and the tokens are all there."""
    out = run_script("""
        text = "Natürlich, the café serves 42 crêpes; 東京 is far. " * 5000
        with pydeltamem.Model(MODEL, **FAST) as reference:
            expected = reference.tokenize(text)
        for attempt in range(3):
            m = pydeltamem.Model(MODEL, **FAST)
            got = []
            close_during(lambda: outcome(lambda: got.append(m.tokenize(text))), m.close, 0.02 * attempt)
            assert got in ([], [expected])
            outcome(lambda: m.tokenize("x"))
        print("outcomes", dict(outcomes))
    """)
    seen = outcomes_of(out)
    assert set(seen) <= {"ok", "closed"} and sum(seen.values()) == 6 and seen["closed"] >= 3, seen


def test_one_context_from_two_threads_is_serialised():
    """Two threads decode into one context: each call is atomic (the sequence is a run of whole
    chunks) and the KV cache it leaves is the one a single thread would have built."""
    out = run_script("""
        with pydeltamem.Model(MODEL, **FAST) as m:
            chunks = {"a": m.tokenize("One two three four five six seven.", add_special=False),
                      "b": m.tokenize("Lorem ipsum dolor sit amet, consectetur.", add_special=False)}
            ctx = m.context(n_ctx=96, n_batch=8)
            def hammer(name):
                for i in range(12):
                    while True:   # each round ends with its chunk decoded, so the sequence ends non-empty
                        try:
                            ctx.decode(chunks[name])
                            break
                        except ValueError as e:
                            assert "context overflow" in str(e), e
                            ctx.reset()
                    if i % 3 == 0:   # reads between the other thread's writes
                        assert len(ctx.tokens) <= ctx.n_ctx and len(ctx._native.kv_get()) >= 0
            threads = [in_thread(lambda n=n: hammer(n)) for n in chunks]
            for t, errors in threads:
                t.join()
                if errors:
                    raise errors[0]
            seq, order = ctx.tokens, []
            while sum(map(len, order)) < len(seq):   # whole chunks only
                pos = sum(map(len, order))
                order.append(next(c for c in chunks.values() if seq[pos:pos + len(c)] == c))
            last = [m.token_eos or 0]
            shared = ctx.decode(last)
            fresh = m.context(n_ctx=96, n_batch=8)
            for chunk in order:   # the same calls from one thread: the same numbers
                fresh.decode(chunk)
            np.testing.assert_allclose(shared, fresh.decode(last), rtol=1e-6, atol=1e-6)
            print("outcomes", {"chunks": len(order)})
    """)
    assert outcomes_of(out)["chunks"] > 0


def test_two_threads_completing_on_one_model_get_single_thread_results():
    out = run_script("""
        prompts = ["The capital of France is", "Water boils at", "The largest planet is"]
        with pydeltamem.Model(MODEL, n_ctx=256, **FAST) as m:
            expected = {p: m.create_completion(p, max_tokens=8, temperature=0)["choices"][0]["text"] for p in prompts}
            got = []
            def complete(p):
                for _ in range(2):
                    got.append((p, m.create_completion(p, max_tokens=8, temperature=0)["choices"][0]["text"]))
            threads = [in_thread(lambda p=p: complete(p)) for p in prompts]
            for t, errors in threads:
                t.join()
                if errors:
                    raise errors[0]
            assert len(got) == 6 and all(text == expected[p] for p, text in got), (got, expected)
            print("outcomes", {"ok": len(got)})
    """)
    assert outcomes_of(out) == {"ok": 6}


def test_contexts_with_polling_pools_decode_in_turn_and_at_once():
    """Each context's pool of 2 polling workers is paused when another context's pass starts
    (context/thread_pool.h). Passes in turn and from several threads at once (where a pause at the
    wrong moment would strand a graph: the timeout) all give the lone decode's logits."""
    out = run_script("""
        with pydeltamem.Model(MODEL, n_ctx=128, n_threads=2, poll=50) as m:
            prompts = [m.tokenize(p, add_special=True) for p in ("The capital of France is", "Water boils at", "Once upon")]
            expected = []
            for p in prompts:
                with m.context() as c:
                    expected.append(np.array(c.decode(p)))
            ctxs = [m.context() for _ in prompts]
            def decode_all(ctx, p, rounds):
                for _ in range(rounds):
                    ctx.reset()
                    got = np.array(ctx.decode(p))
                    assert np.array_equal(got, expected[prompts.index(p)])
                    outcomes["ok"] += 1
            for _ in range(4):   # in turn, one thread
                for ctx, p in zip(ctxs, prompts):
                    decode_all(ctx, p, 1)
            threads = [in_thread(lambda ctx=ctx, p=p: decode_all(ctx, p, 20)) for ctx, p in zip(ctxs, prompts)]
            for t, errors in threads:
                t.join()
                if errors:
                    raise errors[0]
            for ctx in ctxs:
                ctx.close()
        print("outcomes", dict(outcomes))
    """, timeout=120)
    assert outcomes_of(out) == {"ok": 4 * 3 + 20 * 3}


def test_calls_from_a_generation_callback_into_its_own_objects_raise():
    """A callback that decodes into, samples with or closes the context or sampler its generation
    holds would wait for itself: it gets a ValueError instead, which the generation re-raises."""
    out = run_script("""
        with pydeltamem.Model(MODEL, **FAST) as m:
            ctx = m.context(n_ctx=128)
            sampler = _core.Sampler(temperature=0)
            prompt = m.tokenize("The capital of France is")
            calls = {"decode": lambda: ctx._native.decode([1], _core.LOGITS_LAST),
                     "close": ctx._native.close,
                     "sample": lambda: sampler.sample(np.zeros(m.n_vocab, np.float32)),
                     "close sampler": sampler.close}
            for name, call in calls.items():
                def on_piece(piece, call=call):
                    call()
                try:
                    _core.generate(ctx._native, sampler, prompt, 8, [], [], on_piece)
                    raise AssertionError(name + " from the callback did not raise")
                except ValueError as e:
                    assert "in use by this thread" in str(e) or "from a call on it" in str(e), (name, e)
                    outcomes[name] += 1
                ctx.reset()
            tokens, text, _ = _core.generate(ctx._native, sampler, prompt, 4, [], [])   # both still usable
            assert len(tokens) == 4
            print("outcomes", dict(outcomes))
    """)
    assert outcomes_of(out) == {"decode": 1, "close": 1, "sample": 1, "close sampler": 1}


def test_sampler_close_waits_for_the_generation_using_it():
    out = run_script("""
        with pydeltamem.Model(MODEL, **FAST) as m:
            prompt = m.tokenize("Once upon a time")
            ctx = m.context(n_ctx=256)
            expected = _core.generate(ctx._native, _core.Sampler(temperature=0), prompt, 24, [], [])[0]
            ctx.reset()
            sampler = _core.Sampler(temperature=0)
            first_piece = threading.Event()
            result = []
            def generate():
                result.append(_core.generate(ctx._native, sampler, prompt, 24, [], [], lambda p: first_piece.set()))
            t, errors = in_thread(generate)
            first_piece.wait()
            sampler.close()   # waits until the generation is done with it
            t.join()
            if errors:
                raise errors[0]
            assert result[0][0] == expected, (result, expected)   # unharmed by the close
            outcome(lambda: sampler.sample(np.zeros(m.n_vocab, np.float32)))
            print("outcomes", dict(outcomes))
    """)
    assert outcomes_of(out) == {"closed": 1}


@pytest.mark.parametrize("ending", ["return", "sys.exit", "exception"])
def test_interpreter_exit_with_a_stream_in_flight(ending):
    """A script that ends while a stream's worker thread is generating exits normally (no abort
    from a thread torn down inside native code, no hang waiting for it)."""
    end = {"return": "pass", "sys.exit": "sys.exit(0)", "exception": "raise SystemExit(0)"}[ending]
    run_script(f"""
        m = pydeltamem.Model(MODEL, n_ctx=512, **FAST)
        g = m("Once upon a time", stream=True, max_tokens=300, logit_bias=no_end(m))
        next(g)
        {end}
    """, timeout=120)
