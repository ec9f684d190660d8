"""`deltamem bench --parallel 1,2,4,8`: aggregate decode throughput of N concurrent sequences, each
its own context (prompt `--pp` tokens, then `--tg` tokens generated one step at a time, all N in
one batched decode), with and without a δ-mem adapter, against llama.cpp's own multi-sequence
decoding (llama_batch with N seq_ids, llamacpp_parallel_worker.py) on the same GGUF. Every run is a
fresh process; the N values and contenders take turns within each run; medians over runs.
"""
from __future__ import annotations

import statistics
import time

OURS, DMEM = "ours", "ours+dmem"


def ours_parallel_worker(spec: dict) -> dict:
    """N contexts of one model: prefill each prompt (not timed), then len(tg) batched steps (N=1:
    the single-sequence decode, what one user gets)."""
    import pydeltamem

    model = pydeltamem.Model(spec["model"], n_ctx=len(spec["prompts"][0]) + len(spec["tg_tokens"][0]) + 8,
                             n_threads=spec["threads"], adapter=spec.get("adapter"))
    ctxs = [model.context() for _ in spec["prompts"]]
    pydeltamem.decode_batch(ctxs, spec["prompts"], "last")
    steps = list(zip(*spec["tg_tokens"]))   # step t: every sequence's token t
    if len(ctxs) == 1:
        ctx = ctxs[0]
        t = time.perf_counter()
        for (tok,) in steps:
            ctx.decode([tok], logits="last")
    else:
        t = time.perf_counter()
        for toks in steps:
            pydeltamem.decode_batch(ctxs, [[x] for x in toks], "last")
    tg_s = time.perf_counter() - t
    out = {"tg_s": tg_s, "tg_tps": len(ctxs) * len(steps) / tg_s, "maxrss_kb": spec["peak_rss_kb"]()}
    for c in ctxs:
        c.close()
    model.close()
    return out


def run_parallel(models: list[str], ns: list[int], threads: int, runs: int, pp: int, tg: int,
                 llamacpp: list[tuple[str, str]], dmem: bool, timeout: float, log, seed: int = 1234,
                 others: list[tuple[str, str]] = ()) -> dict:
    """others: (label, python) of other installs of this engine (--ours-python), run bare and with δ-mem."""
    from . import make_models
    from .bench import LLAMACPP_PARALLEL_WORKER, bench_tokens, gguf_n_vocab, resolve_model, spawn

    report: dict = {"params": {"parallel": ns, "threads": threads, "runs": runs, "pp": pp, "tg": tg,
                               "llamacpp": [lbl for lbl, _ in llamacpp]}, "results": []}
    for model_name in models:
        label, path = resolve_model(model_name, log)
        adapter = str(make_models.adapter_for(path)) if dmem else None
        n_vocab = gguf_n_vocab(path)
        contenders = [{"name": OURS, "kind": "ours"}]
        if adapter:
            contenders.append({"name": DMEM, "kind": "ours", "spec": {"adapter": adapter}})
        for lbl, py in others:
            contenders.append({"name": lbl, "kind": "ours", "python": py})
            if adapter:
                contenders.append({"name": f"{lbl}+dmem", "kind": "ours", "python": py, "spec": {"adapter": adapter}})
        for lbl, py in llamacpp:
            contenders.append({"name": lbl, "kind": "llamacpp", "python": py, "worker": LLAMACPP_PARALLEL_WORKER})
        specs = {n: {"model": path, "threads": threads, "n_seqs": n,
                     "prompts": [bench_tokens(n_vocab, pp, seed + 2 * s) for s in range(n)],
                     "tg_tokens": [bench_tokens(n_vocab, tg, seed + 2 * s + 1) for s in range(n)]} for n in ns}
        tps = {n: {c["name"]: [] for c in contenders} for n in ns}
        # Every run times every N and contender, in turns that rotate from run to run, so that the
        # ratios (N=8 against N=1 too) are measured side by side on a noisy machine.
        for i in range(runs):
            for n in ns[i % len(ns):] + ns[:i % len(ns)]:
                k = i % len(contenders)
                for c in contenders[k:] + contenders[:k]:
                    res = spawn(c, specs[n], timeout)
                    if "error" in res:
                        log(f"[bench] {label} N={n} {c['name']}: ERROR {res['error']}")
                        continue
                    tps[n][c["name"]].append(res["tg_tps"])
                    log(f"[bench] {label} N={n} run {i + 1}/{runs} {c['name']:>12}: tg{tg} x{n} {res['tg_tps']:8.1f} t/s")
        for n in ns:
            report["results"].append({"model": label, "n": n, "adapter": adapter,
                                      "tg_tps_median": {k: statistics.median(v) if v else None for k, v in tps[n].items()},
                                      "tg_tps_runs": {k: [round(x, 2) for x in v] for k, v in tps[n].items()}})
    return report


def format_parallel_table(report: dict) -> str:
    p = report["params"]
    names: list[str] = []
    for res in report["results"]:
        names += [k for k in res["tg_tps_median"] if k not in names]
    llamas = [k for k in p.get("llamacpp", []) if k in names] or ["llama.cpp"]
    lines = [f"Aggregate tg t/s of N sequences (prompt {p['pp']}, {p['tg']} generated each, {p['threads']} threads, "
             f"medians of {p['runs']} runs):", "",
             "| model | N | " + " | ".join(names) + " | ours+dmem / ours | "
             + " | ".join(f"ours+dmem / {k}" for k in llamas) + " | ours+dmem vs N=1 |",
             "|---|---:|" + "---:|" * (len(names) + len(llamas) + 2)]
    base: dict[str, float] = {}

    def ratio(a, b):
        return f"{a / b:.3f}" if a and b else "-"
    for res in report["results"]:
        m = res["tg_tps_median"]
        if res["n"] == 1:
            base[res["model"]] = m.get(DMEM) or m.get(OURS)
        mine = m.get(DMEM) or m.get(OURS)
        lines.append(f"| {res['model']} | {res['n']} | " + " | ".join(f"{m.get(k):.1f}" if m.get(k) else "-" for k in names)
                     + f" | {ratio(m.get(DMEM), m.get(OURS))} | " + " | ".join(ratio(mine, m.get(k)) for k in llamas)
                     + f" | {ratio(mine, base.get(res['model']))} |")
    return "\n".join(lines)
