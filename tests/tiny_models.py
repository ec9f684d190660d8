"""Tiny random-weight Hugging Face checkpoints and byte-level BPE tokenizers, built offline in seconds.

Reusable builders (other test modules import them):
- `train_tokenizer(pre=...)`: a byte-level BPE `tokenizers.Tokenizer` trained on a built-in text, with
  one of the pre-tokenizers our converter names ("qwen2", "llama-bpe", "smollm", "gpt-2").
- `save_tokenizer(tokenizer, folder, ...)`: tokenizer.json + tokenizer_config.json (+ chat template).
- `build_checkpoint(spec, folder)`: config → random model (std 0.2, norms and biases perturbed so
  that every weight matters) → `save_pretrained` safetensors + tokenizer files.
- `TINY_SPECS`: the checkpoints the backbone tests run (Qwen3 tied/untied, Qwen2 tied/untied with its
  q/k/v biases, Llama GQA, Llama with attention biases, SmolLM3 with a NoPE layer), varied in shapes and
  GQA ratios.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# The regexes are the converter's own constants only in name: they are the strings real
# tokenizer.json files hold (Qwen2/Qwen3 and Llama 3), restated here so the tests stay independent.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("qwen2", "llama-bpe", "smollm", "gpt-2")

TRAINING_TEXT = """\
The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is Madrid.
Memory lets a model remember what it has read: a small matrix per layer, written token by token.
In 2024 there were 365 days? No: 2024 was a leap year with 366 days, and 1,000,000 is a million.
She said "hello" and he said 'goodbye'; they're here, we've gone, I'm tired, you'll see, it'd work.
Numbers like 3.14159, 2.71828 and 42 appear in code: for i in range(10): print(i * i)
def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0
Ünïcödé text: café, naïve, Straße, 東京, Привет мир, مرحبا, 😀 emoji and tabs\tand  double  spaces.
A quick brown fox jumps over the lazy dog while the small cat watches from the warm window.
Transformers read tokens, attend to earlier tokens, and predict the next token with a softmax.
"""
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


# ----------------------------------------------------------------------------- tokenizers

def train_tokenizer(pre: str = "qwen2", vocab_size: int = 400,
                    special_tokens: tuple[str, ...] = CHAT_SPECIAL_TOKENS,
                    user_tokens: tuple[str, ...] = ("<think>",),
                    bos_token: str | None = None, text: str = TRAINING_TEXT):
    """A byte-level BPE tokenizer trained on `text`; `bos_token` (one of special_tokens) is prepended on encode."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer(pre, pre_tokenizers, Regex)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_tokens])
    if bos_token is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, tokenizer.token_to_id(bos_token))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _pre_tokenizer(pre: str, pre_tokenizers, Regex):
    if pre == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    splits = {"qwen2": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT}
    if pre not in splits:
        raise ValueError(f"unknown pre-tokenizer {pre!r}; choose from {PRE_TOKENIZERS}")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])


