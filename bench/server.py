"""`deltamem bench --server`: chat serving over loopback, our `deltamem serve` against llama-cpp-python's
server (`python -m llama_cpp.server`) on the same GGUF under the same load (server_load.py: N clients,
T streamed turns each, in their own sessions).

Contenders: `ours+dmem` (serve with the random δ-mem adapter of make_models.adapter_for, sessions
on), `ours` (no adapter) and each llama-cpp-python venv, which serves one request at a time (its
server holds a lock around the model). Every measure starts a fresh server process (a fresh sessions
database, --parallel N for ours), waits until it answers, warms it up, runs the load and stops it;
contenders take turns round by round. Reported: medians over rounds of requests/s, aggregate
completion tokens/s, time to first token p50/p95 and latency p50, and medians of per-round ratios.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from .bench import DMEM, OURS, _fmt, _median, machine_info, resolve_model
from .server_load import HOST, end_token_bias, run_load, summarize_load, token_counter

READY_TIMEOUT_S = 300.0   # a server's start: interpreter, imports, model load
STOP_TIMEOUT_S = 10.0
SERVER_N_CTX = 2048       # both servers' context size unless --n-ctx: a conversation of T turns of M tokens fits
# The measures compared: column title and format.
METRICS = {"requests_per_s": ("req/s", ".2f"), "tokens_per_s": ("tokens/s", ".1f"),
           "ttft_p50_ms": ("TTFT p50 ms", ".0f"), "ttft_p95_ms": ("TTFT p95 ms", ".0f"),
           "latency_p50_ms": ("latency p50 ms", ".0f")}


class ServerError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- llama-cpp-python's server

def _llamacpp_server_requirements(python: str) -> list[str]:
    """The requirements of llama-cpp-python's `server` extra, from its installed metadata."""
    code = "import importlib.metadata as m, json; print(json.dumps(m.requires('llama-cpp-python') or []))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return [req.split(";")[0].strip() for req in json.loads(out) if 'extra == "server"' in req]


def ensure_llamacpp_server(python: str, log) -> None:
    """Install the server's dependencies into a llama-cpp-python venv whose server cannot be imported.
    Not `pip install 'llama-cpp-python[server]'`: pip would build llama.cpp again (~10 min), with its
    default flags over the venv's chosen build."""
    if subprocess.run([python, "-c", "import llama_cpp.server.app"], capture_output=True).returncode == 0:
        return
    reqs = _llamacpp_server_requirements(python)
    log(f"[bench] installing llama-cpp-python's server dependencies into {python}: {' '.join(reqs)}")
    subprocess.run([python, "-m", "pip", "install", *reqs], check=True)


# ----------------------------------------------------------------------------- server processes

def free_port() -> int:
    """A loopback port no one listens on now (the OS picks it for a socket bound to port 0)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, bytes] | None:
    """(status, body) of GET `path`; None while nothing listens."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _failed(body: bytes) -> bool:
    """Whether a not-ready answer says the server gave up: ours keeps running after a failed load,
    answering /health 503 {"status": "error", ...}."""
    try:
        return json.loads(body).get("status") == "error"
    except (ValueError, AttributeError):
        return False


def _tail(log_path: Path, lines: int = 12) -> str:
    return " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-lines:])


