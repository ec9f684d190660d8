"""One benchmark run of our engine, in its own process: `python ours_worker.py < SPEC_JSON`.

A script run by path (not a module of the package), so it works however the harness was found.
The measurement itself is bench.py's `ours_worker` (same protocol as llamacpp_worker.py).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def _harness():
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("_deltamem_bench_harness", here / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    spec = json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    result = _harness().ours_worker(spec)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
