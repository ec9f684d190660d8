"""pydeltamem's llama-bench-style benchmark (issue 5): `deltamem bench`.

- `bench.py` — the harness: spawns one worker process per run and contender (our engine without
  and with a δ-mem adapter, llama.cpp through llama-cpp-python in its own venv), alternating the
  contenders run by run; prints a table and writes JSON.
- `llamacpp_worker.py` — a stand-alone script (stdlib + llama_cpp only) run by llama-cpp-python's
  interpreter; llama.cpp ships its own libggml, which cannot share a process with ours.
- `make_models.py` — the random δ-mem adapter (release configuration) for any model GGUF, and the
  mid-size random-weight Qwen3 model (~0.5B parameters, q8_0 and q4_0), cached under
  ~/.cache/pydeltamem-bench.

Run from a source checkout (`deltamem bench` finds this folder next to the package), or as
`python -m pydeltamem.bench`.
"""


def register_cli(subparsers):
    """`deltamem bench` — the same as pydeltamem/bench.py's. In an editable install the repository
    root is on pydeltamem.__path__ (the `pydeltamem/convert` = `convert` mapping puts it there), so
    this folder can shadow pydeltamem/bench.py as `pydeltamem.bench` until the package is
    reinstalled; it then registers the command itself."""
    from . import bench as _harness

    parser = subparsers.add_parser("bench", help="benchmark pp/tg speed with and without δ-mem, against llama.cpp")
    _harness.add_arguments(parser)
    parser.set_defaults(func=_harness.run_cli)
    return parser
