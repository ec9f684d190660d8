"""The server's requests: OpenAI's JSON fields checked and turned into the engine's arguments, and
OpenAI's error shape. Every malformed request is an APIError with a 4xx status naming the field."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..chat_template import plain_messages
from ..sampling import SamplingParams, sampling_params

# A session id: letters, digits and . _ : - (no path separators, no quotes), at most 128 characters.
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ROLES = ("system", "user", "assistant")
MAX_STOP = 16          # stop strings a request may give
MAX_STOP_CHARS = 256   # characters in one stop string


class APIError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "code"}} (OpenAI's shape)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- fields ----

def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise bad(f"'{key}' must be a number from {low:g} to {high:g}, got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad(f"'{key}' must be an integer from {low} to {high}, got {value!r}", key)
    return value


def _boolean(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be true or false, got {value!r}", key)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad(f"'stop' must be a string or a list of at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} "
                  "characters", "stop")
    return stops


def _logit_bias(body: dict, n_vocab: int) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict) or len(bias) > 1024:
        raise bad("'logit_bias' must be an object of at most 1024 token ids to biases", "logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token < n_vocab:
            raise bad(f"'logit_bias': token {token} is out of range (the vocabulary has {n_vocab})", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad(f"'logit_bias' values must be numbers from -100 to 100, got {value!r}", "logit_bias")
        out[token] = float(value)
    return out


def session_id(value: Any) -> str:
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise bad("a session id is 1 to 128 characters: letters, digits and . _ : - (starting with a letter or "
                  "digit)", "session_id", code="invalid_session_id")
    return value


@dataclass(frozen=True)
class Generate:
    """What a completion request asks of the engine, beside its prompt."""
    sampling: SamplingParams
    max_tokens: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    write: bool


def generate_fields(body: dict, defaults: SamplingParams, *, n_vocab: int) -> Generate:
    if _integer(body, "n", 1, 1) not in (None, 1):
        raise bad("'n' must be 1: one choice per request", "n")
    # Larger than the context is fine: generation ends when the context is full.
    max_tokens = _integer(body, "max_completion_tokens", 1, 2**31 - 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 0, 2**31 - 1) or None
    seed = _integer(body, "seed", -1, 2**32 - 1)
    try:
        params = _sampling(body, defaults, seed, n_vocab)
    except ValueError as e:
        raise bad(str(e)) from None
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return Generate(params, max_tokens, _stop(body), _boolean(body, "stream", False),
                    _boolean(options or {}, "include_usage", False), _boolean(body, "write", True))


def _sampling(body: dict, defaults: SamplingParams, seed: int | None, n_vocab: int) -> SamplingParams:
    return sampling_params(defaults, temperature=_number(body, "temperature", 0, 2),
                           top_p=_number(body, "top_p", 0, 1), top_k=_integer(body, "top_k", 0, n_vocab),
                           min_p=_number(body, "min_p", 0, 1), repeat_penalty=_number(body, "repeat_penalty", 0, 10),
                           frequency_penalty=_number(body, "frequency_penalty", -2, 2),
                           presence_penalty=_number(body, "presence_penalty", -2, 2), seed=seed,
                           logit_bias=_logit_bias(body, n_vocab))


def chat_messages(body: dict) -> list[dict[str, str]]:
    """The request's messages as [{"role", "content"}] with text content, ending with the user's."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    try:
        plain = plain_messages(messages)
    except ValueError as e:
        raise bad(f"'messages': {e}", "messages") from None
    out = []
    for i, m in enumerate(plain):
        if m.get("role") not in ROLES:
            raise bad(f"messages[{i}]: role must be one of {', '.join(ROLES)}, got {m.get('role')!r}", "messages")
        out.append({"role": m["role"], "content": m.get("content", "")})
    if out[-1]["role"] != "user":
        raise bad("the last message must be the user's", "messages")
    return out


def completion_prompt(body: dict, n_vocab: int) -> str | list[int]:
    """One prompt: a string, a list of token ids, or a list holding one string."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' is empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < n_vocab for t in prompt):
            raise bad(f"'prompt' has token ids outside the vocabulary (0 to {n_vocab - 1})", "prompt")
        return prompt
    raise bad("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
