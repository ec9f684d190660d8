"""Completions and chat completions, shaped like OpenAI's (and llama-cpp-python's) responses.

The decode → sample → next loop runs in C++ (`_core.generate`); Python only prepares the prompt,
reuses the cached context and, when streaming, receives each final piece of text.
"""
from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from . import _core
from .chat_template import model_chat_template, render_chat
from .model import _token_list

if TYPE_CHECKING:
    from .model import Context, Model

_PENALTY_LAST_N = 64


# ---- the model's generation context, reused across calls ----------------------------------------

def _generation_state(model: "Model") -> tuple["Context", threading.Lock]:
    """The context that completions share (created on first use), and the lock that serialises them."""
    state = model.__dict__.get("_generation")
    if state is None:
        state = model.__dict__.setdefault("_generation", (model.context(), threading.Lock()))
    return state


def _tokens_to_decode(ctx: "Context", prompt: list[int]) -> list[int]:
    """Keeps the context's longest prefix shared with prompt and returns the rest of prompt.

    At least the prompt's last token is always decoded again, so that its logits exist.
    """
    cached = ctx.tokens
    n_common = 0
    for a, b in zip(cached, prompt):
        if a != b:
            break
        n_common += 1
    n_keep = min(n_common, len(prompt) - 1)
    if n_keep < len(cached) and ctx.model.adapter is not None:
        # δ-mem writes cannot be taken back: unless the prompt extends the context, start afresh.
        ctx.reset()
        ctx.reset_memory()
        return prompt
    if n_keep < len(cached):
        ctx.truncate(n_keep)   # KV rows past n_keep are simply overwritten by the next decode
    return prompt[n_keep:]


# ---- one generation --------------------------------------------------------------------------------

class _Request:
    """Everything one generation needs, validated before any work starts."""

    def __init__(self, model: "Model", prompt_tokens: list[int], *, max_tokens: int | None,
                 stop: str | Sequence[str] | None, stop_tokens: Sequence[int], sampler_args: dict[str, Any],
                 target: tuple["Context", threading.Lock] | None = None,
                 prepare: Callable[["Context", list[int]], tuple[list[int], list[int] | None]] | None = None):
        """target: the context to generate in and its lock (default: the model's shared one);
        prepare(ctx, prompt) -> (tokens to decode, their δ-mem segment ids or None)."""
        self.target = target if target is not None else _generation_state(model)
        self.prepare = prepare if prepare is not None else (lambda c, p: (_tokens_to_decode(c, p), None))
        ctx = self.target[0]
        if not prompt_tokens:
            raise ValueError("the prompt is empty (no tokens)")
        if len(prompt_tokens) > ctx.n_ctx:
            raise ValueError(f"the prompt has {len(prompt_tokens)} tokens, more than the context holds "
                             f"(n_ctx = {ctx.n_ctx})")
        self.model = model
        self.prompt_tokens = prompt_tokens
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
            raise ValueError(f"max_tokens must be an int or None, got {max_tokens!r}")
        # None or <= 0: until an end token or a full context (the C++ loop stops there, so no more
        # than n_ctx tokens are ever generated).
        self.max_tokens = min(max_tokens, ctx.n_ctx) if max_tokens is not None and max_tokens > 0 else ctx.n_ctx
        self.stop = _stop_list(stop)
        self.stop_tokens = [t for t in stop_tokens if t is not None and t >= 0]
        self.sampler_args = sampler_args
        _core.Sampler(**sampler_args)   # fails now, not later in a thread, on bad sampling values

    def run(self, on_piece: Callable[[bytes], bool] | None = None) -> tuple[list[int], str, str]:
        """Generates; returns (completion tokens, text, finish_reason)."""
        ctx, lock = self.target
        with lock:
            sampler = _core.Sampler(**self.sampler_args)
            for t in self.prompt_tokens[-_PENALTY_LAST_N:]:
                sampler.accept(t)   # penalties look at the prompt too, as in llama.cpp
            todo, seg_ids = self.prepare(ctx, self.prompt_tokens)
            tokens, text, finish = _core.generate(ctx._native, sampler, todo, self.max_tokens,
                                                  self.stop, self.stop_tokens, on_piece, seg_ids)
        return list(tokens), text.decode("utf-8", errors="replace"), finish

    def stream(self) -> Iterator[str | tuple[list[int], str, str]]:
        """Yields text pieces as they are generated, then the result of run() as the last item.

        The C++ loop runs in a worker thread; its callback feeds a queue that this generator drains.
        Closing the generator early stops the generation at the next piece.
        """
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        abandoned = threading.Event()

        def on_piece(data: bytes) -> bool:
            pieces.put(("piece", data))
            return not abandoned.is_set()

        def work() -> None:
            try:
                pieces.put(("done", self.run(on_piece)))
            except BaseException as e:   # handed to the consumer, which re-raises it
                pieces.put(("error", e))

        worker = threading.Thread(target=work, name="pydeltamem-generate", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = pieces.get()
                if kind == "piece":
                    yield value.decode("utf-8", errors="replace")
                elif kind == "error":
                    raise value
                else:
                    yield value
                    return
        finally:
            abandoned.set()
            worker.join()


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return [s for s in stop if s]


def _sampler_args(*, temperature: float, top_p: float, top_k: int, min_p: float, typical_p: float,
                  repeat_penalty: float, frequency_penalty: float, presence_penalty: float,
                  seed: int | None, logit_bias: Mapping[int | str, float] | None) -> dict[str, Any]:
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                presence_penalty=presence_penalty, penalty_last_n=_PENALTY_LAST_N,
                seed=None if seed is None or seed < 0 else seed & 0xFFFFFFFF,
                # OpenAI sends token ids as JSON object keys, i.e. strings.
                logit_bias=None if not logit_bias else {int(k): float(v) for k, v in logit_bias.items()})


