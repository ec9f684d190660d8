"""`deltamem quantize IN.gguf OUT.gguf TYPE`: re-encode a GGUF model's weights with ggml's quantizers.

The type names are llama.cpp's: plain types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q6_K; F16, BF16, F32) and the k-quant
mixes (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M), in which a few sensitive tensors (attention v,
FFN down, attention output, the output matrix) get more bits than the rest. The rules are written
down in docs/quantization.md; `tensor_type` below is their only implementation.

How a file is processed: every tensor is read (memory-mapped) with gguf-py, tensors that are not
quantized (norms, biases, every 1-D tensor, δ-mem adapter tensors) are copied byte for byte, the
others are dequantized to float32 with gguf-py and quantized by ggml through the native extension
(`_core.quantize_rows`, multi-threaded over rows). A tensor already stored in its target type is
copied as is. Metadata is copied; general.file_type and general.quantization_version are set.
The output is written to a temporary file beside OUT and renamed into place only when complete.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .gguf_io import copy_metadata, write_gguf

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@dataclass(frozen=True)
class Mix:
    """A quantization type as users name it: the default tensor type and llama.cpp's file type id."""
    name: str
    base: Q
    file_type: FT


MIXES: dict[str, Mix] = {m.name: m for m in [
    Mix("Q8_0", Q.Q8_0, FT.MOSTLY_Q8_0),
    Mix("Q4_0", Q.Q4_0, FT.MOSTLY_Q4_0),
    Mix("Q4_1", Q.Q4_1, FT.MOSTLY_Q4_1),
    Mix("Q5_0", Q.Q5_0, FT.MOSTLY_Q5_0),
    Mix("Q5_1", Q.Q5_1, FT.MOSTLY_Q5_1),
    Mix("Q2_K", Q.Q2_K, FT.MOSTLY_Q2_K),
    Mix("Q3_K_S", Q.Q3_K, FT.MOSTLY_Q3_K_S),
    Mix("Q3_K_M", Q.Q3_K, FT.MOSTLY_Q3_K_M),
    Mix("Q3_K_L", Q.Q3_K, FT.MOSTLY_Q3_K_L),
    Mix("Q4_K_S", Q.Q4_K, FT.MOSTLY_Q4_K_S),
    Mix("Q4_K_M", Q.Q4_K, FT.MOSTLY_Q4_K_M),
    Mix("Q5_K_S", Q.Q5_K, FT.MOSTLY_Q5_K_S),
    Mix("Q5_K_M", Q.Q5_K, FT.MOSTLY_Q5_K_M),
    Mix("Q6_K", Q.Q6_K, FT.MOSTLY_Q6_K),
    # Plain float targets: every weight matrix in that type, no mix rules (as llama-quantize does).
    Mix("F16", Q.F16, FT.MOSTLY_F16),
    Mix("BF16", Q.BF16, FT.MOSTLY_BF16),
    Mix("F32", Q.F32, FT.ALL_F32),
]}
_FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)

