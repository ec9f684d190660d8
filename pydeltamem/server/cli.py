"""`deltamem serve`: the OpenAI-compatible server on this machine (needs `pip install 'pydeltamem[server]'`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def user_data_dir() -> Path:
    """Where the user's application data goes: XDG_DATA_HOME (or ~/.local/share) on Linux,
    ~/Library/Application Support on macOS, %LOCALAPPDATA% on Windows."""
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "pydeltamem"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "pydeltamem"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "pydeltamem"


def default_sessions_path(alias: str, adapter: str | None) -> Path:
    """One database per model and adapter: a session's memory only means something to its adapter."""
    name = alias if adapter is None else f"{alias}+{Path(adapter).stem}"
    return user_data_dir() / "sessions" / f"{name}.sqlite3"


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from ..cli_devices import add_device_options

    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server whose sessions keep their δ-mem memory",
                              description="Serves the model over HTTP with OpenAI's API (/v1/chat/completions, "
                              "/v1/completions, /v1/models), sessions that keep their memory in a SQLite file "
                              "(/v1/sessions), /health, /metrics, /tokenize and /detokenize. Needs "
                              "`pip install 'pydeltamem[server]'`.")
    p.add_argument("-m", "--model", metavar="MODEL",
                   help="GGUF path or REPO_ID:FILENAME_GLOB (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", metavar="ADAPTER", help="δ-mem adapter GGUF, or the REPO_ID of an official release")
    p.add_argument("--alias", metavar="NAME", help="the model's name in the API (default: the GGUF's file stem)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("DELTAMEM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(default $DELTAMEM_API_KEY; none: no key)")
    p.add_argument("--parallel", type=int, default=4, metavar="N", help="requests decoded together (default 4)")
    p.add_argument("--queue", type=int, default=64, metavar="N",
                   help="requests that may wait beyond --parallel; more get 429 (default 64)")
    p.add_argument("--sessions", metavar="PATH",
                   help="the sessions' SQLite file (default: sessions/MODEL[+ADAPTER].sqlite3 in the user's data "
                   f"folder, {user_data_dir()})")
    p.add_argument("-c", "--n-ctx", "--ctx-size", dest="n_ctx", type=int, default=4096, metavar="N",
                   help="context length of each session and request (default 4096)")
    p.add_argument("--cache-mib", type=int, default=2048, metavar="MIB",
                   help="memory for the KV caches of live sessions; beyond it idle sessions are evicted (default 2048)")
    p.add_argument("--max-body-kib", type=int, default=4096, metavar="KIB",
                   help="largest request body accepted (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="threads (default: physical cores)")
    add_device_options(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        from .app import create_app
    except ImportError as e:
        raise RuntimeError(f"the server needs its extra: pip install 'pydeltamem[server]' ({e})") from None
    from ..cli_devices import device_kwargs
    from ..cli_text import model_files
    from .engine import Engine, ServerConfig

    for name, value, low in (("--parallel", args.parallel, 1), ("--queue", args.queue, 0), ("--n-ctx", args.n_ctx, 16),
                             ("--cache-mib", args.cache_mib, 1), ("--max-body-kib", args.max_body_kib, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1 to 65535, got {args.port}")
    model_path, adapter = model_files(args.model, args.adapter)
    alias = args.alias or Path(model_path).stem
    sessions = args.sessions or default_sessions_path(alias, adapter)
    if args.host not in LOOPBACK:
        print(f"deltamem serve: warning: listening on {args.host}, reachable from other machines"
              + ("" if args.api_key else " with no --api-key: anyone who reaches it can use it"), file=sys.stderr)
    config = ServerConfig(model_path=model_path, adapter=adapter, alias=alias, sessions_path=os.fspath(sessions),
                          n_ctx=args.n_ctx, n_threads=args.threads, parallel=args.parallel, queue=args.queue,
                          cache_mib=args.cache_mib, max_body_bytes=args.max_body_kib << 10, api_key=args.api_key,
                          device_kwargs=device_kwargs(args))
    engine = Engine(config)
    print(f"deltamem serve: {alias} on http://{args.host}:{args.port} (sessions: {sessions})", file=sys.stderr,
          flush=True)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 1 if engine.load_error is not None else 0