def _usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


# ---- text completion -------------------------------------------------------------------------------

def create_completion(model: "Model", prompt: str | bytes | Sequence[int], *, max_tokens: int | None = 16,
                      temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                      typical_p: float = 1.0, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
                      presence_penalty: float = 0.0, stop: str | Sequence[str] | None = None,
                      seed: int | None = None, stream: bool = False,
                      logit_bias: Mapping[int | str, float] | None = None) -> dict | Iterator[dict]:
    """See Model.create_completion."""
    if isinstance(prompt, (str, bytes)):
        # Like llama-cpp-python: BOS as the model asks, and special tokens written in the prompt count.
        prompt_tokens = model.tokenize(prompt, add_special=True, parse_special=True)
    else:
        prompt_tokens = _token_list(prompt)
    request = _Request(model, prompt_tokens, max_tokens=max_tokens, stop=stop, stop_tokens=(),
                       sampler_args=_sampler_args(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                                  typical_p=typical_p, repeat_penalty=repeat_penalty,
                                                  frequency_penalty=frequency_penalty,
                                                  presence_penalty=presence_penalty, seed=seed,
                                                  logit_bias=logit_bias))
    header = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
              "model": model.model_path}
    if stream:
        return _completion_chunks(request, header)
    tokens, text, finish = request.run()
    return {**header,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(len(prompt_tokens), len(tokens))}


def _completion_chunks(request: _Request, header: dict) -> Iterator[dict]:
    def chunk(text: str, finish: str | None) -> dict:
        return {**header, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    for item in request.stream():
        if isinstance(item, str):
            if item:
                yield chunk(item, None)
        else:
            yield chunk("", item[2])


# ---- chat completion -------------------------------------------------------------------------------

def chat_prompt(model: "Model", messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation, rendered with the model's chat template."""
    template = model.__dict__.get("_chat_template")
    if template is None:   # looked up (and warned about) once per model
        template = model.__dict__.setdefault("_chat_template", model_chat_template(model.metadata))
    return render_chat(template, messages, bos_token=_token_text(model, model.token_bos),
                       eos_token=_token_text(model, model.token_eos), add_generation_prompt=add_generation_prompt)


def _token_text(model: "Model", token: int | None) -> str:
    return "" if token is None else model.detokenize([token], special=True)


def _chat_prompt_tokens(model: "Model", prompt: str) -> list[int]:
    # Templates that write the BOS text themselves must not get a second one from the tokenizer.
    bos = _token_text(model, model.token_bos)
    return model.tokenize(prompt, add_special=not (bos and prompt.startswith(bos)), parse_special=True)


def create_chat_completion(model: "Model", messages: Sequence[Mapping[str, Any]], *,
                           max_tokens: int | None = None, temperature: float = 0.2, top_p: float = 0.95,
                           top_k: int = 40, min_p: float = 0.05, typical_p: float = 1.0,
                           repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
                           presence_penalty: float = 0.0, stop: str | Sequence[str] | None = None,
                           seed: int | None = None, stream: bool = False,
                           logit_bias: Mapping[int | str, float] | None = None) -> dict | Iterator[dict]:
    """See Model.create_chat_completion."""
    prompt_tokens = _chat_prompt_tokens(model, chat_prompt(model, messages))
    request = _Request(model, prompt_tokens, max_tokens=max_tokens, stop=stop,
                       stop_tokens=(model.token_eot, model.token_eos),
                       sampler_args=_sampler_args(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                                  typical_p=typical_p, repeat_penalty=repeat_penalty,
                                                  frequency_penalty=frequency_penalty,
                                                  presence_penalty=presence_penalty, seed=seed,
                                                  logit_bias=logit_bias))
    header = {"id": f"chatcmpl-{uuid.uuid4()}", "created": int(time.time()), "model": model.model_path}
    if stream:
        return _chat_chunks(request, header)
    tokens, text, finish = request.run()
    return {"id": header["id"], "object": "chat.completion", "created": header["created"], "model": header["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": _usage(len(prompt_tokens), len(tokens))}


def _chat_chunks(request: _Request, header: dict) -> Iterator[dict]:
    def chunk(delta: dict, finish: str | None) -> dict:
        return {"id": header["id"], "object": "chat.completion.chunk", "created": header["created"],
                "model": header["model"],
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    yield chunk({"role": "assistant"}, None)
    for item in request.stream():
        if isinstance(item, str):
            if item:
                yield chunk({"content": item}, None)
        else:
            yield chunk({}, item[2])
