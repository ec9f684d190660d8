"""Hostile use: absurd arguments, leaks under repeated failure, saved-file modes and interrupted saves,
damaged state/session/memory files, bytes that are not UTF-8. Every misuse gives a clear Python
exception (ValueError naming the argument, or TypeError for a wrong type), never a crash.

Cases that crashed (or could) run in a subprocess, so a signal fails the test instead of killing pytest.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest

import pydeltamem
from pydeltamem import _core, atomic
from pydeltamem import memfile
from pydeltamem.defaults import default_model_path
from pydeltamem.session import SESSION_MAGIC
from test_bad_input import rewrite_gguf
from test_session import adapted  # noqa: F401  (a fixture: adapter GGUFs for the tiny Qwen3 backbone)

BASE_MODEL = "llama-gqa"


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"exit code {proc.returncode} (negative: killed by a signal)\n"
                                  f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny(tiny_gguf) -> Path:
    return tiny_gguf(BASE_MODEL, "f32")


@pytest.fixture(scope="module")
def model(tiny):
    with pydeltamem.Model(tiny, n_ctx=64, n_threads=1) as m:
        yield m


# ---- n_threads ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1, _core.MAX_THREADS + 1, 600, 2**31 - 1, 2**40, 2.5, "4", True])
def test_absurd_n_threads_raise_value_error(tiny, model, bad):
    with pytest.raises(ValueError, match="n_threads"):
        pydeltamem.Model(tiny, n_threads=bad)
    with pytest.raises(ValueError, match="n_threads"):
        model.context(n_threads=bad)


def test_the_native_thread_bound_holds_without_the_python_check(tiny):
    """600 threads aborted in ggml-cpu and 2**31 - 1 segfaulted: the C API refuses them itself."""
    out = run_python("""
        import sys
        from pydeltamem import _core
        m = _core.Model(sys.argv[1])
        for n in (513, 600, 2**31 - 1):
            try:
                _core.Context(m, 64, 64, n, _core.KV_F16)
            except ValueError as e:
                print(e)
    """, tiny)
    assert out.stdout.splitlines() == [f"n_threads must be at most 512, got {n}" for n in (513, 600, 2**31 - 1)]


def test_more_threads_than_the_hardware_warns(model):
    hardware = len(os.sched_getaffinity(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.context(n_threads=hardware).close()   # no warning
    with pytest.warns(RuntimeWarning, match=f"more than the {hardware} hardware threads"):
        model.context(n_threads=hardware + 1).close()


def test_failed_context_creation_leaks_no_threads():
    """Each failure used to leave its thread pool behind (200 failures, 200 threads)."""
    out = run_python("""
        import os, sys
        import pydeltamem
        def threads():
            return len(os.listdir("/proc/self/task"))
        with pydeltamem.Model(sys.argv[1], n_threads=2) as m:
            m.context(n_ctx=64).close()   # whatever the first context starts once is there from now on
            before = threads()
            messages = set()
            for _ in range(200):
                try:
                    m.context(n_ctx=10**9)   # tens of TB of KV cache: the allocation fails
                except ValueError as e:
                    messages.add(str(e))
            print(before, threads(), messages)
    """, default_model_path(), timeout=240)
    before, after, messages = out.stdout.split(" ", 2)
    assert int(after) == int(before), out.stdout
    assert "cannot allocate the KV cache" in messages


# ---- out-of-range and wrongly typed arguments --------------------------------------------------------

def test_out_of_range_ints_name_the_argument(model):
    with pytest.raises(ValueError, match="top_k"):
        model.create_completion("ab", max_tokens=2, top_k=10**10)
    ctx = model.context()
    with pytest.raises(ValueError, match="token ids"):
        ctx.decode([2**40])
    with pytest.raises(ValueError, match="message_ids"):
        ctx.decode([1, 2], message_ids=[0, 2**40])
    with pytest.raises(ValueError, match="sentence_ids"):
        ctx.decode([1, 2], sentence_ids=[-(2**31) - 1, 0])
    with pytest.raises(ValueError, match=r"\bn = "):
        ctx.truncate(2**40)
    with pytest.raises(ValueError, match="n_ctx"):
        model.context(n_ctx=2**40)
    with pytest.raises(ValueError, match="token"):
        _core.token_to_piece(model._native, 2**40)
    with pytest.raises(ValueError, match="penalty_last_n"):
        _core.Sampler(penalty_last_n=2**32)
    assert ctx.n_past == 0   # nothing was decoded by the failed calls


def test_huge_max_tokens_means_until_the_context_is_full(model):
    out = model.create_completion("ab", max_tokens=2**31, temperature=0)
    assert 0 < out["usage"]["completion_tokens"] <= 64


def test_tokenize_takes_text_only(model):
    for bad in (5, None, [104, 105], 3.5):
        with pytest.raises(TypeError, match="str or bytes"):
            model.tokenize(bad)
    assert model.tokenize(bytearray(b"hi")) == model.tokenize(b"hi") == model.tokenize("hi")
    assert model.tokenize(memoryview(b"hi")) == model.tokenize("hi")


def test_native_messages_that_are_not_utf8_stay_readable(tmp_path):
    """The message quotes a path with bytes that are not UTF-8: it becomes U+FFFD, not a UnicodeDecodeError."""
    name = os.fsencode(tmp_path) + b"/bad-\xff\xfe.gguf"
    with open(name, "wb") as f:
        f.write(b"not a gguf file at all")
    with pytest.raises(ValueError, match="\ufffd") as err:
        pydeltamem.Model(name)
    assert "bad-" in str(err.value)


def test_a_sampled_token_outside_the_tokenizer_raises(tiny, tmp_path):
    """More output rows than tokenizer tokens: the generator turned the error code of such a token
    into a string length (negating INT32_MIN)."""
    reader = gguf.GGUFReader(tiny)
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].contents())
    keep = n_tokens - 3
    short = rewrite_gguf(tiny, tmp_path / "short_vocab.gguf",
                         drop_keys=("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"),
                         set_keys={"tokenizer.ggml.tokens": (reader.fields["tokenizer.ggml.tokens"].contents()[:keep],
                                                             gguf.GGUFValueType.ARRAY),
                                   "tokenizer.ggml.token_type": (
                                       reader.fields["tokenizer.ggml.token_type"].contents()[:keep],
                                       gguf.GGUFValueType.ARRAY)})
    out = run_python("""
        import sys
        import pydeltamem
        with pydeltamem.Model(sys.argv[1], n_ctx=32, n_threads=1) as m:
            try:   # the bias makes the last output row, which has no token, the greedy choice
                m.create_completion("ab", max_tokens=4, temperature=0, logit_bias={m.n_vocab - 1: 1e4})
            except ValueError as e:
                print(e)
    """, short)
    assert f"generated token {n_tokens - 1} has no text: the tokenizer has {keep} tokens" in out.stdout


# ---- saved files: modes, interrupted saves ------------------------------------------------------

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o666 & ~0o027
    os.umask(old)


def test_saved_files_get_the_mode_open_would_give(adapted, tmp_path, umask_027):
    gguf_path, adapter = adapted("released")
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64, n_threads=1) as m:
        ctx = m.context()
        ctx.decode(m.tokenize("hello there"))
        session = m.session(system="terse")
        saves = {"memory": ctx.save_memory, "state": ctx.save_state, "session": session.save}
        for name, save in saves.items():
            save(tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == umask_027, name
            os.chmod(tmp_path / name, 0o600)   # saving again keeps the file's own mode, as open() would
            save(tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
        session.close()
    from pydeltamem.quantize import quantize_gguf
    quantize_gguf(gguf_path, tmp_path / "q8.gguf", "Q8_0", n_threads=1, progress=False)
    assert (tmp_path / "q8.gguf").stat().st_mode & 0o777 == umask_027
    assert not list(tmp_path.glob(".*.part"))


_INTERRUPTED_SAVE = textwrap.dedent("""
    import sys, time
    from pydeltamem import atomic
    with atomic.replacing(sys.argv[1]) as part:
        with open(part, "wb") as f:
            f.write(b"half of the new content")
        print("writing", flush=True)
        time.sleep(600)   # killed here
