"""bench/build_native_ggml.sh, the documented way to a ggml tuned for this CPU: it builds
libggml-python from its source distribution (native flags, OpenMP, llamafile) into a fresh venv and
installs this checkout against it. The engine there must run on that ggml and compute what the
portable wheel's engine computes, up to the kernels' rounding."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import pydeltamem
from pydeltamem.defaults import default_model_path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"
# max |native − portable| / max |portable| over the prompt's logits: the kernels differ (AVX-512
# dot products, llamafile's sgemm for the prompt) but quantize activations the same way.
REL_TOLERANCE = 2e-2

LOGITS_SCRIPT = """
import json, sys, pydeltamem
from pydeltamem.defaults import default_model_path
with pydeltamem.Model(default_model_path(), n_ctx=64, n_threads=2) as m:
    logits = m.context().decode(m.tokenize(sys.argv[1]), logits="all")
print(json.dumps({"info": pydeltamem.system_info(), "logits": logits.tolist()}))
"""


def ggml_build_options() -> dict[str, bool]:
    """GGML_* options of the installed libggml-python, from its CMake package config."""
    spec = importlib.util.find_spec("libggml")
    assert spec is not None and spec.submodule_search_locations, "libggml-python is not installed"
    (config,) = Path(list(spec.submodule_search_locations)[0]).glob("lib*/cmake/ggml/ggml-config.cmake")
    return {m[1]: m[2] == "ON" for m in re.finditer(r'set\(GGML_(\w+) "(ON|OFF)"\)', config.read_text())}


def test_system_info_reports_the_ggml_build():
    options, info = ggml_build_options(), pydeltamem.system_info()
    features = dict(item.split(" = ") for item in info.split(" | "))
    # A native build sets the instruction sets from the CPU, not from these options.
    checked = ["OPENMP", "LLAMAFILE"] + ([] if options["NATIVE"] else ["AVX", "AVX2", "F16C", "FMA", "AVX512"])
    for name in checked:
        assert (features.get(name) == "1") == options[name], f"{name}: ggml built with {options[name]}, reports {info!r}"


@pytest.mark.slow
def test_native_ggml_build_runs_the_engine_alike(tmp_path):
    venv = tmp_path / "venv-native"
    build = subprocess.run(["bash", str(REPO / "bench" / "build_native_ggml.sh"), str(venv)], cwd=REPO,
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    assert "native ggml ready" in build.stdout

    run = subprocess.run([str(venv / "bin" / "python"), "-c", LOGITS_SCRIPT, PROMPT], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    native = json.loads(run.stdout.strip().splitlines()[-1])
    for feature in ("OPENMP", "LLAMAFILE"):
        assert f"{feature} = 1" in native["info"] and f"{feature} = 1" not in pydeltamem.system_info()

    with pydeltamem.Model(default_model_path(), n_ctx=64, n_threads=2) as model:
        portable = model.context().decode(model.tokenize(PROMPT), logits="all")
    got = np.asarray(native["logits"], dtype=np.float32)
    err = float(np.abs(got - portable).max() / np.abs(portable).max())
    print(f"native vs portable ggml: relative max difference {err:.2e}")
    assert got.shape == portable.shape and err <= REL_TOLERANCE
    assert got[-1].argmax() == portable[-1].argmax()
