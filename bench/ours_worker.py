"""One benchmark run of our engine (or one paired run: spec "paired"), in its own process:
`python ours_worker.py < SPEC_JSON`.

A script run by path (not a module of the package), so it works however the harness was found.
The measurements themselves are bench.py's `ours_worker` and `paired_worker` (same protocol as
llamacpp_worker.py).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def _sibling(name: str):
    """A module of this folder, loaded by path."""
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_deltamem_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    spec = json.loads(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())
    spec["peak_rss_kb"] = _sibling("llamacpp_worker").peak_rss_kb   # one definition for both workers
    if spec.get("n_seqs"):
        result = _sibling("parallel").ours_parallel_worker(spec)
    else:
        bench = _sibling("bench")
        result = bench.paired_worker(spec) if spec.get("paired") else bench.ours_worker(spec)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
