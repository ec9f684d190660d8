"""Devices: the engine on ggml backends other than the CPU, checked without a GPU through ggml's
RPC backend (a non-CPU backend whose server, `deltamem rpc-server`, runs on this machine), and the
device formulation of δ-mem (ggml_gated_delta_net) against the CPU engine and the float64 reference.

The RPC tests need a ggml built with RPC (scripts/build_ggml.sh VENV --rpc; .ci/run builds one and
runs this file there with DELTAMEM_REQUIRE_RPC=1, so a missing backend fails instead of skipping).
"""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import pydeltamem
from pydeltamem import _core
from dmem_fixtures import VARIANTS, session_calls
from test_dmem import F32_TOL, backbone, convert, engine_session, reference_session, rel_err  # noqa: F401 (a fixture)

HAS_RPC = "RPC" in _core.backends().split(", ")
needs_rpc = pytest.mark.skipif(not HAS_RPC and not os.environ.get("DELTAMEM_REQUIRE_RPC"),
                               reason="this ggml has no RPC backend (scripts/build_ggml.sh VENV --rpc builds one)")
DEVICE_TOL = 1e-5   # the RPC server computes with the same CPU kernels: only summation order differs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rpc_server(tmp_path) -> tuple[subprocess.Popen, str]:
    """`deltamem rpc-server` on a free loopback port, once it accepts connections."""
    port = free_port()
    log = open(tmp_path / f"rpc-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pydeltamem.cli", "rpc-server", "--port", str(port), "-t", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rpc-server exited with {proc.returncode}: {(tmp_path / log.name).read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("rpc-server did not start listening within 30 s")


SERVER_PIDS: dict[str, int] = {}


@pytest.fixture(scope="module")
def rpc_servers(tmp_path_factory):
    """Two RPC servers on loopback for this module (stopped at its end)."""
    if not HAS_RPC:
        pytest.fail("DELTAMEM_REQUIRE_RPC is set but this ggml has no RPC backend")
    folder = tmp_path_factory.mktemp("rpc")
    servers = [start_rpc_server(folder) for _ in range(2)]
    SERVER_PIDS.update({endpoint: proc.pid for proc, endpoint in servers})
    yield [endpoint for _, endpoint in servers]
    for proc, _ in servers:
        proc.kill()
        proc.wait()


def prefill_decode_prefill(model: pydeltamem.Model, vocab: int, **ctx_kwargs):
    """Logits of a prefill, three single-token decodes and another prefill; and the context."""
    rng = np.random.default_rng(3)
    calls = [rng.integers(0, vocab, 23).tolist(), [5], [9], [2], rng.integers(0, vocab, 11).tolist()]
    ctx = model.context(kv_type="f32", **ctx_kwargs)
    return np.concatenate([ctx.decode(c, logits="all") for c in calls]), ctx


def check_dmem_against_reference(backbone, tmp_path, arch: str, variant: dict, model_kwargs: list[dict],
                                 **ctx_kwargs) -> list[int]:
    """The δ-mem session of session_calls on the engine placed by each of model_kwargs against the float64
    reference: logits ≤ F32_TOL, memory ≤ 1e-4; returns each placement's graph splits."""
    gguf_path, hf_model, _ = backbone(arch)
    config, tensors, adapter = convert(tmp_path, hf_model, gguf_path, variant, outtype="f32")
    calls = session_calls(hf_model.config.vocab_size)
    ref_logits, ref_memory = reference_session(hf_model, config, tensors, calls)
    assert np.abs(ref_memory).max() > 1e-2, "the reference memory must be far from zero to compare it"
    splits = []
    for kwargs in model_kwargs:
        with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64, **kwargs) as m:
            got, ctx = engine_session(m, calls, **ctx_kwargs)
            memory = ctx.memory
            splits.append(ctx.n_splits)
            ctx.close()
        assert rel_err(got, ref_logits) <= F32_TOL, kwargs
        np.testing.assert_allclose(memory, ref_memory, rtol=1e-4, atol=1e-5, err_msg=str(kwargs))
    return splits


# ---------------------------------------------------------------------- the CPU-only parts (every build)

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_device_scan_matches_float64_reference(variant, backbone, tmp_path):
    """The formulation offloaded layers use (ggml_gated_delta_net, r padded to 16, read-before-write
    by a shifted query), run here on the CPU backend, against the float64 reference."""
    check_dmem_against_reference(backbone, tmp_path, "qwen3", VARIANTS[variant], [{}], dmem_fused=False)


@pytest.mark.parametrize("variant", ["uncoupled_lambda", "scalar_gates_uncoupled", "state_heads_4", "message_mean"])
def test_device_scan_long_prefill_matches_fused_kernel(variant, backbone, tmp_path):
    """2,048 tokens in one pass: one gated_delta_net node per layer (no per-token graph), equal to
    the fused CPU kernel (itself checked against the float64 reference)."""
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS[variant], outtype="f32")
    tokens = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, 2048).tolist()
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=2048, n_batch=2048) as m:
        fused = m.context(kv_type="f32", dmem_fused=True)
        device = m.context(kv_type="f32", dmem_fused=False)
        a, b = fused.decode(tokens, logits="all"), device.decode(tokens, logits="all")
        assert rel_err(b, a) <= 1e-4
        np.testing.assert_allclose(device.memory, fused.memory, rtol=1e-4, atol=1e-5)


