"""Tokenizer metadata for GGUF from a Hugging Face byte-level BPE tokenizer (tokenizer.json + friends).

Written in llama.cpp's conventions (`tokenizer.ggml.*` keys, model "gpt2"), so llama.cpp and our
engine read the same vocabulary: tokens as the byte-level strings of tokenizer.json ordered by id,
token types, "a b" merges, and the pre-tokenizer named by llama.cpp's names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

# The split regexes that identify a pre-tokenizer (as stored in tokenizer.json, after JSON decoding).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEX_TO_PRE = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}

# Tokens that end a chat turn, by family; the first one present becomes eot_token_id.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|end|>")


@dataclass
class TokenizerMetadata:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos"/"eos"/"pad"/"eot" → id
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | list | None = None

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        setters = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "pad": writer.add_pad_token_id,
            "eot": writer.add_eot_token_id,
        }
        for kind, token_id in self.special_ids.items():
            setters[kind](token_id)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_tokenizer(folder: Path, n_vocab: int, model_config: dict) -> TokenizerMetadata:
    """Everything the GGUF needs about the tokenizer in `folder`; `n_vocab` is the embedding's row count."""
    folder = Path(folder)
    tokenizer_json = _load_json(folder / "tokenizer.json", required=True)
    tokenizer_config = _load_json(folder / "tokenizer_config.json", required=False)
    generation_config = _load_json(folder / "generation_config.json", required=False)

    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json: model type {model.get('type')!r} is not supported; only byte-level BPE is")
    if model.get("byte_fallback"):
        raise ValueError("tokenizer.json: BPE with byte_fallback (SentencePiece style) is not supported; only byte-level BPE is")

    tokens, token_types = _tokens_and_types(model["vocab"], tokenizer_json.get("added_tokens", []), n_vocab)
    id_of = {tok: i for i, tok in enumerate(tokens)}
    return TokenizerMetadata(
        tokens=tokens,
        token_types=token_types,
        merges=_merges(model.get("merges", [])),
        pre=identify_pre_tokenizer(tokenizer_json),
        special_ids=_special_ids(id_of, n_vocab, tokenizer_config, model_config, generation_config),
        add_bos=_add_bos(tokenizer_config, tokenizer_json, id_of),
        add_eos=tokenizer_config.get("add_eos_token"),
        chat_template=_chat_template(folder, tokenizer_config),
    )


def _load_json(path: Path, *, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: missing (a Hugging Face tokenizer.json is required)")
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _tokens_and_types(vocab: dict[str, int], added_tokens: list[dict], n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings ordered by id, with llama.cpp's token types; ids nobody uses become [PAD{i}] (unused)."""
    by_id: dict[int, tuple[str, int]] = {i: (tok, gguf.TokenType.NORMAL) for tok, i in vocab.items()}
    for added in added_tokens:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    too_large = [i for i in by_id if i >= n_vocab]
    if too_large:
        raise ValueError(
            f"tokenizer.json has token id {max(too_large)} but the model's vocab_size is {n_vocab}; "
            "the tokenizer does not belong to this model")
    tokens, types = [], []
    for i in range(n_vocab):
        tok, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(tok)
        types.append(int(kind))
    return tokens, types


def _merges(merges: list) -> list[str]:
    """tokenizer.json stores merges as "a b" strings (older) or [a, b] pairs (newer); GGUF wants "a b"."""
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
        elif isinstance(merge, (list, tuple)) and len(merge) == 2:
            out.append(f"{merge[0]} {merge[1]}")
        else:
            raise ValueError(f"tokenizer.json: unreadable merge entry {merge!r}")
    return out


def identify_pre_tokenizer(tokenizer_json: dict) -> str:
    """Name the pre-tokenizer (llama.cpp's `tokenizer.ggml.pre` names) from tokenizer.json's structure."""
    normalizer = tokenizer_json.get("normalizer")
    pre = tokenizer_json.get("pre_tokenizer")
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    normalizer_kind = normalizer.get("type") if normalizer else None

    if normalizer_kind not in (None, "NFC"):
        raise ValueError(f"tokenizer.json: unsupported normalizer {normalizer_kind!r} (supported: none, NFC)")
    for step in steps:
        if step.get("type") == "ByteLevel" and step.get("add_prefix_space"):
            raise ValueError("tokenizer.json: ByteLevel with add_prefix_space=true is not supported")

    name = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            name = _SPLIT_REGEX_TO_PRE.get(regex)
    if name is None:
        raise ValueError(
            "tokenizer.json: unknown pre-tokenizer (supported: gpt-2 ByteLevel, smollm Digits+ByteLevel, "
            f"qwen2 and llama-bpe Split regexes); found normalizer={normalizer_kind!r}, "
            f"pre_tokenizer={json.dumps(pre)[:400]}")
    if normalizer_kind == "NFC" and name != "qwen2":
        raise ValueError(f"tokenizer.json: NFC normalizer with the {name!r} pre-tokenizer is not supported")
    return name


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as plain strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: Any) -> int | None:
    """config.json's eos_token_id may be one id or a list of ids; the first is the canonical one."""
    if isinstance(value, list):
        return value[0] if value else None
    return value if isinstance(value, int) else None


def _special_ids(id_of: dict[str, int], n_vocab: int, tokenizer_config: dict, model_config: dict,
                 generation_config: dict) -> dict[str, int]:
    ids: dict[str, int] = {}
    for kind in ("bos", "eos", "pad"):
        content = _token_content(tokenizer_config.get(f"{kind}_token"))
        if content is not None and content in id_of:
            ids[kind] = id_of[content]
            continue
        for source in (generation_config, model_config):
            token_id = _first_id(source.get(f"{kind}_token_id"))
            if token_id is not None and 0 <= token_id < n_vocab:
                ids[kind] = token_id
                break
    eot = next((tok for tok in _END_OF_TURN_TOKENS if tok in id_of), None)
    if eot is not None:
        ids["eot"] = id_of[eot]
    return ids


def _add_bos(tokenizer_config: dict, tokenizer_json: dict, id_of: dict[str, int]) -> bool:
    """Explicit add_bos_token wins; otherwise: does the post-processor put a special token first?"""
    if isinstance(tokenizer_config.get("add_bos_token"), bool):
        return tokenizer_config["add_bos_token"]
    return _post_processor_prepends_special(tokenizer_json.get("post_processor"))


def _post_processor_prepends_special(post: dict | None) -> bool:
    if not post:
        return False
    if post.get("type") == "Sequence":
        return any(_post_processor_prepends_special(p) for p in post.get("processors", []))
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        return bool(single) and "SpecialToken" in single[0]
    return False


def _chat_template(folder: Path, tokenizer_config: dict) -> str | list | None:
    template = tokenizer_config.get("chat_template")
    if template:
        return template
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    chat_json = folder / "chat_template.json"
    if chat_json.is_file():
        return json.loads(chat_json.read_text(encoding="utf-8")).get("chat_template")
    return None
