"""One run of llama.cpp's own multi-sequence decoding (llama-cpp-python's low-level llama_batch API,
several seq_ids in one batch), in llama-cpp-python's venv and process: N sequences each prefill
their prompt, then generate in steps of one token per sequence, all N in one llama_decode.

    python llamacpp_parallel_worker.py < '{"model": PATH, "threads": 2, "n_seqs": 4,
                                           "prompts": [[...], ...], "tg_tokens": [[...], ...]}'

Prints one JSON line: tg_s (the generation steps), the aggregate tg_tps, and peak RSS. Standard
library and llama_cpp only (it must not import pydeltamem).
"""
from __future__ import annotations

import json
import sys
import time


def _fn(module, *names):
    for n in names:
        f = getattr(module, n, None)
        if f is not None:
            return f
    raise AttributeError(f"llama_cpp has none of {names}")


def run(spec: dict) -> dict:
    import llama_cpp as L

    n_seqs = spec["n_seqs"]
    prompts, tg = spec["prompts"], spec["tg_tokens"]
    per_seq = max(len(p) for p in prompts) + max(len(t) for t in tg) + 8
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = _fn(L, "llama_model_load_from_file", "llama_load_model_from_file")(spec["model"].encode(), mparams)
    cparams = L.llama_context_default_params()
    cparams.n_ctx = per_seq * n_seqs
    cparams.n_batch = max(512, n_seqs)
    cparams.n_ubatch = max(512, n_seqs)
    cparams.n_seq_max = n_seqs
    cparams.n_threads = spec["threads"]
    cparams.n_threads_batch = spec["threads"]
    ctx = _fn(L, "llama_init_from_model", "llama_new_context_with_model")(model, cparams)
    batch = L.llama_batch_init(max(512, n_seqs), 0, n_seqs)

    def decode(items):   # items: (token, pos, seq, want_logits)
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if logits else 0
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    for s, p in enumerate(prompts):   # prefill, one sequence at a time (not timed)
        decode([(t, i, s, i == len(p) - 1) for i, t in enumerate(p)])
    t0 = time.perf_counter()
    for step in range(len(tg[0])):
        decode([(tg[s][step], len(prompts[s]) + step, s, True) for s in range(n_seqs)])
    tg_s = time.perf_counter() - t0
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    _fn(L, "llama_model_free", "llama_free_model")(model)
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return {"tg_s": tg_s, "tg_tps": n_seqs * len(tg[0]) / tg_s, "maxrss_kb": rss}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    sys.stdout.write("\n" + json.dumps(run(spec)) + "\n")