def test_offloading_without_devices_is_a_clear_error(backbone):
    gguf_path, _, _ = backbone("llama")
    others = [d for d in pydeltamem.devices() if d["type"] != "cpu"]
    if not others:
        with pytest.raises(ValueError, match=r"n_gpu_layers=-1 asks for a GPU or RPC device.*build_ggml\.sh"):
            pydeltamem.Model(gguf_path, n_gpu_layers=-1)
    if not HAS_RPC:
        with pytest.raises(ValueError, match=r"no RPC backend.*build_ggml\.sh VENV --rpc"):
            pydeltamem.Model(gguf_path, n_gpu_layers=-1, rpc_servers="127.0.0.1:1")
    with pytest.raises(ValueError, match="host:port"):
        pydeltamem.Model(gguf_path, rpc_servers="localhost")
    with pytest.raises(ValueError, match="n_gpu_layers"):
        pydeltamem.Model(gguf_path, n_gpu_layers=-5)
    with pytest.raises(ValueError, match="tensor_split"):
        pydeltamem.Model(gguf_path, tensor_split=[-1.0, 2.0])
    with pytest.raises(ValueError, match="tensor_split needs n_gpu_layers"):
        pydeltamem.Model(gguf_path, tensor_split=[1.0])


def test_devices_lists_the_cpu():
    cpu = [d for d in pydeltamem.devices() if d["type"] == "cpu"]
    assert cpu and cpu[0]["name"] == "CPU" and cpu[0]["total"] > 0
    assert "CPU" in _core.backends()


def test_cpu_model_is_one_split(backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"], outtype="f32")
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64) as m:
        assert {m.layer_device(i) for i in range(m.n_layer + 1)} == {"CPU"}
        for fused in (True, False):
            _, ctx = prefill_decode_prefill(m, hf_model.config.vocab_size, dmem_fused=fused)
            assert ctx.n_splits == 1


# ---------------------------------------------------------------------- through RPC