def _wait_ready(proc: subprocess.Popen, port: int, path: str, log_path: Path) -> float:
    """Seconds until GET `path` answers 200; ServerError if the process exits or time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < READY_TIMEOUT_S:
        if proc.poll() is not None:
            raise ServerError(f"server exited with {proc.returncode}: {_tail(log_path)}")
        answer = _get(port, path)
        if answer and answer[0] == 200:
            return time.monotonic() - t0
        if answer and _failed(answer[1]):
            raise ServerError(f"server failed: {answer[1].decode(errors='replace')} | {_tail(log_path)}")
        time.sleep(0.2)
    raise ServerError(f"server not ready after {READY_TIMEOUT_S:.0f} s: {_tail(log_path)}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (a graceful shutdown), SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serving(cmd: list[str], port: int, ready_path: str, env: dict, workdir: Path) -> Iterator[float]:
    """A server process running `cmd` in `workdir` (its output in workdir/server.log), ready; yields
    the seconds it took to become ready; stopped on exit."""
    log_path = workdir / "server.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        yield _wait_ready(proc, port, ready_path, log_path)
    finally:
        _stop(proc)


# ----------------------------------------------------------------------------- contenders

def ours_contender(name: str, model: str, adapter: str | None, threads: int, n_ctx: int) -> dict:
    def command(port: int, clients: int, workdir: Path) -> list[str]:
        cmd = [sys.executable, "-m", "pydeltamem.cli", "serve", "-m", model, "--host", HOST, "--port", str(port),
               "--parallel", str(clients), "--sessions", str(workdir / "sessions.db"), "-t", str(threads),
               "--n-ctx", str(n_ctx)]
        return cmd + (["--adapter", adapter] if adapter else [])

    return {"name": name, "command": command, "ready": "/health", "env": dict(os.environ)}


def llamacpp_contender(name: str, python: str, model: str, threads: int, n_ctx: int) -> dict:
    def command(port: int, clients: int, workdir: Path) -> list[str]:
        # --interrupt_requests False: by default its server ends a streamed reply early ([DONE]) as soon
        # as another request waits for the model, so queued clients would get cut-short replies.
        return [python, "-m", "llama_cpp.server", "--model", model, "--host", HOST, "--port", str(port),
                "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
                "--interrupt_requests", "False"]

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # its own venv's packages only
    # No /health there; it loads the model before it listens, so any route answering means ready.
    return {"name": name, "command": command, "ready": "/v1/models", "env": env}


def measure(contender: dict, clients: int, turns: int, max_tokens: int, timeout: float,
            count_tokens: Callable[[str], int], logit_bias: dict[str, float] | None = None) -> dict:
    """One fresh server of `contender` under the load: summarize_load's figures and ready_s, or
    {"error": ...} with the tail of the server's log."""
    with tempfile.TemporaryDirectory(prefix="deltamem-bench-server-") as tmp:
        workdir, port = Path(tmp), free_port()
        try:
            with serving(contender["command"](port, clients, workdir), port, contender["ready"], contender["env"],
                         workdir) as ready_s:
                replies = run_load(port, clients, turns, max_tokens, timeout, logit_bias=logit_bias)
        except ServerError as e:
            return {"error": str(e)}
        summary = summarize_load(replies, count_tokens)
        if summary["errors"]:
            return {"error": f"{summary['errors'][0]} (server log: {_tail(workdir / 'server.log')})"}
    return {**summary, "ready_s": ready_s}


# ----------------------------------------------------------------------------- the bench

def _ratio_pairs(names: list[str]) -> list[tuple[str, str]]:
    """δ-mem's cost (ours+dmem / ours) and each of ours against each llama.cpp."""
    mine = [n for n in (DMEM, OURS) if n in names]
    pairs = [(DMEM, OURS)] if len(mine) == 2 else []
    return pairs + [(a, b) for a in mine for b in names if b not in mine]


def summarize_rounds(runs: dict[str, list[dict]]) -> dict:
    """Per contender the median of each metric over its good rounds; per pair the median of the
    per-round ratios (not the ratio of the medians)."""
    out: dict = {"contenders": {}, "ratios": {}}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        out["contenders"][name] = {"rounds_ok": len(ok), "errors": [r["error"] for r in rs if "error" in r],
                                   **{m: _median([r[m] for r in ok]) for m in (*METRICS, "tokens_per_reply")},
                                   "runs": ok}
    for a, b in _ratio_pairs(list(runs)):
        pairs = [(x, y) for x, y in zip(runs[a], runs[b]) if "error" not in x and "error" not in y]
        out["ratios"][f"{a} / {b}"] = {m: _median([x[m] / y[m] for x, y in pairs if x[m] and y[m]]) for m in METRICS}
    return out


