"""scripts/build_ggml.sh, the documented way to the ggml variants the portable wheel lacks: it
builds libggml-python from its source distribution into a fresh venv and installs this checkout
against it. One build here covers two of them, tuned for this CPU (native flags, OpenMP, llamafile)
and with the RPC backend: the engine there must meet the bounds the portable wheel's engine meets
against transformers, and the device tests (tests/test_devices.py) run there against
`deltamem rpc-server` on loopback, with the RPC backend required."""
from __future__ import annotations

import importlib.util
import json
import re
import os
import subprocess
import sysconfig
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


@pytest.fixture(scope="module")
def source_build(tmp_path_factory):
    """A venv with ggml built --native --rpc from source and this checkout installed against it; it
    also sees this venv's packages (the test extra: torch, transformers), after its own."""
    root = tmp_path_factory.mktemp("ggml-source")
    venv = root / "venv"
    env = {**os.environ, "GGML_WHEEL_CACHE": str(root / "wheels")}   # build now, not from a kept wheel
    build = subprocess.run(["bash", str(REPO / "scripts" / "build_ggml.sh"), str(venv), "--native", "--rpc"], cwd=REPO,
                           capture_output=True, text=True, timeout=2400, env=env)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    assert "ggml ready in" in build.stdout
    site = subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    Path(site, "_test_extra.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_native_ggml_build_meets_the_portable_bounds(source_build, tmp_path):
    venv = source_build
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


@pytest.mark.slow
def test_device_tests_pass_on_the_rpc_build(source_build, tmp_path):
    """tests/test_devices.py in the source build, where every RPC test must run (none skipped), and
    the C API misuse program against its engine."""
    venv = source_build
    env = {**os.environ, "DELTAMEM_REQUIRE_RPC": "1"}
    run = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(REPO), "-c", str(REPO / "pyproject.toml"),
                          str(REPO / "tests" / "test_devices.py"), str(REPO / "tests" / "test_c_api.py"), "-rs"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=env)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail
    skipped = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED") and "RPC" in line]
    assert not skipped, "\n".join(skipped)
    assert " passed" in run.stdout, tail
