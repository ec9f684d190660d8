"""bench/build_native_ggml.sh, the documented way to a ggml tuned for this CPU: it builds
libggml-python from its source distribution (native flags, OpenMP, llamafile) into a fresh venv and
installs this checkout against it. The engine there must run on that ggml and meet the bounds the
portable wheel's engine meets against transformers."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import pydeltamem
from test_backbone import SMOLLM2_PROMPT, check_smollm2_logits, smollm2_gguf

REPO = Path(__file__).resolve().parent.parent
LOGITS_SCRIPT = """
import json, sys, pydeltamem
with pydeltamem.Model(sys.argv[1], n_ctx=64, n_threads=2) as m:
    logits = m.context().decode(json.loads(sys.argv[2]), logits="all")
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
def test_native_ggml_build_meets_the_portable_bounds(tmp_path):
    venv = tmp_path / "venv-native"
    build = subprocess.run(["bash", str(REPO / "bench" / "build_native_ggml.sh"), str(venv)], cwd=REPO,
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    assert "native ggml ready" in build.stdout

    # cwd: outside the checkout, whose pydeltamem/ folder would shadow the venv's package.
    run = subprocess.run([str(venv / "bin" / "python"), "-c", LOGITS_SCRIPT, str(smollm2_gguf()),
                          json.dumps(SMOLLM2_PROMPT)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    native = json.loads(run.stdout.strip().splitlines()[-1])
    for feature in ("OPENMP", "LLAMAFILE"):
        assert f"{feature} = 1" in native["info"] and f"{feature} = 1" not in pydeltamem.system_info()

    # The same bounds against transformers as the portable engine's (test_backbone): the kernels
    # differ (AVX-512 dot products, llamafile's sgemm) but round activations alike.
    check_smollm2_logits(np.asarray(native["logits"], dtype=np.float32), "SmolLM2 Q4_1 on native ggml")