# When a tensor's rows do not divide into the chosen type's blocks, llama.cpp moves to a type with
# smaller blocks (32 values) of similar size; f16 is the last resort (it fits any row). The table is
# llama-quantize's (llama.cpp as vendored in llama-cpp-python 0.3.36; older llama.cpp sent q2_K/q3_K to
# iq4_nl instead of q4_0).
_FALLBACK = {
    Q.Q2_K: Q.Q4_0,
    Q.Q3_K: Q.Q4_0,
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def find_mix(type_name: str) -> Mix:
    """The mix named `type_name` (case-insensitive), or ValueError listing the supported names."""
    mix = MIXES.get(str(type_name).upper())
    if mix is None:
        raise ValueError(f"unsupported quantization type {type_name!r}; choose one of {', '.join(MIXES)}")
    return mix


# ----------------------------------------------------------------------------- the mix rules

@dataclass(frozen=True)
class ModelFacts:
    """What the rules look at besides a tensor's name and shape."""
    n_layer: int
    n_gqa: int          # query heads per key/value head (layer 0)
    has_output: bool    # False: the output matrix is tied to token_embd


def use_more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of layers that get a bigger type in the _M mixes: the first and last eighth
    of the stack, and every third layer in between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def should_quantize(name: str, n_dims: int) -> bool:
    """Weight matrices are quantized; norms, biases, 1-D tensors and δ-mem adapter tensors are not."""
    if ".dmem_" in name:
        return False  # the adapter's small matrices stay as the adapter converter wrote them
    return name.endswith("weight") and n_dims >= 2 and not name.endswith("_norm.weight")


def tensor_type(mix: Mix, name: str, facts: ModelFacts) -> Q:
    """The type the mix gives tensor `name`, before checking that its rows fit the type's blocks."""
    if mix.base in _FLOAT_TYPES:
        return mix.base
    if name == "output.weight" or (name == "token_embd.weight" and not facts.has_output):
        # The output matrix (or the embedding that doubles as it) decides every logit: 6 bits.
        return Q.Q8_0 if mix.base == Q.Q8_0 else Q.Q6_K
    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else -1
    role = name[match.end():] if match else name
    if role == "attn_v.weight":
        return _attn_v_type(mix, layer, facts)
    if role == "ffn_down.weight":
        return _ffn_down_type(mix, layer, facts.n_layer)
    if role == "attn_output.weight":
        return {"Q2_K": Q.Q3_K, "Q3_K_M": Q.Q4_K, "Q3_K_L": Q.Q5_K}.get(mix.name, mix.base)
    return mix.base


def _attn_v_type(mix: Mix, layer: int, facts: ModelFacts) -> Q:
    name = mix.name
    if name == "Q2_K":
        return Q.Q4_K if facts.n_gqa >= 4 else Q.Q3_K
    if name == "Q3_K_M":
        return Q.Q5_K if layer < 2 else Q.Q4_K
    if name == "Q3_K_L":
        return Q.Q5_K
    if name in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, facts.n_layer):
        return Q.Q6_K
    if name == "Q4_K_S" and layer < 4:
        return Q.Q5_K
    return mix.base


def _ffn_down_type(mix: Mix, layer: int, n_layer: int) -> Q:
    name = mix.name
    if name == "Q2_K":
        return Q.Q3_K
    if name == "Q3_K_M":
        return Q.Q5_K if layer < n_layer // 16 else Q.Q4_K
    if name == "Q3_K_L":
        return Q.Q5_K
    if name in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layer):
        return Q.Q6_K
    if name == "Q4_K_S" and layer < n_layer // 8:
        return Q.Q5_K
    return mix.base


def fit_type(qtype: Q, row_length: int) -> tuple[Q, str | None]:
    """`qtype` when rows of `row_length` values divide into its blocks, else the fallback (and a note)."""
    def fits(t: Q) -> bool:
        return row_length % gguf.GGML_QUANT_SIZES[t][0] == 0

    if fits(qtype):
        return qtype, None
    chosen = _FALLBACK.get(qtype, Q.F16)
    if not fits(chosen):
        chosen = Q.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return chosen, (f"row length {row_length} is not a multiple of {qtype.name}'s block size {block}; "
                    f"using {chosen.name}")


def plan_type(mix: Mix, name: str, row_length: int, facts: ModelFacts) -> tuple[Q, str | None]:
    """Target type of a quantizable tensor: the mix rule, then the block-size fallback."""
    return fit_type(tensor_type(mix, name, facts), row_length)


# ----------------------------------------------------------------------------- numbers in, bytes out

def quantize_array(values: np.ndarray, qtype: Q, n_threads: int = 1) -> np.ndarray:
    """Quantize float values (last axis = rows) to `qtype` with ggml; uint8 [..., row_bytes]."""
    from . import _core

    values = np.ascontiguousarray(values, dtype=np.float32)
    rows = values.reshape(-1, values.shape[-1])
    if qtype in (Q.F32, Q.F16):
        # Plain float storage needs no ggml call; numpy rounds f16 the same way (to nearest even).
        out = rows.astype(np.float16 if qtype == Q.F16 else np.float32)
        return out.view(np.uint8).reshape(*values.shape[:-1], -1)
    packed = _core.quantize_rows(int(qtype), rows, max(1, int(n_threads)))
    return packed.reshape(*values.shape[:-1], packed.shape[-1])


