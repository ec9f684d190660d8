"""Completions and chat completions, shaped like OpenAI's (and llama-cpp-python's) responses.

The decode → sample → next loop runs in C++ (`Context.generate`); Python only prepares the prompt,
reuses the cached context and, when streaming, receives each final piece of text.

A `GenerationSlot` is a context that generations take turns on (a model's shared one, or a chat
session's); `GenerationSlot.stream` runs a generation in a worker thread and hands its text over
as a `TextStream`, the one streaming protocol of the package.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, Mapping, Sequence, TypeVar

from .sampling import SamplingParams, new_sampler
from .segments import Segments, segments_for, with_generation_prompt

if TYPE_CHECKING:
    from .model import Context, Model

T = TypeVar("T")
OnPiece = Callable[[bytes], bool]

# Pieces a stream holds unread before its generation pauses. A paused stream gives its context up
# to the next generation that asks for it: a reader that fell this far behind (or dropped the
# stream without closing it) must not block every later completion.
STREAM_BUFFER = 64


@dataclass(frozen=True)
class Generation:
    tokens: list[int]   # the generated tokens, the stopping end token excluded
    text: str           # their text, cut before a stop string
    finish: str         # "stop" (end token, stop string, or stopped by the reader) or "length"


# ---- contexts that generations take turns on ------------------------------------------------------

class GenerationSlot:
    """A context and the turn-taking of the generations that run on it.

    `segments` is free for the owner to keep the δ-mem segments of the last chat rendered here
    (later chats that extend it resume from them)."""

    def __init__(self, ctx: "Context"):
        self.ctx = ctx
        self.segments: Segments | None = None
        self._cond = threading.Condition()
        self._busy = False
        self._stream: TextStream | None = None   # the stream generating here, if any

    @contextlib.contextmanager
    def hold(self, stream: "TextStream | None" = None) -> Iterator["Context"]:
        """Waits for the context (ending a paused stream that holds it) and keeps it for the block."""
        with self._cond:
            while self._busy:
                if self._stream is not None and self._stream.paused:
                    self._stream.cancelled = True
                    self._cond.notify_all()
                self._cond.wait()
            self._busy, self._stream = True, stream
        try:
            yield self.ctx
        finally:
            with self._cond:
                self._busy, self._stream = False, None
                self._cond.notify_all()

    def run(self, work: Callable[["Context", OnPiece | None], T]) -> T:
        """work(ctx, None) while holding the context."""
        with self.hold() as ctx:
            return work(ctx, None)

    def stream(self, work: Callable[["Context", OnPiece], T]) -> "TextStream[T]":
        """work(ctx, on_piece) in a worker thread holding the context; its text as a TextStream."""
        return TextStream(self, work)

    def close(self) -> None:
        with self._cond:
            if self._stream is not None:   # a paused stream must not keep the context through close
                self._stream.cancelled = True
                self._cond.notify_all()
        self.ctx.close()


class TextStream(Generic[T]):
    """The text of a generation running in a worker thread, piece by piece; then `result`.

    The worker starts when iteration does. Iterating yields the non-empty text pieces; once they
    are exhausted, `result` is what the work returned (its exception is raised to the reader
    instead). Closing the stream (or leaving its `with` block) stops the generation at its next
    piece and waits for the worker. A stream that nobody reads pauses after STREAM_BUFFER pieces;
    another generation on the same context then ends it: a reader that comes back gets the pieces
    made so far, and the work's result."""

    def __init__(self, slot: GenerationSlot, work: Callable[["Context", OnPiece], T]):
        self._slot = slot
        self._cond = slot._cond   # one condition for the slot's turns and this stream's pieces
        self._pieces: collections.deque[bytes] = collections.deque()
        self.paused = False
        self.cancelled = False
        self._done = False
        self._error: BaseException | None = None
        self.result: T | None = None
        self._worker = threading.Thread(target=self._work, args=(work,), name="pydeltamem-generate", daemon=True)

    def _work(self, work: Callable[["Context", OnPiece], T]) -> None:
        result, error = None, None
        try:
            with self._slot.hold(self) as ctx:
                result = work(ctx, self._put)
        except BaseException as e:   # handed to the reader, which re-raises it
            error = e
        with self._cond:
            self.result, self._error, self._done = result, error, True
            self._cond.notify_all()

    def _put(self, data: bytes) -> bool:
        """The generation's piece callback: False tells it to stop."""
        with self._cond:
            while len(self._pieces) >= STREAM_BUFFER and not self.cancelled:
                self.paused = True
                self._cond.notify_all()   # a generation waiting for the context may now end this one
                self._cond.wait()
            self.paused = False
            if self.cancelled:
                return False
            self._pieces.append(data)
            self._cond.notify_all()
            return True

    def __iter__(self) -> Iterator[str]:
        self._worker.start()
        while True:
            with self._cond:
                while not self._pieces and not self._done:
                    self._cond.wait()
                if not self._pieces:
                    break
                data = self._pieces.popleft()
                self._cond.notify_all()
            text = data.decode("utf-8", errors="replace")   # pieces end on whole characters
            if text:
                yield text
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> "TextStream[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- one generation ---------------------------------------------------------------------------------

