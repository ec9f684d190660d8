"""Device options of the commands that load a model (-ngl, --rpc, --tensor-split, --main-gpu), and
`deltamem rpc-server`, which serves this machine's devices to engines on other machines."""
from __future__ import annotations

import argparse
import signal
import sys

from . import _core


def add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers to offload to GPUs / RPC servers, the last first; -1: all and the output (default 0)")
    p.add_argument("--rpc", metavar="HOST:PORT[,...]", default=None,
                   help="devices of `deltamem rpc-server`s to offload to (needs a build from scripts/build_ggml.sh --rpc)")
    p.add_argument("--tensor-split", metavar="W[,W...]", default=None,
                   help="shares of the offloaded layers per offload device (default: all on --main-gpu)")
    p.add_argument("--main-gpu", type=int, default=0, metavar="I",
                   help="the offload device without --tensor-split (default 0: the first GPU, else the first --rpc server)")


def device_kwargs(args: argparse.Namespace) -> dict:
    """Model() keyword arguments from the options add_device_options added."""
    split = None
    if args.tensor_split:
        try:
            split = [float(x) for x in args.tensor_split.split(",")]
        except ValueError:
            raise ValueError(f"--tensor-split must be comma-separated numbers, got {args.tensor_split!r}") from None
    return {"n_gpu_layers": args.n_gpu_layers, "main_gpu": args.main_gpu, "tensor_split": split,
            "rpc_servers": args.rpc}


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "rpc-server", help="serve this machine's devices to other machines (ggml RPC; no authentication)",
        description="Serves this machine's GPUs (or, without any, its CPU) over ggml's RPC protocol, so that "
                    "`deltamem generate --rpc HOST:PORT -ngl -1` (or Model(..., rpc_servers=...)) elsewhere can put "
                    "layers here. The protocol has NO authentication and no encryption: keep it on loopback "
                    "(the default) or a trusted private network.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=50052, help="port (default 50052)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="CPU threads for the CPU device (default: the hardware threads this process may use)")
    p.set_defaults(func=_run_rpc_server)


def _run_rpc_server(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    from .model import _hardware_threads

    threads = _hardware_threads() if args.threads is None else args.threads
    if threads <= 0:
        raise ValueError(f"--threads must be positive, got {threads}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"deltamem rpc-server: warning: listening on {args.host}: anyone who reaches this port can use "
              "this machine's devices and memory (ggml RPC has no authentication)", file=sys.stderr)
    endpoint = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    print(f"deltamem rpc-server: serving {', '.join(d['name'] for d in _served_devices())} on {endpoint}",
          file=sys.stderr, flush=True)
    # The server blocks in native code; the default signal actions end the process at once.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _core.rpc_serve(endpoint, threads)
    return 0


def _served_devices() -> list[dict]:
    devs = [d for d in _core.devices() if d["type"] in ("gpu", "igpu") and not d["name"].startswith("RPC")]
    return devs or [d for d in _core.devices() if d["type"] == "cpu"]
