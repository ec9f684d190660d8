"""The cost of one batched decode step: N contexts one token each (decode_batch) against one context
decoding N tokens in one pass and against one single-token decode, all at a fixed n_past (each pass
is undone with truncate), medians of many passes. With --adapter the same model is also loaded with
the adapter and both are timed pass by pass in turn, so the δ-mem overhead is a side-by-side ratio.
Only the public API, so that any install of pydeltamem runs it; run it with two installs'
interpreters turn by turn to compare them:

    python bench/batch_step.py --n 8 --n-past 300 [--model GGUF] [--adapter GGUF] [--passes 40]

It prints one JSON line: per setup ("bare", "dmem") {"batched_ms", "one_context_ms", "one_token_ms",
"batched_vs_one_token"} (aggregate tokens/s of the batch against one single-token decoder), and with
an adapter "dmem_overhead" (bare batched_ms / δ-mem batched_ms, 1 = free).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import pydeltamem
from pydeltamem.defaults import default_model_path


class Setup:
    """One model with N contexts holding n_past tokens, and the passes to time on it."""

    def __init__(self, path: str, adapter: str | None, a: argparse.Namespace):
        self.model = pydeltamem.Model(path, n_threads=a.threads, adapter=adapter)
        self.n_past = a.n_past
        self.ctxs = [self.model.context(n_ctx=a.n_past + a.n + 8) for _ in range(a.n)]
        prompt = (self.model.tokenize("Once upon a time, " * (a.n_past // 4 + 1), add_special=True) * 2)[:a.n_past]
        pydeltamem.decode_batch(self.ctxs, [prompt] * a.n, logits="none")
        first = self.ctxs[0]
        self.passes = {"batched_ms": lambda: pydeltamem.decode_batch(self.ctxs, [[1]] * a.n),
                       "one_context_ms": lambda: first.decode([1] * a.n, logits="all"),
                       "one_token_ms": lambda: first.decode([1])}
        self.times: dict[str, list[float]] = {k: [] for k in self.passes}

    def time_each_pass_once(self) -> None:
        for name, step in self.passes.items():
            for c in self.ctxs:
                c.truncate(self.n_past)
            t0 = time.perf_counter()
            step()
            self.times[name].append(1000 * (time.perf_counter() - t0))

    def medians(self, n: int) -> dict:
        out = {k: statistics.median(v) for k, v in self.times.items()}
        out["batched_vs_one_token"] = n * out["one_token_ms"] / out["batched_ms"]
        return out

    def close(self) -> None:
        for c in self.ctxs:
            c.close()
        self.model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="contexts in the batch (default 8)")
    parser.add_argument("--n-past", type=int, default=300, help="tokens each context holds (default 300)")
    parser.add_argument("--model", default=None, help="GGUF (default: the embedded model)")
    parser.add_argument("--adapter", default=None, help="a δ-mem adapter GGUF: also time the model with it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=40)
    a = parser.parse_args()
    path = a.model or default_model_path()
    setups = {"bare": Setup(path, None, a)}
    if a.adapter:
        setups["dmem"] = Setup(path, a.adapter, a)
    try:
        for _ in range(a.passes):   # in turns, so that the machine's drift falls on both alike
            for s in setups.values():
                s.time_each_pass_once()
        out: dict = {"n": a.n, "n_past": a.n_past, **{k: s.medians(a.n) for k, s in setups.items()}}
        if a.adapter:
            out["dmem_overhead"] = out["bare"]["batched_ms"] / out["dmem"]["batched_ms"]
    finally:
        for s in setups.values():
            s.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