def run_server_bench(models: list[str], clients: list[int], threads: int, rounds: int, turns: int, max_tokens: int,
                     llamacpp: list[tuple[str, str]], dmem: bool, n_ctx: int | None, timeout: float, log,
                     fixed_length: bool = True) -> dict:
    """fixed_length: every reply max_tokens long (end_token_bias), so that tokens/s compares the
    servers on the same work; False lets each reply end where its model (and adapter) ends it."""
    from . import make_models

    n_ctx = n_ctx or SERVER_N_CTX
    for _, python in llamacpp:
        ensure_llamacpp_server(python, log)
    report: dict = {"machine": machine_info(), "params": {
        "clients": clients, "threads": threads, "rounds": rounds, "turns": turns, "max_tokens": max_tokens,
        "fixed_length": fixed_length, "n_ctx": n_ctx, "llamacpp": [{"label": lbl, "python": py} for lbl, py in llamacpp]}, "results": []}
    t_start = time.time()
    for model_name in models:
        label, path = resolve_model(model_name, log)
        adapter = str(make_models.adapter_for(path)) if dmem else None
        count_tokens = token_counter(path)
        bias = end_token_bias(path) if fixed_length else None
        contenders = ([ours_contender(DMEM, path, adapter, threads, n_ctx)] if adapter else []) + \
            [ours_contender(OURS, path, None, threads, n_ctx)] + \
            [llamacpp_contender(lbl, py, path, threads, n_ctx) for lbl, py in llamacpp]
        for n in clients:
            runs: dict[str, list[dict]] = {c["name"]: [] for c in contenders}
            for i in range(rounds):
                k = i % len(contenders)
                for c in contenders[k:] + contenders[:k]:
                    res = measure(c, n, turns, max_tokens, timeout, count_tokens, bias)
                    runs[c["name"]].append(res)
                    log(f"[bench] {label} clients={n} round {i + 1}/{rounds} {c['name']:>14}: " +
                        (f"ERROR {res['error']}" if "error" in res else
                         f"{res['requests_per_s']:.2f} req/s  {res['tokens_per_s']:.1f} tokens/s  "
                         f"TTFT p50 {_fmt(res['ttft_p50_ms'], '.0f')} ms"))
            report["results"].append({"model": label, "model_path": path, "adapter": adapter, "clients": n,
                                      **summarize_rounds(runs)})
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["wall_s"] = time.time() - t_start
    return report


def format_server_table(report: dict) -> str:
    p = report["params"]
    titles = " | ".join(title for title, _ in METRICS.values())
    length = (f"{p['max_tokens']} tokens a reply, the end tokens banned" if p.get("fixed_length")
              else f"at most {p['max_tokens']} tokens a reply")
    lines = [f"Chat serving over loopback: N clients at once, {p['turns']} streamed turns each (temperature 0, "
             f"{length}), {p['threads']} threads, medians of {p['rounds']} rounds:", "",
             f"| model | clients | server | {titles} | tokens/reply | rounds |",
             "|---|---:|---|" + "---:|" * (len(METRICS) + 2)]
    for res in report["results"]:
        for name, c in res["contenders"].items():
            lines.append(f"| {res['model']} | {res['clients']} | {name} | " +
                         " | ".join(_fmt(c[m], spec) for m, (_, spec) in METRICS.items()) +
                         f" | {_fmt(c['tokens_per_reply'])} | {c['rounds_ok']} |")
    lines += ["", "Medians of per-round ratios (above 1: more for req/s and tokens/s, slower for times):", "",
              f"| model | clients | ratio | {titles.replace(' ms', '')} |",
              "|---|---:|---|" + "---:|" * len(METRICS)]
    for res in report["results"]:
        for pair, vals in res["ratios"].items():
            lines.append(f"| {res['model']} | {res['clients']} | {pair} | " +
                         " | ".join(_fmt(vals[m], ".3f") for m in METRICS) + " |")
    return "\n".join(lines)
