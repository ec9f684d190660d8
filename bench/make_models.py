"""Models for the benchmark: a random δ-mem adapter for any model GGUF, and a mid-size random Qwen3.

- `adapter_for(model_gguf)`: a random adapter in the release configuration (rank 8, alpha 16,
  delta_heads q,o, token writes, standard update, coupled λ, rankwise gates, one state head), shaped
  from the model GGUF's metadata, written in the reference release format (bf16 safetensors) and
  converted with our converter. Cached by the model's path, size and mtime.
- `qwen3_model(quant)`: a Qwen3-shaped checkpoint with random N(0, 0.02) weights (`QWEN3_05B`,
  ~0.5B parameters), written as Hugging Face safetensors + a byte-level tokenizer, converted to q8_0
  by our converter; q4_0 is re-quantised from it (`pydeltamem.quantize` when present, else gguf-py's
  numpy Q4_0 quantiser). Cached, so a rerun does not rebuild it.

Only numpy and gguf are needed (no torch): the checkpoint is written tensor by tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

# Qwen3-0.6B's body (hidden 1024, 28 layers, 16 heads / 8 kv heads of 128, intermediate 3072) with a
# 48k vocabulary instead of 152k: 0.49B parameters with tied embeddings.
QWEN3_05B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 49152,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "hidden_act": "silu",
    "torch_dtype": "float16",
}
QWEN3_NAME = "qwen3-0.5b"

RELEASE_ADAPTER_CONFIG = {
    "rank": 8,
    "alpha": 16,
    "beta_bias_init": -2.0,
    "normalize_qk": True,
    "couple_lambda": True,
    "state_update_mode": "standard",
    "rankwise_gates": True,
    "num_state_heads": 1,
    "memory_write_granularity": "token",
    "delta_heads": ["q", "o"],
    "target_layers": None,
    "delta_o_rmsnorm": False,
    "delta_o_rmsnorm_eps": 1e-6,
    "trainable_delta_scale": False,
    "delta_scale_max": 2.0,
    "delta_scale_granularity": "layer",
    "memory_readout_mode": "delta",
}


def cache_dir() -> Path:
    """$PYDELTAMEM_BENCH_CACHE, else ~/.cache/pydeltamem-bench."""
    d = Path(os.environ.get("PYDELTAMEM_BENCH_CACHE") or Path.home() / ".cache" / "pydeltamem-bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------- safetensors writer

def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, shapes: dict[str, tuple[tuple[int, ...], str]], produce) -> None:
    """Streamed safetensors writer: `shapes` = {name: (shape, "F16"|"BF16"|"F32")}, `produce(name)` →
    the tensor's bytes-compatible numpy array (uint16 for BF16). One tensor in memory at a time."""
    itemsize = {"F16": 2, "BF16": 2, "F32": 4}
    header, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        n = int(np.prod(shape)) * itemsize[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, dtype) in shapes.items():
            data = np.ascontiguousarray(produce(name))
            if data.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise AssertionError(f"{name}: produced {data.nbytes} bytes for {shape} {dtype}")
            f.write(data.tobytes())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- δ-mem adapter

def adapter_tensors(block_count: int, n_embd: int, widths: dict[str, int], seed: int = 0,
                    config: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, {source key: float32 array}) for a random adapter in the release configuration."""
    config = {**RELEASE_ADAPTER_CONFIG, **(config or {})}
    rng = np.random.default_rng(seed)
    D = config["rank"] * config["num_state_heads"]
    gate = D if config["rankwise_gates"] else config["num_state_heads"]

    def normal(*shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    tensors = {}
    for layer in range(block_count):
        p = f"model.layers.{layer}.self_attn."
        for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
            tensors[p + name] = normal(D, n_embd, std=1.0 / math.sqrt(n_embd))
        tensors[p + "beta_proj"] = normal(gate, n_embd, std=0.5 / math.sqrt(n_embd))
        tensors[p + "beta_bias"] = np.full(gate, config["beta_bias_init"], np.float32) + normal(gate, std=0.1)
        for head in ("q", "k", "v", "o"):   # the release stores inactive heads too, as zeros
            if head in config["delta_heads"]:
                tensors[p + f"delta_{head}_proj"] = normal(widths[head], D, std=0.3 / math.sqrt(D))
            else:
                tensors[p + f"delta_{head}_proj"] = np.zeros((widths[head], D), np.float32)
    return config, tensors


def write_release_adapter(folder: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    """delta_mem_config.json + delta_mem_adapter.safetensors (bf16, as released)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "delta_mem_config.json").write_text(json.dumps(config, indent=2))
    shapes = {k: (v.shape, "BF16") for k, v in tensors.items()}
    write_safetensors(folder / "delta_mem_adapter.safetensors", shapes, lambda k: _bf16_bits(tensors[k]))
    return folder


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


