"""The cost of one batched decode step: N contexts one token each (decode_batch) against one context
decoding N tokens in one pass and against one single-token decode, all at a fixed n_past (each pass
is undone with truncate), medians of many passes. Only the public API, so that any install of
pydeltamem runs it; run it with two installs' interpreters turn by turn to compare them:

    python bench/batch_step.py --n 8 --n-past 300 [--model GGUF] [--adapter] [--passes 40]

It prints one JSON line: {"batched_ms", "one_context_ms", "one_token_ms", ...}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import pydeltamem
from pydeltamem.defaults import default_model_path


def median_ms(step, undo, passes: int) -> float:
    times = []
    for _ in range(passes):
        undo()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="contexts in the batch (default 8)")
    parser.add_argument("--n-past", type=int, default=300, help="tokens each context holds (default 300)")
    parser.add_argument("--model", default=None, help="GGUF (default: the embedded model)")
    parser.add_argument("--adapter", default=None, help="a δ-mem adapter GGUF")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=40)
    a = parser.parse_args()
    with pydeltamem.Model(a.model or default_model_path(), n_threads=a.threads, adapter=a.adapter) as m:
        ctxs = [m.context(n_ctx=a.n_past + a.n + 8) for _ in range(a.n)]
        prompt = (m.tokenize("Once upon a time, " * (a.n_past // 4 + 1), add_special=True) * 2)[:a.n_past]
        pydeltamem.decode_batch(ctxs, [prompt] * a.n, logits="none")

        def undo():
            for c in ctxs:
                c.truncate(a.n_past)

        first = ctxs[0]
        out = {"n": a.n, "n_past": a.n_past, "adapter": a.adapter is not None,
               "batched_ms": median_ms(lambda: pydeltamem.decode_batch(ctxs, [[1]] * a.n), undo, a.passes),
               "one_context_ms": median_ms(lambda: first.decode([1] * a.n, logits="all"), undo, a.passes),
               "one_token_ms": median_ms(lambda: first.decode([1]), undo, a.passes)}
        for c in ctxs:
            c.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