def dequantize_raw(raw: np.ndarray, qtype: Q, row_length: int) -> np.ndarray:
    """float32 [n_rows, row_length] from a tensor's raw bytes, with gguf-py."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = row_length // block * type_size
    rows = np.asarray(raw, dtype=np.uint8).reshape(-1, row_bytes)
    try:
        values = gguf.quants.dequantize(rows, qtype)
    except NotImplementedError as e:
        raise ValueError(f"cannot read tensors of type {qtype.name} ({e})") from None
    return np.asarray(values, dtype=np.float32).reshape(-1, row_length)


# ----------------------------------------------------------------------------- reading the input

@dataclass
class TensorJob:
    """One tensor of the output: where its bytes come from and what they become."""
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    src_type: Q
    offset: int             # of the raw data in the input file
    n_bytes: int
    dst_type: Q
    note: str | None = None

    @property
    def row_length(self) -> int:
        return self.shape[0]

    @property
    def converts(self) -> bool:
        return self.dst_type != self.src_type

    def dst_bytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.dst_type]
        return int(np.prod(self.shape[1:], dtype=np.int64)) * (self.row_length // block) * type_size

    def dst_byte_shape(self) -> tuple[int, ...]:
        """numpy order, last axis in bytes (what GGUFWriter.add_tensor_info takes with raw_dtype)."""
        block, type_size = gguf.GGML_QUANT_SIZES[self.dst_type]
        return (*reversed(self.shape[1:]), self.row_length // block * type_size)


def open_gguf(path: Path) -> gguf.GGUFReader:
    """The memory-mapped input, or ValueError saying why it is not a usable GGUF file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises a zoo of errors (struct, index, value) on bad bytes
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path}: truncated: tensor {t.name!r} ends past the end of the file")
    return reader


