"""`deltamem bench`: a llama-bench-style benchmark of the engine, with and without δ-mem, against llama.cpp.

    deltamem bench [--model PATH|NAME ...] [--threads 1,2] [--runs 5] [--pp 512] [--tg 128]
                   [--no-llamacpp] [--llamacpp-python PYTHON[=LABEL] ...] [--json PATH]

The harness lives in the repository's `bench/` folder (bench/bench.py, bench/llamacpp_worker.py,
bench/make_models.py). It is found as `pydeltamem._bench` when the wheel maps it there
(pyproject: `"pydeltamem/_bench" = "bench"`), else next to this package in a source checkout.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

_PACKAGE = "pydeltamem._bench"


def harness():
    """The bench/bench.py module (imported as pydeltamem._bench.bench)."""
    try:
        return importlib.import_module(_PACKAGE + ".bench")
    except ImportError:
        pass
    folder = Path(__file__).resolve().parent.parent / "bench"
    init = folder / "__init__.py"
    if not init.is_file():
        raise RuntimeError("the benchmark harness (bench/) is not installed: run `deltamem bench` from a source "
                           "checkout of pydeltamem")
    spec = importlib.util.spec_from_file_location(_PACKAGE, init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = module
    spec.loader.exec_module(module)
    return importlib.import_module(_PACKAGE + ".bench")


def _run_cli(args) -> int:
    return harness().run_cli(args)


def register_cli(subparsers):
    parser = subparsers.add_parser(
        "bench",
        help="benchmark pp/tg speed with and without δ-mem, against llama.cpp",
        description="llama-bench-style benchmark: pp (prompt tokens/s, one decode) and tg (generated tokens/s, "
                    "one token per decode); each run in a fresh process, contenders alternated run by run; "
                    "median of runs and medians of per-run ratios.",
    )
    try:
        harness().add_arguments(parser)
    except RuntimeError as e:
        message = str(e)

        def unavailable(args):
            raise RuntimeError(message)

        parser.set_defaults(func=unavailable)
        return parser
    parser.set_defaults(func=_run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .cli import main as cli_main

    return cli_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
