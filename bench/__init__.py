"""pydeltamem's llama-bench-style benchmark (issue 5): `deltamem bench`.

- `bench.py` — the harness: spawns one worker process per run and contender (our engine without
  and with a δ-mem adapter, llama.cpp through llama-cpp-python in its own venv), alternating the
  contenders run by run; prints a table and writes JSON.
- `llamacpp_worker.py` — a stand-alone script (stdlib + llama_cpp only) run by llama-cpp-python's
  interpreter; llama.cpp ships its own libggml, which cannot share a process with ours.
- `make_models.py` — the random δ-mem adapter (release configuration) for any model GGUF, and the
  mid-size random-weight Qwen3 model (~0.5B parameters, q8_0 and q4_0), cached under
  ~/.cache/pydeltamem-bench.

Installed as `pydeltamem.bench` (pyproject maps this folder there); run it as `deltamem bench`.
"""


def register_cli(subparsers):
    from . import bench

    parser = subparsers.add_parser(
        "bench",
        help="benchmark pp/tg speed with and without δ-mem, against llama.cpp",
        description="llama-bench-style benchmark: pp (prompt tokens/s, one decode) and tg (generated tokens/s, "
                    "one token per decode); each run in a fresh process, contenders alternated run by run; "
                    "median of runs and medians of per-run ratios.",
    )
    bench.add_arguments(parser)
    parser.set_defaults(func=bench.run_cli)
    return parser