def _scalar(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def model_facts(reader: gguf.GGUFReader) -> ModelFacts:
    arch = _scalar(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ValueError("the file has no general.architecture")
    names = {t.name for t in reader.tensors}
    n_layer = _scalar(reader, f"{arch}.block_count")
    if n_layer is None:  # fall back to counting the layers that have attention v weights
        n_layer = sum(1 for n in names if n.endswith(".attn_v.weight"))
    n_head = _scalar(reader, f"{arch}.attention.head_count", 1)
    n_head_kv = _scalar(reader, f"{arch}.attention.head_count_kv", n_head)
    n_head = n_head[0] if isinstance(n_head, list) else n_head
    n_head_kv = n_head_kv[0] if isinstance(n_head_kv, list) else n_head_kv
    n_gqa = int(n_head) // int(n_head_kv) if n_head_kv else 1
    return ModelFacts(n_layer=int(n_layer), n_gqa=n_gqa, has_output="output.weight" in names)


def plan_jobs(reader: gguf.GGUFReader, mix: Mix) -> list[TensorJob]:
    facts = model_facts(reader)
    jobs = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in t.shape)
        src_type = Q(int(t.tensor_type))
        job = TensorJob(t.name, shape, src_type, int(t.data_offset), int(t.n_bytes), src_type)
        if should_quantize(t.name, len(shape)):
            job.dst_type, job.note = plan_type(mix, t.name, shape[0], facts)
        jobs.append(job)
    return jobs


# ----------------------------------------------------------------------------- writing the output

_SET_BY_US = ("general.architecture", "general.file_type", "general.quantization_version")


def _copy_metadata(writer: gguf.GGUFWriter, reader: gguf.GGUFReader, mix: Mix) -> None:
    copy_metadata(writer, reader, skip=_SET_BY_US)
    writer.add_file_type(int(mix.file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _encode(job: TensorJob, raw: np.ndarray, n_threads: int) -> np.ndarray:
    if not job.converts:
        return np.asarray(raw, dtype=np.uint8)
    values = dequantize_raw(raw, job.src_type, job.row_length)
    try:
        return quantize_array(values, job.dst_type, n_threads)
    except ValueError as e:
        raise ValueError(f"tensor {job.name!r}: {e}") from None


@dataclass
class QuantizeResult:
    jobs: list[TensorJob]
    notes: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0


def quantize_gguf(in_path: str | os.PathLike, out_path: str | os.PathLike, type_name: str, *,
                  n_threads: int | None = None, force: bool = False, progress: bool = True) -> QuantizeResult:
    """Quantize the GGUF model `in_path` to `out_path` with the mix `type_name` (e.g. "Q4_K_M")."""
    from tqdm import tqdm

    mix = find_mix(type_name)
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.exists() and not force:
        raise FileExistsError(f"{out_path}: already exists (use --force to overwrite)")
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise ValueError("the output file must differ from the input file")
    n_threads = n_threads if n_threads and n_threads > 0 else (os.cpu_count() or 1)
    reader = open_gguf(in_path)
    jobs = plan_jobs(reader, mix)
    result = QuantizeResult(jobs, [f"{j.name}: {j.note}" for j in jobs if j.note],
                            bytes_in=sum(j.n_bytes for j in jobs), bytes_out=sum(j.dst_bytes() for j in jobs))

    writer = gguf.GGUFWriter(None, _scalar(reader, "general.architecture"))
    _copy_metadata(writer, reader, mix)
    for job in jobs:
        writer.add_tensor_info(job.name, job.dst_byte_shape(), np.dtype(np.uint8), job.dst_bytes(),
                               raw_dtype=job.dst_type)

    def write_tensors(bar) -> None:
        for job in jobs:
            bar.set_postfix_str(job.name, refresh=False)
            raw = reader.data[job.offset:job.offset + job.n_bytes]
            writer.write_tensor_data(_encode(job, raw, n_threads))
            bar.update(job.n_bytes)

    with tqdm(total=result.bytes_in, unit="B", unit_scale=True, desc=f"{out_path.name} ({mix.name})",
              disable=not progress) as bar:
        write_gguf(writer, out_path, lambda: write_tensors(bar))
    return result


# ----------------------------------------------------------------------------- command line

def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize", help="quantize a GGUF model (llama.cpp's type names and mixes)",
        description="Re-encode the weight matrices of a GGUF model with ggml's quantizers. TYPE is one of "
                    f"{', '.join(MIXES)} (case-insensitive); the _S/_M/_L mixes give a few sensitive tensors "
                    "more bits, as llama.cpp does (docs/quantization.md). Norms, 1-D tensors and δ-mem "
                    "adapter tensors are copied unchanged.")
    parser.add_argument("input", metavar="IN.gguf", help="model to quantize (any tensor types gguf-py can read)")
    parser.add_argument("output", metavar="OUT.gguf", help="file to write")
    parser.add_argument("type", metavar="TYPE", help="quantization type, e.g. Q4_K_M")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="threads for quantizing (default: all cores)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_cli)


def summarize_notes(jobs: list[TensorJob], max_names: int = 3) -> list[str]:
    """One line per distinct fallback (same note text), naming a few of the tensors it hit."""
    by_note: dict[str, list[str]] = {}
    for job in jobs:
        if job.note:
            by_note.setdefault(job.note, []).append(job.name)
    lines = []
    for note, names in by_note.items():
        shown = ", ".join(names[:max_names]) + (f" and {len(names) - max_names} more" if len(names) > max_names else "")
        lines.append(f"{note} ({len(names)} tensor{'s' if len(names) > 1 else ''}: {shown})")
    return lines


def _run_cli(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be at least 1")
    result = quantize_gguf(args.input, args.output, args.type, n_threads=args.threads, force=args.force,
                           progress=not args.no_progress)
    for note in summarize_notes(result.jobs):
        print(f"note: {note}", file=sys.stderr)
    mib = 1024 * 1024
    print(f"wrote {args.output}: {result.bytes_in / mib:.2f} MiB -> {result.bytes_out / mib:.2f} MiB "
          f"({find_mix(args.type).name})", file=sys.stderr)
    return 0