@needs_rpc
@pytest.mark.parametrize("arch", ["llama", "qwen3", "smollm3"])
@pytest.mark.parametrize("placement", ["full", "partial", "two-servers"])
def test_offloaded_logits_equal_the_cpu_engine(arch, placement, backbone, rpc_servers):
    gguf_path, hf_model, _ = backbone(arch)
    vocab = hf_model.config.vocab_size
    with pydeltamem.Model(gguf_path, n_ctx=64) as cpu:
        n_layer = cpu.n_layer
        want, _ = prefill_decode_prefill(cpu, vocab)
    kwargs = {"full": dict(n_gpu_layers=-1, rpc_servers=rpc_servers[:1]),
              "partial": dict(n_gpu_layers=1, rpc_servers=rpc_servers[0]),
              "two-servers": dict(n_gpu_layers=-1, rpc_servers=",".join(rpc_servers), tensor_split=[1, 1])}[placement]
    with pydeltamem.Model(gguf_path, n_ctx=64, **kwargs) as m:
        got, ctx = prefill_decode_prefill(m, vocab)
        where = [m.layer_device(i) for i in range(n_layer + 1)]
        splits = ctx.n_splits
        ctx.close()
    assert rel_err(got, want) <= DEVICE_TOL
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    if placement == "full":
        assert len(set(where)) == 1 and where[0].startswith("RPC")
        assert splits == 2   # the token lookup on the host, then everything on the server
    elif placement == "partial":   # the last layer offloaded; the output stays on the host
        assert where[:-2] == ["CPU"] * (n_layer - 1) and where[-2].startswith("RPC") and where[-1] == "CPU"
        assert splits == 3
    else:   # half the layers each, the output with the last layer
        assert len(set(where[:n_layer])) == 2 and where[-1] == where[-2] != where[0]
        assert splits == 3


@needs_rpc
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dmem_on_rpc_matches_float64_reference(variant, backbone, rpc_servers, tmp_path):
    splits = check_dmem_against_reference(backbone, tmp_path, "qwen3", VARIANTS[variant],
                                          [dict(n_gpu_layers=-1, rpc_servers=rpc_servers[:1])])
    assert splits == [2], "δ-mem must not bounce a fully offloaded model back to the host"


@needs_rpc
@pytest.mark.parametrize("arch", ["llama", "smollm3"])
def test_dmem_partially_offloaded_and_split(arch, backbone, rpc_servers, tmp_path):
    """CPU layers run the fused kernels, offloaded ones the device scan, in one model."""
    check_dmem_against_reference(backbone, tmp_path, arch, VARIANTS["released"],
                                 [dict(n_gpu_layers=1, rpc_servers=rpc_servers[:1]),
                                  dict(n_gpu_layers=-1, rpc_servers=rpc_servers, tensor_split=[1, 1])])


@needs_rpc
def test_memory_and_state_move_between_cpu_and_rpc(backbone, rpc_servers, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"], outtype="f32")
    calls = session_calls(hf_model.config.vocab_size)
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64, n_gpu_layers=-1, rpc_servers=rpc_servers[:1]) as remote, \
            pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64) as local:
        r = remote.context(kv_type="f32")
        r.decode(calls[0]["tokens"])
        assert np.abs(r.memory).max() > 0
        r.save_memory(tmp_path / "mem.bin")
        r.save_state(tmp_path / "state.bin")

        l_mem = local.context(kv_type="f32")
        l_mem.load_memory(tmp_path / "mem.bin")
        assert np.array_equal(l_mem.memory, r.memory)   # bytes in, bytes out: no arithmetic

        l = local.context(kv_type="f32")
        l.load_state(tmp_path / "state.bin")
        assert l.tokens == r.tokens
        nxt = calls[4]["tokens"]
        assert rel_err(r.decode(nxt, logits="all"), l.decode(nxt, logits="all")) <= DEVICE_TOL

        back = remote.context(kv_type="f32")   # and from the host onto the server
        l.save_state(tmp_path / "state2.bin")
        back.load_state(tmp_path / "state2.bin")
        np.testing.assert_array_equal(back.memory, l.memory)
        r.memory = l.memory
        np.testing.assert_array_equal(r.memory, l.memory)
        for c in (r, l_mem, l, back):
            c.close()


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        kb = next(line for line in f if line.startswith("VmRSS:")).split()[1]
    return int(kb) * 1024