def adapter_for(model_gguf: str | os.PathLike, out_dir: str | os.PathLike | None = None, seed: int = 0,
                outtype: str = "auto") -> Path:
    """A random release-configuration δ-mem adapter GGUF for `model_gguf` (cached), converted from
    its bf16 release files with `outtype` (convert-adapter's: auto gives f16 here)."""
    from pydeltamem.convert.adapter import convert_adapter, load_backbone

    model_gguf = Path(model_gguf)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / "adapters"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{model_gguf.stem}-dmem-r8-{_file_key(model_gguf)}-s{seed}-{outtype}.gguf"
    if out.is_file():
        return out
    backbone = load_backbone(model_gguf)
    config, tensors = adapter_tensors(backbone.block_count, backbone.n_embd, dict(backbone.widths), seed)
    src = out_dir / (out.stem + "-release")
    write_release_adapter(src, config, tensors)
    convert_adapter(src, out, base=model_gguf, outtype=outtype)
    return out


# ----------------------------------------------------------------------------- random Qwen3

def byte_level_tokenizer() -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json): byte-level BPE, the 256 byte symbols, <|endoftext|>
    and a handful of merges; the embedding's other rows become unused [PAD] tokens in the GGUF."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): i for i, c in enumerate(cs)}
    eos = "<|endoftext|>"
    merges = ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r"]
    for m in merges:
        vocab[m.replace(" ", "")] = 257 + len(vocab) - 256
    tok = {
        "version": "1.0",
        "added_tokens": [{"id": 256, "content": eos, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": merges},
    }
    tok_config = {"eos_token": eos, "bos_token": None, "add_bos_token": False}
    return tok, tok_config


def qwen3_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes ([out, in]) of a Qwen3ForCausalLM."""
    h, hd, ff = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nq, h),
            p + "self_attn.k_proj.weight": (nkv, h),
            p + "self_attn.v_proj.weight": (nkv, h),
            p + "self_attn.o_proj.weight": (h, nq),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (ff, h),
            p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        })
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def n_params(cfg: dict) -> int:
    return sum(int(np.prod(s)) for s in qwen3_tensor_shapes(cfg).values())


def write_random_qwen3(folder: str | os.PathLike, cfg: dict = QWEN3_05B, seed: int = 0) -> Path:
    """A Hugging Face Qwen3 checkpoint folder with random N(0, 0.02) f16 weights (norms 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = qwen3_tensor_shapes(cfg)

    def produce(name):
        shape = shapes[name]
        if len(shape) == 1:
            return np.ones(shape, np.float16)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    write_safetensors(folder / "model.safetensors", {k: (s, "F16") for k, s in shapes.items()}, produce)
    tok, tok_config = byte_level_tokenizer()
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 256}, indent=2))
    return folder


def requantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str = "q4_0") -> Path:
    """Re-quantise every 2-D weight of a model GGUF to `qtype` (norms stay as they are).

    Uses `pydeltamem.quantize.quantize_gguf` (llama.cpp's mix for the type) when present and willing,
    else gguf-py's numpy quantiser on every 2-D weight (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)."""
    import gguf
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf import quants

    src, dst = Path(src), Path(dst)
    try:  # `deltamem quantize` (llama.cpp's type mixes), when this version has it
        from pydeltamem.quantize import quantize_gguf  # type: ignore
    except ImportError:
        quantize_gguf = None
    if quantize_gguf is not None:
        try:
            quantize_gguf(src, dst, qtype.upper(), force=True, progress=False)
            return dst
        except (ValueError, TypeError):   # e.g. it refuses an already-quantised input
            pass
    target = gguf.GGMLQuantizationType[qtype.upper()]
    ftype = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
             "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
             "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[target.name]
    reader = GGUFReader(src, "r")
    arch = reader.fields["general.architecture"].contents()
    tmp = Path(str(dst) + ".tmp")
    writer = GGUFWriter(tmp, arch)
    for key, field_ in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field_.contents()
        if key == "general.file_type":
            value = int(ftype)
        main_type = field_.types[0]
        if main_type == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, main_type, sub_type=field_.types[-1])
        else:
            writer.add_key_value(key, value, main_type)
    block = gguf.GGML_QUANT_SIZES[target][0]
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]
        if len(ne) == 2 and ne[0] % block == 0:
            w = quants.dequantize(t.data, t.tensor_type).reshape(ne[1], ne[0]).astype(np.float32)
            writer.add_tensor(t.name, quants.quantize(w, target), raw_dtype=target)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def qwen3_model(quant: str = "q8_0", cfg: dict = QWEN3_05B, name: str = QWEN3_NAME,
                folder: str | os.PathLike | None = None, log=print) -> Path:
    """The cached random Qwen3 GGUF at `quant` (q8_0 from our converter; others re-quantised from it)."""
    from pydeltamem.convert.hf_to_gguf import OUTTYPES, convert_hf_to_gguf

    folder = Path(folder) if folder is not None else cache_dir()
    out = folder / f"{name}-{quant}.gguf"
    if out.is_file():
        return out
    hf_dir = folder / f"{name}-hf"
    if not (hf_dir / "config.json").is_file():
        log(f"[bench] writing a random Qwen3 checkpoint ({n_params(cfg) / 1e6:.0f}M parameters) to {hf_dir}")
        write_random_qwen3(hf_dir, cfg)
    if quant in OUTTYPES:
        log(f"[bench] converting {hf_dir} → {out}")
        convert_hf_to_gguf(hf_dir, out, quant, name=name, progress=False)
        return out
    q8 = qwen3_model("q8_0", cfg, name, folder, log)
    log(f"[bench] re-quantising {q8} → {out}")
    return requantize(q8, out, quant)
