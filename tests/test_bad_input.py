"""Bad files and bad input raise ValueError with a message naming the problem — never a crash.

File-loading cases run in a subprocess: a segfault or abort there fails the test instead of
killing pytest. The broken files are written with gguf-py from a good tiny model.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

import pydeltamem

BASE_MODEL = "llama-gqa"

# Loads the file given on the command line; reports a ValueError on stdout, anything else fails.
_LOAD_SCRIPT = textwrap.dedent("""
    import sys
    import pydeltamem
    try:
        with pydeltamem.Model(sys.argv[1], n_ctx=32) as model:
            ctx = model.context()
            ctx.decode([1, 2, 3], logits="all")
    except ValueError as err:
        print("ValueError:", err)
        sys.exit(0)
    print("loaded without error")
    sys.exit(3)
""")


def load_in_subprocess(path: Path) -> str:
    """The ValueError message the engine gives for `path`; fails on success, other exceptions or crashes."""
    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (
        f"expected a ValueError, got exit code {proc.returncode} (negative = killed by a signal)\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    print(proc.stdout.strip())
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def good_gguf(tiny_gguf) -> Path:
    return tiny_gguf(BASE_MODEL, "f32")


def rewrite_gguf(src: Path, dst: Path, *, arch: str | None = None, drop_keys: tuple[str, ...] = (),
                 set_keys: dict | None = None, drop_tensors: tuple[str, ...] = (),
                 replace_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Copy a float GGUF with gguf-py, changing what a test needs broken."""
    reader = gguf.GGUFReader(src)
    old_arch = reader.fields["general.architecture"].contents()
    new_arch = arch or old_arch
    writer = gguf.GGUFWriter(dst, new_arch)  # writes general.architecture itself
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        main_type = fld.types[0]
        sub_type = fld.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key.replace(f"{old_arch}.", f"{new_arch}.", 1), fld.contents(), main_type, sub_type)
    for key, (value, vtype) in (set_keys or {}).items():
        writer.add_key_value(key, value, vtype)
    for tensor in reader.tensors:
        if tensor.name in drop_tensors:
            continue
        data = (replace_tensors or {}).get(tensor.name, np.array(tensor.data))
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# ----------------------------------------------------------------------------- broken files