""")


def _start_interrupted_save(target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_SAVE, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_kill_during_a_save_keeps_the_target_and_the_next_save_cleans_up(tmp_path):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old content")
    parts = []
    for _ in range(3):   # kill -9 mid-save, three times: each new save removes the part of the last one
        proc = _start_interrupted_save(target)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert target.read_bytes() == b"old content"
        [part] = tmp_path.glob(".state.bin.*.part")
        assert part not in parts
        parts.append(part)
    (tmp_path / ".other.bin.1234abcd.part").write_bytes(b"another target's part")

    live = _start_interrupted_save(target)   # a save in progress in another process
    try:
        atomic.write_bytes(target, [b"new ", b"content"])
        assert target.read_bytes() == b"new content"
        left = list(tmp_path.glob(".*.part"))
        assert len(left) == 2 and (tmp_path / ".other.bin.1234abcd.part") in left   # the live writer's is kept
        assert [p for p in left if p.name.startswith(".state.bin.")][0].read_bytes() == b"half of the new content"
    finally:
        live.kill()
        live.wait()
    atomic.write_bytes(target, [b"newer"])
    assert [p.name for p in tmp_path.glob(".*.part")] == [".other.bin.1234abcd.part"]


def test_a_failed_save_leaves_no_part_and_the_old_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic.replacing(target) as part:
            part.write_bytes(b"partial")
            raise RuntimeError("mid-write")
    assert target.read_bytes() == b"old" and not list(tmp_path.glob(".*.part"))


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        is_folder = os.path.isdir(f"/proc/self/fd/{fd}")
        synced.append(("folder" if is_folder else "file", target.exists() and target.read_bytes() == b"data"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic.write_bytes(target, [b"data"])
    assert synced == [("file", False), ("folder", True)]   # the data before the rename, the folder after it


# ---- damaged state, memory and session files ----------------------------------------------------

def _write(path: Path, magic: bytes, header, payload: bytes = b"") -> Path:
    head = json.dumps(header).encode()
    path.write_bytes(magic + struct.pack("<I", len(head)) + head + payload)
    return path


def test_load_state_rejects_nan_and_infinite_values(adapted, tmp_path):
    gguf_path, adapter = adapted("released")
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64, n_threads=1) as m:
        ctx = m.context()
        ctx.decode(m.tokenize("hello there"))
        ctx.save_state(tmp_path / "good")
        data = (tmp_path / "good").read_bytes()
        header, payload = memfile.unpack_bytes(data, memfile.STATE_MAGIC, "state", "good")
        start = len(data) - len(payload)
        kv_at = start + 4 * header["n_tokens"]
        mem_at = kv_at + header["kv_bytes"]
        nan_kv = bytearray(data)
        nan_kv[kv_at + 2:kv_at + 4] = np.array([np.nan], "<f2").tobytes()   # f16 KV cache
        inf_mem = bytearray(data)
        inf_mem[mem_at + 4:mem_at + 8] = np.array([np.inf], "<f4").tobytes()
        fresh = m.context()
        for name, broken in (("nan_kv", nan_kv), ("inf_memory", inf_mem)):
            (tmp_path / name).write_bytes(bytes(broken))
            with pytest.raises(ValueError, match="NaN or infinite"):
                fresh.load_state(tmp_path / name)
            assert fresh.n_past == 0   # nothing was loaded
        fresh.load_state(tmp_path / "good")
        assert fresh.tokens == ctx.tokens


def test_memory_files_with_a_wrongly_shaped_header(adapted, tmp_path):
    gguf_path, adapter = adapted("released")
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64, n_threads=1) as m:
        ctx = m.context()
        fingerprint = m.adapter["fingerprint"]
        payload = np.zeros(int(np.prod(ctx.memory_shape)), "<f4").tobytes()
        for header in ([], "text", {"fingerprint": fingerprint, "shape": 5},
                       {"fingerprint": fingerprint, "shape": ["a", "b"]}, {"fingerprint": fingerprint}):
            path = _write(tmp_path / "mem", memfile.MEMORY_MAGIC, header, payload)
            with pytest.raises(ValueError, match="corrupted header|holds memory"):
                ctx.load_memory(path)
        nan = np.zeros(int(np.prod(ctx.memory_shape)), "<f4")
        nan[3] = np.nan
        path = _write(tmp_path / "mem", memfile.MEMORY_MAGIC, {"fingerprint": fingerprint, "shape": list(ctx.memory_shape)},
                      nan.tobytes())
        with pytest.raises(ValueError, match="NaN or infinite"):
            ctx.load_memory(path)


@pytest.mark.parametrize("header", [[1, 2], {"n_tokens": "3", "kv_bytes": 0}, {"n_tokens": [3], "kv_bytes": 0},
                                    {"n_tokens": 0}, {"n_tokens": True, "kv_bytes": 0}])
def test_state_files_with_a_wrongly_shaped_header(model, tmp_path, header):
    path = _write(tmp_path / "state", memfile.STATE_MAGIC, header)
    with pytest.raises(ValueError, match="corrupted header"):
        model.context().load_state(path)


def _good_session_header(m) -> dict:
    return {"version": 1, "messages": [], "next_message_id": 0, "next_sentence_id": 0, "written": 0,
            "memory_only": False, "adapter": None, "model": {"arch": m.arch, "n_layer": m.n_layer, "n_vocab": m.n_vocab},
            "include_state": False, "memory_bytes": 0}


@pytest.mark.parametrize("change", [
    {"model": []}, {"model": "x"}, {"messages": 5}, {"messages": [5]}, {"messages": [{"role": "user"}]},
    {"messages": [{"role": 3, "content": "hi", "message_id": 0, "tokens": [], "sentence_ids": []}]},
    {"written": None}, {"memory_only": "no"},
])
def test_session_files_with_a_wrongly_shaped_header(model, tmp_path, change):
    path = _write(tmp_path / "session", SESSION_MAGIC, {**_good_session_header(model), **change})
    with pytest.raises(ValueError, match="corrupted session header"):
        model.load_session(path)


def test_a_session_file_announcing_a_state_it_lacks(model, tmp_path):
    path = _write(tmp_path / "session", SESSION_MAGIC, {**_good_session_header(model), "include_state": True})
    with pytest.raises(ValueError, match="not a pydeltamem state"):
        model.load_session(path)


def test_the_good_session_header_loads(model, tmp_path):
    """The header the damaged ones above start from is itself valid."""
    path = _write(tmp_path / "session", SESSION_MAGIC, _good_session_header(model))
    assert model.load_session(path).messages == []
