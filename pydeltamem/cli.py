"""The `deltamem` command line: one subcommand a concern, each registered by its own module."""
from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    from . import bench, cli_devices, cli_text, quality, quantize
    from .convert import adapter, hf_to_gguf
    from .server import cli as server_cli

    parser = argparse.ArgumentParser(prog="deltamem", description="pydeltamem: local LLM inference with δ-mem")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_text.register_cli(sub)
    hf_to_gguf.register_cli(sub)
    adapter.register_cli(sub)
    quantize.register_cli(sub)
    quality.register_cli(sub)
    bench.register_cli(sub)
    cli_devices.register_cli(sub)
    server_cli.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"deltamem {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # Ctrl-C: stop quietly, with the conventional status
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