def assert_loads_in_subprocess(path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr


def test_rewritten_copy_still_loads(good_gguf, tmp_path):
    """The rewriting helper itself produces a valid file: the failures below come from the breakage."""
    assert_loads_in_subprocess(rewrite_gguf(good_gguf, tmp_path / "copy.gguf"))


def _truncation_points(path: Path) -> dict[str, int]:
    reader = gguf.GGUFReader(path)
    size = path.stat().st_size
    return {"in the magic": 2, "in the header": 14, "in the metadata": 300,
            "in the tensor infos": reader.data_offset - 40, "in the tensor data": (reader.data_offset + size) // 2,
            "one byte short": size - 1}


@pytest.mark.parametrize("where", ["in the magic", "in the header", "in the metadata", "in the tensor infos",
                                   "in the tensor data", "one byte short"])
def test_truncated_file(good_gguf, tmp_path, where):
    cut = _truncation_points(good_gguf)[where]
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(good_gguf.read_bytes()[:cut])
    message = load_in_subprocess(broken)
    assert re.search(r"truncated|not a GGUF file|cannot parse GGUF", message), message


@pytest.mark.parametrize("offset,replacement,what", [
    (0, b"GGUX", "magic"),
    (4, (99).to_bytes(4, "little"), "version"),
    (8, (2**62).to_bytes(8, "little"), "tensor count"),
    (16, (2**62).to_bytes(8, "little"), "key/value count"),
])
def test_corrupted_header(good_gguf, tmp_path, offset, replacement, what):
    data = bytearray(good_gguf.read_bytes())
    data[offset:offset + len(replacement)] = replacement
    broken = tmp_path / "corrupt.gguf"
    broken.write_bytes(bytes(data))
    message = load_in_subprocess(broken)
    assert re.search(r"not a GGUF file|cannot parse GGUF|corrupt", message), f"{what}: {message}"


def test_not_a_gguf_file(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n" * 20)
    assert "ValueError" in load_in_subprocess(text)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        pydeltamem.Model(tmp_path / "absent.gguf")


def test_unknown_architecture(good_gguf, tmp_path):
    broken = rewrite_gguf(good_gguf, tmp_path / "arch.gguf", arch="gpt2")
    message = load_in_subprocess(broken)
    assert "gpt2" in message, message


def test_missing_tensor(good_gguf, tmp_path):
    broken = rewrite_gguf(good_gguf, tmp_path / "missing.gguf", drop_tensors=("blk.1.ffn_up.weight",))
    message = load_in_subprocess(broken)
    assert "blk.1.ffn_up.weight" in message, message


def test_wrong_tensor_shape(good_gguf, tmp_path):
    reader = gguf.GGUFReader(good_gguf)
    attn_k = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    wrong = np.zeros((attn_k.data.shape[0] + 16, attn_k.data.shape[1]), dtype=np.float32)  # one kv head too many
    broken = rewrite_gguf(good_gguf, tmp_path / "shape.gguf", replace_tensors={"blk.0.attn_k.weight": wrong})
    message = load_in_subprocess(broken)
    assert "blk.0.attn_k.weight" in message, message


def test_missing_required_key(good_gguf, tmp_path):
    broken = rewrite_gguf(good_gguf, tmp_path / "key.gguf", drop_keys=("llama.block_count",))
    message = load_in_subprocess(broken)
    assert "block_count" in message, message


def test_rope_scaling_is_rejected(good_gguf, tmp_path):
    broken = rewrite_gguf(good_gguf, tmp_path / "rope.gguf", set_keys={
        "llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
        "llama.rope.scaling.factor": (2.0, gguf.GGUFValueType.FLOAT32)})
    message = load_in_subprocess(broken)
    assert "scaling" in message.lower(), message


@pytest.mark.parametrize("key,value", [
    ("llama.attention.layer_norm_rms_epsilon", float("nan")),
    ("llama.attention.layer_norm_rms_epsilon", float("inf")),
    ("llama.attention.layer_norm_rms_epsilon", 0.0),
    ("llama.attention.layer_norm_rms_epsilon", -1e-5),
    ("llama.attention.layer_norm_rms_epsilon", 1e-30),
    ("llama.rope.freq_base", float("nan")),
    ("llama.rope.freq_base", float("-inf")),
    ("llama.rope.freq_base", 0.0),
    ("llama.rope.freq_base", -10000.0),
    ("llama.rope.freq_base", 1e30),
])
def test_out_of_range_float_hyperparameter(good_gguf, tmp_path, key, value):
    broken = rewrite_gguf(good_gguf, tmp_path / "hparam.gguf", drop_keys=(key,),
                          set_keys={key: (value, gguf.GGUFValueType.FLOAT32)})
    message = load_in_subprocess(broken)
    assert key in message and "invalid value" in message, message


def test_unusual_but_sane_float_hyperparameters_load(good_gguf, tmp_path):
    """The bounds above leave room for real models' extremes (and beyond)."""
    keys = {"llama.attention.layer_norm_rms_epsilon": 1e-10, "llama.rope.freq_base": 1e8}
    copy = rewrite_gguf(good_gguf, tmp_path / "sane.gguf", drop_keys=tuple(keys),
                        set_keys={k: (v, gguf.GGUFValueType.FLOAT32) for k, v in keys.items()})
    assert_loads_in_subprocess(copy)


def test_qwen2_requires_its_qkv_biases(tiny_gguf, tmp_path):
    broken = rewrite_gguf(tiny_gguf("qwen2-tied", "f32"), tmp_path / "nobias.gguf", drop_tensors=("blk.1.attn_k.bias",))
    message = load_in_subprocess(broken)
    assert "blk.1.attn_k.bias" in message, message


# ----------------------------------------------------------------------------- bad decode input

@pytest.fixture(scope="module")
def small_model(good_gguf):
    with pydeltamem.Model(good_gguf, n_ctx=16, n_threads=2) as model:
        yield model


@pytest.mark.parametrize("bad_id_at_end", [True, False])
def test_out_of_range_token_id(small_model, bad_id_at_end):
    ctx = small_model.context()
    for bad in (small_model.n_vocab, -1, 10**6):
        tokens = [1, 2, bad] if bad_id_at_end else [bad, 1, 2]
        with pytest.raises(ValueError, match=str(bad)):
            ctx.decode(tokens)
        assert ctx.n_past == 0, "a rejected batch must not advance the sequence"


def test_empty_input(small_model):
    ctx = small_model.context()
    with pytest.raises(ValueError, match="empty"):
        ctx.decode([])


def test_context_overflow(small_model):
    ctx = small_model.context(n_ctx=8)
    ctx.decode(list(range(1, 7)))
    with pytest.raises(ValueError, match="n_ctx|context"):
        ctx.decode([7, 8, 9])
    assert ctx.n_past == 6, "a rejected batch must not advance the sequence"
    ctx.decode([7, 8])  # exactly filling the context is fine
    with pytest.raises(ValueError, match="n_ctx|context"):
        ctx.decode([9])


def test_prefill_longer_than_context(small_model):
    ctx = small_model.context(n_ctx=8)
    with pytest.raises(ValueError, match="n_ctx|context"):
        ctx.decode(list(range(1, 10)))


def test_bad_logits_mode(small_model):
    with pytest.raises(ValueError, match="logits"):
        small_model.context().decode([1, 2], logits="first")
