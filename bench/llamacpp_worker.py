"""One benchmark run of llama.cpp through llama-cpp-python, in its own process.

Run by llama-cpp-python's interpreter (a separate venv: llama.cpp ships its own libggml, which
cannot share a process with pydeltamem's), so this file needs only the standard library and
llama_cpp — it must not import anything from pydeltamem.

    python llamacpp_worker.py '{"model": PATH, "threads": 2, "n_ctx": 640, "n_batch": 512,
                                "pp_tokens": [...], "tg_tokens": [...], "warmup": true}'

Prints one JSON line: pp/tg tokens per second, the per-token decode times of tg, peak RSS, the
llama.cpp system info. Measured like llama-bench: warm-up (one pp of the full prompt and one tg
token), then pp (one eval of all prompt tokens from an empty cache) and tg (one eval per token,
from an empty cache).
"""
from __future__ import annotations

import json
import sys
import time


def peak_rss_kb() -> int:
    """This process's peak resident set size in KiB, from VmHWM: it starts afresh at exec, whereas
    getrusage's ru_maxrss keeps the peak of the parent the worker was forked from (the harness)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def run(spec: dict) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=spec["n_ctx"],
        n_batch=spec.get("n_batch", 512),
        n_ubatch=spec.get("n_batch", 512),
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    pp_tokens, tg_tokens = spec["pp_tokens"], spec["tg_tokens"]

    if spec.get("warmup", True):
        if pp_tokens:
            llm.reset()
            llm.eval(pp_tokens)
        if tg_tokens:
            llm.reset()
            llm.eval(tg_tokens[:1])

    out: dict = {"load_s": load_s}
    if pp_tokens:
        llm.reset()                       # eval() then drops the cache past n_tokens = 0
        t = time.perf_counter()
        llm.eval(pp_tokens)
        out["pp_s"] = time.perf_counter() - t
        out["pp_tps"] = len(pp_tokens) / out["pp_s"]
    if tg_tokens:
        llm.reset()
        times = []
        t = time.perf_counter()
        for tok in tg_tokens:
            t1 = time.perf_counter()
            llm.eval([tok])
            times.append(time.perf_counter() - t1)
        out["tg_s"] = time.perf_counter() - t
        out["tg_tps"] = len(tg_tokens) / out["tg_s"]
        out["tg_token_ms"] = [round(x * 1e3, 4) for x in times]
    out["maxrss_kb"] = peak_rss_kb()
    out["version"] = getattr(llama_cpp, "__version__", "?")
    try:
        out["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception:  # pragma: no cover - older bindings
        pass
    return out


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1] if len(argv) > 1 else sys.stdin.read())
    result = run(spec)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
