"""Chat templates: the GGUF's Jinja2 `tokenizer.chat_template`, rendered the way Hugging Face does.

Templates come from model files, so they run in Jinja2's immutable sandbox: a template can
format messages but cannot reach Python objects or mutate its inputs.

`ChatFormat` is the one place where a model's conversation becomes prompt text and tokens: the
template, the options the δ-mem reference runtime renders with (hybrid-thinking models answer
directly), OpenAI's content forms, and the BOS rule.
"""
from __future__ import annotations

import json
import warnings
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a model ships no template. ChatML is what most small instruct models were tuned on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A template that fails to compile or calls raise_exception()."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's tojson keeps non-ASCII text as is and does not HTML-escape, unlike Jinja2's built-in filter.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTags(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (SmolLM3's templates): Hugging Face uses the tags to
    mark assistant tokens for training masks; rendering a prompt keeps just what they enclose."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTags])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"invalid chat template: {e}") from e


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True, **extra: Any) -> str:
    """Renders messages ([{"role": ..., "content": ...}, ...]) into the prompt text the model expects."""
    messages = plain_messages(messages)
    try:
        return _compile(template).render(messages=messages, bos_token=bos_token,
                                         eos_token=eos_token, add_generation_prompt=add_generation_prompt,
                                         **extra)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e


def plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages with text content: OpenAI's None (a message with tool calls only)
    becomes "", and a list of text parts their texts, one per line."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    plain = []
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"each message must be a dict with a 'role', got {m!r}")
        plain.append({**m, "content": message_text(m.get("content"))} if "content" in m else dict(m))
    return plain


def message_text(content: Any) -> str:
    """The text of a message's content: a string, None (no text), or OpenAI's [{"type": "text", "text": ...}]."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"only text content parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"message content must be a string, None or a list of text parts, got {type(content).__name__}")


def model_chat_template(metadata: Mapping[str, Any]) -> str:
    """The GGUF's tokenizer.chat_template, or ChatML with a warning when the file has none."""
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        return template
    warnings.warn("the model has no tokenizer.chat_template; falling back to ChatML", UserWarning, stacklevel=3)
    return CHATML_TEMPLATE


def thinking_override(metadata: Mapping[str, Any]) -> bool | None:
    """enable_thinking as the δ-mem reference runtime renders this model's template: False for the
    hybrid-thinking families (Qwen3 models other than the -Thinking and -Instruct releases, every
    SmolLM3), whose templates would otherwise open a reasoning block; None (the template's own
    default) for everything else. The model is known by its GGUF name fields, as the reference
    knows it by the tokenizer's name."""
    name = " ".join(str(metadata.get(key, "")) for key in ("general.name", "general.basename", "general.finetune"))
    name = name.lower()
    if "qwen3" in name and "thinking" not in name and "instruct" not in name:
        return False
    if "smollm3" in name:
        return False
    return None


class ChatFormat:
    """How one model's conversations become prompt text and tokens.

    tokenize(text, add_special) must parse the text of special tokens (the template writes them).
    """

    def __init__(self, template: str, *, bos_token: str, eos_token: str,
                 tokenize: Callable[[str, bool], list[int]], enable_thinking: bool | None = None):
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._tokenize = tokenize
        self._options = {} if enable_thinking is None else {"enable_thinking": enable_thinking}

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation."""
        return render_chat(self.template, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                           add_generation_prompt=add_generation_prompt, **self._options)

    def tokens(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt tokens of a conversation: the rendered text, special tokens parsed, and a BOS
        from the tokenizer (when the model asks for one) unless the template wrote it already."""
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        return self._tokenize(text, not (self.bos_token and text.startswith(self.bos_token)))

    def text_tokens(self, text: str) -> list[int]:
        """Tokens of a piece of text alone (no BOS/EOS added), as message content tokenizes."""
        return self._tokenize(text, False)