@needs_rpc
def test_close_frees_the_servers_memory(backbone, rpc_servers):
    """The server process holds the weights, the KV cache (zeroed, so resident) and the compute
    buffers while a model uses it, and gives them back when the model and its context close."""
    gguf_path, hf_model, _ = backbone("qwen3")
    pid = SERVER_PIDS[rpc_servers[1]]
    n_ctx = 1 << 15
    c = hf_model.config
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * n_ctx
    before = resident_bytes(pid)
    m = pydeltamem.Model(gguf_path, n_ctx=n_ctx, n_batch=64, n_gpu_layers=-1, rpc_servers=rpc_servers[1:])
    ctx = m.context(kv_type="f32")
    ctx.decode([1, 2, 3])
    used = resident_bytes(pid) - before
    ctx.close()
    m.close()
    kept = resident_bytes(pid) - before
    assert used >= kv_bytes, f"the KV cache ({kv_bytes} bytes) should live on the server (its RSS grew {used})"
    assert kept < kv_bytes / 8, f"closing must give the server's memory back ({kept} of {used} bytes kept)"


@needs_rpc
def test_server_dying_mid_session_is_an_exception(backbone, tmp_path):
    """In a process of its own (the dead server's devices stay in that process's registry)."""
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"], outtype="f32")
    proc, endpoint = start_rpc_server(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal, pydeltamem
        m = pydeltamem.Model({str(gguf_path)!r}, adapter={str(adapter)!r}, n_ctx=64, n_gpu_layers=-1,
                             rpc_servers={endpoint!r})
        ctx = m.context()
        ctx.decode([1, 2, 3])
        os.kill({proc.pid}, signal.SIGKILL)
        import time; time.sleep(0.5)
        for what in ("decode", "memory"):
            try:
                ctx.decode([4, 5]) if what == "decode" else ctx.memory
            except ValueError as e:
                print(what, "raised:", e)
            else:
                print(what, "did not raise")
        ctx.close()
        m.close()
        print("closed")
    """)
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 0, out.stderr
    assert "decode raised: device failure" in out.stdout, out.stdout + out.stderr
    assert "memory raised: device failure" in out.stdout, out.stdout + out.stderr
    assert "closed" in out.stdout


@needs_rpc
def test_main_gpu_and_tensor_split_are_checked(backbone, rpc_servers):
    gguf_path, _, _ = backbone("llama")
    with pytest.raises(ValueError, match="main_gpu=5"):
        pydeltamem.Model(gguf_path, n_gpu_layers=-1, main_gpu=5, rpc_servers=rpc_servers[:1])
    for main in (0, 1):   # without tensor_split, every offloaded layer goes to device main_gpu
        with pydeltamem.Model(gguf_path, n_gpu_layers=-1, main_gpu=main, rpc_servers=rpc_servers) as m:
            where = {m.layer_device(i) for i in range(m.n_layer + 1)}
        names = [d["name"] for d in pydeltamem.devices() if d["description"] == rpc_servers[main]]
        assert where == set(names)
    n_devices = len([d for d in pydeltamem.devices() if d["type"] == "gpu"])
    with pytest.raises(ValueError, match="tensor_split has"):
        pydeltamem.Model(gguf_path, n_gpu_layers=-1, tensor_split=[1.0] * (n_devices + 1), rpc_servers=rpc_servers[:1])
    with pytest.raises(ValueError, match="does not answer"):
        pydeltamem.Model(gguf_path, n_gpu_layers=-1, rpc_servers=f"127.0.0.1:{free_port()}")


# ---------------------------------------------------------------------- on a GPU (bench/gpu_check.sh)

GPUS = [d for d in pydeltamem.devices() if d["type"] in ("gpu", "igpu") and not d["name"].startswith("RPC")]
needs_gpu = pytest.mark.skipif(not GPUS and os.environ.get("DELTAMEM_TEST_DEVICE") != "cuda",
                               reason="no GPU here (bench/gpu_check.sh runs these on a lent GPU machine)")
GPU_TOL = 1e-4   # other kernels (cuBLAS, CUDA's flash attention) sum in other orders


@needs_gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3", "smollm3"])
def test_gpu_logits_equal_the_cpu_engine(arch, backbone):
    assert GPUS, "DELTAMEM_TEST_DEVICE is set but ggml lists no GPU"
    gguf_path, hf_model, _ = backbone(arch)
    vocab = hf_model.config.vocab_size
    with pydeltamem.Model(gguf_path, n_ctx=64) as cpu:
        want, _ = prefill_decode_prefill(cpu, vocab)
    with pydeltamem.Model(gguf_path, n_ctx=64, n_gpu_layers=-1) as m:
        got, ctx = prefill_decode_prefill(m, vocab)
        assert m.layer_device(0) == GPUS[0]["name"] and ctx.n_splits == 2
        ctx.close()
    assert rel_err(got, want) <= GPU_TOL


@needs_gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dmem_on_gpu_matches_float64_reference(variant, backbone, tmp_path):
    splits = check_dmem_against_reference(backbone, tmp_path, "qwen3", VARIANTS[variant], [dict(n_gpu_layers=-1)])
    assert splits == [2]


@needs_gpu
def test_gpu_long_prefill_matches_the_cpu_engine(backbone, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"], outtype="f32")
    tokens = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, 4096).tolist()
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=4096, n_batch=512) as cpu, \
            pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=4096, n_batch=512, n_gpu_layers=-1) as gpu:
        a, b = cpu.context(kv_type="f32"), gpu.context(kv_type="f32")
        assert rel_err(b.decode(tokens, logits="last"), a.decode(tokens, logits="last")) <= GPU_TOL
        np.testing.assert_allclose(b.memory, a.memory, rtol=1e-3, atol=1e-5)


@needs_gpu
def test_gpu_close_frees_device_memory(backbone):
    gguf_path, _, _ = backbone("qwen3")
    free = lambda: next(d["free"] for d in pydeltamem.devices() if d["name"] == GPUS[0]["name"])  # noqa: E731
    before = free()
    m = pydeltamem.Model(gguf_path, n_ctx=1 << 16, n_gpu_layers=-1)
    ctx = m.context(kv_type="f32")
    ctx.decode([1, 2, 3])
    used = before - free()
    ctx.close()
    m.close()
    assert used > 16 << 20, f"the KV cache should be on the GPU (used {used} bytes)"
    assert before - free() < used / 8, "closing must give the GPU's memory back"


@needs_rpc
def test_batched_decode_on_rpc_equals_decoding_alone(backbone, rpc_servers, tmp_path):
    gguf_path, hf_model, _ = backbone("qwen3")
    _, _, adapter = convert(tmp_path, hf_model, gguf_path, VARIANTS["released"], outtype="f32")
    rng = np.random.default_rng(6)
    toks = [rng.integers(0, hf_model.config.vocab_size, k).tolist() for k in (9, 1, 17)]
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=64, n_gpu_layers=-1, rpc_servers=rpc_servers[:1]) as m:
        batched = [m.context(kv_type="f32") for _ in toks]
        alone = [m.context(kv_type="f32") for _ in toks]
        for step in range(3):
            calls = toks if step == 0 else [[int(rng.integers(0, 50))] for _ in toks]
            got = pydeltamem.decode_batch(batched, calls, "last")
            for g, c, t in zip(got, alone, calls):
                assert rel_err(g, c.decode(t, "last")) <= DEVICE_TOL
        for b, a in zip(batched, alone):
            np.testing.assert_allclose(b.memory, a.memory, rtol=1e-4, atol=1e-5)
        for c in batched + alone:
            c.close()
