"""The plain C API from real C programs built against the installed header and libdeltamem:
native/examples/simple.c, compared with the Python API on the same model, and tests/c_api_misuse.c,
which calls every entry point with NULL handles, NULL buffers and absurd arguments."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import pydeltamem
from pydeltamem.defaults import default_model_path

EXAMPLE = Path(__file__).resolve().parents[1] / "native" / "examples" / "simple.c"
MISUSE = Path(__file__).resolve().parent / "c_api_misuse.c"
PROMPT = "The capital of France is"


def build_c_program(source: Path, folder: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed to test the C API")
    exe = folder / source.stem
    lib = pydeltamem.get_lib_dir()
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", str(source), f"-I{pydeltamem.get_include()}",
                    f"-L{lib}", "-ldeltamem", f"-Wl,-rpath,{lib}", "-o", str(exe)], check=True)
    return exe


@pytest.fixture(scope="module")
def simple(tmp_path_factory) -> Path:
    return build_c_program(EXAMPLE, tmp_path_factory.mktemp("capi"))


def test_header_and_library_are_installed():
    assert (Path(pydeltamem.get_include()) / "deltamem.h").is_file()
    assert (Path(pydeltamem.get_lib_dir()) / "libdeltamem.so").is_file()


def test_c_program_generates_what_python_generates(simple):
    run = subprocess.run([str(simple), default_model_path(), PROMPT, "8"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    c_tokens = [int(t) for t in run.stderr.split("tokens:")[1].split()]
    with pydeltamem.Model(default_model_path(), n_ctx=512) as m:
        out = m.create_completion(PROMPT, max_tokens=8, temperature=0)
        py_tokens = m.tokenize(PROMPT + out["choices"][0]["text"], add_special=False)[len(m.tokenize(PROMPT, add_special=False)):]
    assert run.stdout.startswith(PROMPT + " Paris")
    assert run.stdout.rstrip("\n") == PROMPT + out["choices"][0]["text"]
    assert c_tokens[:4] == py_tokens[:4]


def test_c_api_reports_errors_instead_of_crashing(simple, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    run = subprocess.run([str(simple), str(bad), PROMPT], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "load:" in run.stderr and "GGUF" in run.stderr


def test_every_entry_point_survives_null_and_absurd_arguments(tmp_path):
    """NULL handles (dm_decode(NULL, ...), dm_model_arch(NULL), ...), NULL buffers, unknown enum values,
    n_threads above DM_MAX_THREADS, an unallocatable n_ctx and an aborting callback: each call fails
    with dm_last_error() set, and the process exits normally."""
    exe = build_c_program(MISUSE, tmp_path)
    run = subprocess.run([str(exe), default_model_path()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode} (negative: killed by a signal)\n{run.stderr[-3000:]}"
    assert run.stdout.startswith("checks: "), run.stdout   # every check passed (each failure sets the exit code)
