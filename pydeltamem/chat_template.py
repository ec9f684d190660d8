"""Chat templates: the GGUF's Jinja2 `tokenizer.chat_template`, rendered the way Hugging Face does.

Templates come from model files, so they run in Jinja2's immutable sandbox: a template can
format messages but cannot reach Python objects or mutate its inputs.
"""
from __future__ import annotations

import json
import warnings
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
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


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
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
    _check_messages(messages)
    try:
        return _compile(template).render(messages=[dict(m) for m in messages], bos_token=bos_token,
                                         eos_token=eos_token, add_generation_prompt=add_generation_prompt,
                                         **extra)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"each message must be a dict with a 'role', got {m!r}")


def model_chat_template(metadata: Mapping[str, Any]) -> str:
    """The GGUF's tokenizer.chat_template, or ChatML with a warning when the file has none."""
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        return template
    warnings.warn("the model has no tokenizer.chat_template; falling back to ChatML", UserWarning, stacklevel=3)
    return CHATML_TEMPLATE