class ContextFullError(ValueError):
    """The prompt (or a chat session's conversation with room for a reply) does not fit the context."""


def check_prompt(ctx: "Context", tokens: Sequence[int]) -> None:
    if not tokens:
        raise ValueError("the prompt is empty (no tokens)")
    if len(tokens) > ctx.n_ctx:
        raise ContextFullError(f"the prompt has {len(tokens)} tokens, more than the context holds (n_ctx = {ctx.n_ctx})")


def stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return [s for s in stop if s]


def max_new_tokens(ctx: "Context", max_tokens: int | None) -> int:
    """None or <= 0: until an end token or a full context (the C++ loop stops there, so no more than
    n_ctx tokens are ever generated)."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
        raise ValueError(f"max_tokens must be an int or None, got {max_tokens!r}")
    return min(max_tokens, ctx.n_ctx) if max_tokens is not None and max_tokens > 0 else ctx.n_ctx


def reuse_prefix(ctx: "Context", prompt: list[int], ids: list[int] | None, *, write: bool) -> tuple[list[int], list[int] | None]:
    """Keeps the context's longest prefix shared with prompt; returns the rest of prompt (and its ids).

    At least the prompt's last token is always decoded again, so that its logits exist.
    """
    cached = ctx.tokens
    n_common = 0
    for a, b in zip(cached, prompt):
        if a != b:
            break
        n_common += 1
    n_keep = min(n_common, len(prompt) - 1)
    if n_keep < len(cached) and write and ctx.model.adapter is not None:
        # δ-mem writes cannot be taken back: unless the prompt extends the context, start afresh.
        ctx.reset()
        ctx.reset_memory()
        n_keep = 0
    elif n_keep < len(cached):
        ctx.truncate(n_keep)   # KV rows past n_keep are simply overwritten by the next decode
    return prompt[n_keep:], None if ids is None else ids[n_keep:]


def usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


# ---- OpenAI's response shapes (here and in pydeltamem.server) ----------------------------------------

def response_header(kind: str, model: str) -> dict[str, Any]:
    """id and created of a "text_completion" (kind "cmpl") or "chat.completion" ("chatcmpl"), and model."""
    return {"id": f"{kind}-{uuid.uuid4()}", "created": int(time.time()), "model": model}


def completion_chunk(header: dict[str, Any], text: str, finish: str | None) -> dict:
    return {**header, "object": "text_completion",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}


def completion_response(header: dict[str, Any], gen: Generation, n_prompt: int) -> dict:
    return {**completion_chunk(header, gen.text, gen.finish), "usage": usage(n_prompt, len(gen.tokens))}


def chat_chunk(header: dict[str, Any], delta: dict[str, Any], finish: str | None) -> dict:
    return {**header, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def chat_response(header: dict[str, Any], gen: Generation, n_prompt: int) -> dict:
    return {**header, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text}, "logprobs": None,
                         "finish_reason": gen.finish}],
            "usage": usage(n_prompt, len(gen.tokens))}


# ---- text completion --------------------------------------------------------------------------------

def create_completion(model: "Model", slot: GenerationSlot, prompt_tokens: list[int], *, max_tokens: int | None,
                      stop: str | Sequence[str] | None, sampling: SamplingParams, stream: bool,
                      write: bool) -> dict | Iterator[dict]:
    """See Model.create_completion (the prompt already tokenized; slot: the model's shared context)."""
    check_prompt(slot.ctx, prompt_tokens)
    stops = stop_list(stop)
    sampler = new_sampler(sampling, prompt_tokens)

    def work(ctx: "Context", on_piece: OnPiece | None) -> Generation:
        todo, _ = reuse_prefix(ctx, prompt_tokens, None, write=write)
        return ctx.generate(todo, sampler, max_tokens=max_new_tokens(ctx, max_tokens), stop=stops, write=write,
                            on_piece=on_piece)

    header = response_header("cmpl", model.model_path)
    if stream:
        return _chunks(slot.stream(work), lambda text, finish: completion_chunk(header, text, finish))
    return completion_response(header, slot.run(work), len(prompt_tokens))


def _chunks(stream: TextStream[Generation], chunk: Callable[[str, str | None], dict],
            first: dict | None = None) -> Iterator[dict]:
    with stream:
        if first is not None:
            yield first
        for text in stream:
            yield chunk(text, None)
        yield chunk("", stream.result.finish)


# ---- chat completion --------------------------------------------------------------------------------

def chat_segments(model: "Model", messages: Sequence[Mapping[str, Any]], cached: Segments | None = None) -> Segments:
    """The δ-mem segments of a conversation (without the generation prompt)."""
    granularity = (model.adapter or {}).get("write_granularity")
    return segments_for(model.chat_format, messages, sentences=granularity == "sentence_mean", cached=cached)


def reply_segment_id(model: "Model", history: Segments) -> int:
    """The segment id of the tokens generated after history: the reply's message id (message_mean)
    or one sentence id for the whole reply (sentence_mean); -1 for token writes."""
    granularity = (model.adapter or {}).get("write_granularity")
    return {"message_mean": history.next_message_id, "sentence_mean": history.reply_sentence_id}.get(granularity, -1)


def create_chat_completion(model: "Model", slot: GenerationSlot, messages: Sequence[Mapping[str, Any]], *,
                           max_tokens: int | None, stop: str | Sequence[str] | None, sampling: SamplingParams,
                           stream: bool, write: bool) -> dict | Iterator[dict]:
    """See Model.create_chat_completion (slot: the model's shared context)."""
    granularity = (model.adapter or {}).get("write_granularity")
    if granularity in ("message_mean", "sentence_mean"):
        history = chat_segments(model, messages, cached=slot.segments)
        prompt = with_generation_prompt(model.chat_format, history)
        prompt_tokens, prompt_ids, reply_id = prompt.tokens, prompt.ids(granularity), reply_segment_id(model, history)
    else:
        history, prompt_tokens, prompt_ids, reply_id = None, model.chat_format.tokens(messages), None, -1
    check_prompt(slot.ctx, prompt_tokens)
    stops = stop_list(stop)
    sampler = new_sampler(sampling, prompt_tokens)

    def work(ctx: "Context", on_piece: OnPiece | None) -> Generation:
        slot.segments = history
        todo, ids = reuse_prefix(ctx, prompt_tokens, prompt_ids, write=write)
        return ctx.generate(todo, sampler, seg_ids=ids, max_tokens=max_new_tokens(ctx, max_tokens), stop=stops,
                            stop_tokens=model.end_of_turn_tokens, write=write, seg_id=reply_id, on_piece=on_piece)

    header = response_header("chatcmpl", model.model_path)
    if stream:
        return _chunks(slot.stream(work), lambda text, finish: chat_chunk(header, {"content": text} if text else {}, finish),
                       first=chat_chunk(header, {"role": "assistant"}, None))
    return chat_response(header, slot.run(work), len(prompt_tokens))
