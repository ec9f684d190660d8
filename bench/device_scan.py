"""The two δ-mem formulations side by side on one backend: the fused CPU ops (what CPU layers run)
and the device scan (ggml_gated_delta_net, what offloaded layers run), on the CPU backend or on an
RPC server, with the bare model as the baseline. Contexts of one process take turns, pass by pass,
so machine noise hits all of them alike; medians of per-pass times.

    python -m pydeltamem.bench.device_scan [--model smollm2|PATH] [--threads 2] [--pp 512] [--tg 64] [--rounds 5]
                                [--rpc HOST:PORT]      (with --rpc: every layer on that server)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> None:
    import pydeltamem
    from pydeltamem.bench.bench import bench_tokens, gguf_n_vocab, resolve_model   # the installed bench package
    from pydeltamem.bench.make_models import adapter_for

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rpc", default=None, help="offload every layer to this rpc-server")
    args = ap.parse_args()

    _, path = resolve_model(args.model, lambda m: print(m, file=sys.stderr))
    adapter = str(adapter_for(path))
    devices = {"n_gpu_layers": -1, "rpc_servers": args.rpc} if args.rpc else {}
    n_ctx = args.pp + args.tg
    bare = pydeltamem.Model(path, n_ctx=n_ctx, n_threads=args.threads, poll=0, **devices)
    dmem = pydeltamem.Model(path, n_ctx=n_ctx, n_threads=args.threads, poll=0, adapter=adapter, **devices)
    contexts = {"bare": bare.context(), "fused": dmem.context(dmem_fused=True), "device scan": dmem.context(dmem_fused=False)}
    vocab = gguf_n_vocab(path)
    pp, tg = bench_tokens(vocab, args.pp, 1), bench_tokens(vocab, args.tg, 2)
    times: dict[str, dict[str, list[float]]] = {name: {"pp": [], "tg": []} for name in contexts}
    for r in range(args.rounds + 1):   # round 0 warms up
        for name, ctx in contexts.items():
            ctx.reset()
            ctx.reset_memory() if name != "bare" else None
            t = time.perf_counter()
            ctx.decode(pp, logits="last")
            if r:
                times[name]["pp"].append(time.perf_counter() - t)
        for tok in tg:
            for name, ctx in contexts.items():
                t = time.perf_counter()
                ctx.decode([tok], logits="last")
                if r:
                    times[name]["tg"].append(time.perf_counter() - t)
    report = {"model": args.model, "threads": args.threads, "pp": args.pp, "tg": args.tg, "rounds": args.rounds,
              "rpc": args.rpc, "splits": {name: ctx.n_splits for name, ctx in contexts.items()}, "results": {}}
    base_pp, base_tg = (statistics.median(times["bare"][k]) for k in ("pp", "tg"))
    print(f"| {args.model} ({'rpc ' + args.rpc if args.rpc else 'CPU'}, {args.threads} threads) | pp{args.pp} t/s | "
          f"tg t/s (median token) | pp vs bare | tg vs bare |\n|---|---:|---:|---:|---:|")
    for name in contexts:
        p, t = statistics.median(times[name]["pp"]), statistics.median(times[name]["tg"])
        report["results"][name] = {"pp_tps": args.pp / p, "tg_tps": 1 / t}
        print(f"| {name} | {args.pp / p:.1f} | {1 / t:.2f} | {base_pp / p:.3f} | {base_tg / t:.3f} |")
    print(json.dumps(report), file=sys.stderr)


if __name__ == "__main__":
    main()