def save_tokenizer(tokenizer, folder: Path, *, bos_token: str | None, eos_token: str, pad_token: str | None,
                   add_bos: bool | None, chat_template: str | None = CHAT_TEMPLATE,
                   template_in_jinja_file: bool = False) -> None:
    """tokenizer.json plus a tokenizer_config.json shaped like the ones transformers writes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {str(tok_id): {"content": tok.content, "special": tok.special, "normalized": tok.normalized,
                           "lstrip": tok.lstrip, "rstrip": tok.rstrip, "single_word": tok.single_word}
             for tok_id, tok in tokenizer.get_added_tokens_decoder().items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
              "added_tokens_decoder": added, "bos_token": bos_token, "eos_token": eos_token,
              "pad_token": pad_token, "clean_up_tokenization_spaces": False}
    if add_bos is not None:
        config["add_bos_token"] = add_bos
    if chat_template is not None and template_in_jinja_file:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    elif chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


# ----------------------------------------------------------------------------- models

@dataclass(frozen=True)
class TinySpec:
    """One tiny checkpoint: the architecture, its config, and how its tokenizer and files look."""
    name: str
    architecture: str  # "llama" | "qwen2" | "qwen3" | "smollm3"
    config: dict
    pre: str = "qwen2"
    extra_vocab: int = 0  # config vocab_size = tokenizer size + this (ids nobody uses: [PADn] tokens)
    bos_token: str | None = None  # prepended by the tokenizer (add_bos) when set
    eos_token: str = "<|im_end|>"
    special_tokens: tuple[str, ...] = CHAT_SPECIAL_TOKENS
    max_shard_size: str | None = None  # set: save sharded with an index
    template_in_jinja_file: bool = False
    seed: int = 0
    tags: tuple[str, ...] = field(default_factory=tuple)


_COMMON_CONFIG = {"initializer_range": 0.2, "max_position_embeddings": 512}

TINY_SPECS: dict[str, TinySpec] = {spec.name: spec for spec in [
    TinySpec("qwen3-untied", "qwen3", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6),
        pre="qwen2", seed=1),
    TinySpec("qwen3-tied", "qwen3", dict(
        hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
        pre="qwen2", extra_vocab=13, template_in_jinja_file=True, seed=2),
    # Qwen2 has no head_dim key (hidden_size / heads) and always biases q/k/v, never o.
    TinySpec("qwen2-tied", "qwen2", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
        pre="qwen2", extra_vocab=7, seed=6),
    TinySpec("qwen2-untied", "qwen2", dict(
        hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=3, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5),
        pre="qwen2", max_shard_size="60KB", seed=7),
    TinySpec("llama-gqa", "llama", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5),
        pre="llama-bpe", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"),
        max_shard_size="40KB", seed=3),
    TinySpec("llama-bias", "llama", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True, rope_theta=10000.0,
        rms_norm_eps=1e-5),
        pre="gpt-2", extra_vocab=5, eos_token="<|endoftext|>", seed=4),
    TinySpec("smollm3-nope", "smollm3", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, tie_word_embeddings=True, rope_theta=2000000.0, rms_norm_eps=1e-6,
        no_rope_layer_interval=4),
        pre="smollm", seed=5),
]}

_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                   "smollm3": "SmolLM3Config"}


def make_config(spec: TinySpec, vocab_size: int, special_ids: dict[str, int | None]):
    import transformers

    config_class = getattr(transformers, _CONFIG_CLASSES[spec.architecture])
    return config_class(vocab_size=vocab_size, **_COMMON_CONFIG, **spec.config,
                        bos_token_id=special_ids.get("bos"), eos_token_id=special_ids.get("eos"),
                        pad_token_id=special_ids.get("pad"))


# Weights ~ N(0, 0.2) everywhere make a random network chaotic: sharp attention and a saturated
# SwiGLU amplify q8_0's 0.2% weight rounding into ~10% logit changes (transformers itself, run on
# the rounded weights, moves that much; so does llama.cpp on our files). Halving the q/k and MLP
# matrices keeps logits far from flat (max |logit| ≈ 5-7) while the comparison measures the engine.
_DAMPED_MATRICES = {"q_proj": 0.5, "k_proj": 0.5, "mlp.": 0.5}


def random_model(config, seed: int):
    """A float32 model with weights ~ N(0, initializer_range) (q/k/MLP damped, see above); norm gains and
    biases randomised too, because their defaults (ones, zeros) would hide code that ignored them."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif param.ndim == 1:
                param.copy_(0.2 * torch.randn_like(param))
            for marker, factor in _DAMPED_MATRICES.items():
                if marker in name and param.ndim == 2:
                    param.mul_(factor)
    return model.eval()


def build_checkpoint(spec: TinySpec, folder: Path) -> Path:
    """Write the tiny checkpoint `spec` to `folder` (config.json, safetensors, tokenizer files)."""
    folder = Path(folder)
    tokenizer = train_tokenizer(pre=spec.pre, special_tokens=spec.special_tokens, bos_token=spec.bos_token)
    pad_token = spec.special_tokens[0] if spec.special_tokens[0] != spec.bos_token else spec.special_tokens[1]
    special_ids = {"bos": tokenizer.token_to_id(spec.bos_token) if spec.bos_token else None,
                   "eos": tokenizer.token_to_id(spec.eos_token), "pad": tokenizer.token_to_id(pad_token)}
    config = make_config(spec, tokenizer.get_vocab_size() + spec.extra_vocab, special_ids)
    model = random_model(config, spec.seed)
    save_kwargs = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    save_tokenizer(tokenizer, folder, bos_token=spec.bos_token, eos_token=spec.eos_token, pad_token=pad_token,
                   add_bos=spec.bos_token is not None, template_in_jinja_file=spec.template_in_jinja_file)
    return folder


def load_reference(folder: Path):
    """The Hugging Face float32 model from a checkpoint folder, the oracle for logits."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def reference_logits(model, token_ids) -> "np.ndarray":
    """float32 logits at every position, [len(token_ids), n_vocab]."""
    import numpy as np
    import torch

    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)], dtype=torch.long))
    return out.logits[0].to(torch.float32).numpy().astype(np.float32)
