"""Chat sessions whose δ-mem memory persists: across turns, across saves, and past the KV cache.

A turn writes the memory as the δ-mem reference chat runtime (DeltaMemChatSession.generate_reply)
does, in the same calls, with the ids of pydeltamem.segments:

1. The prompt (conversation so far, the new user message, the generation prompt) is decoded in one
   call, as far as the context has not seen it. When it no longer extends what the context holds,
   context and memory start over and the whole prompt is decoded.
2. Every generated token but the end token is decoded as its own call, the last one included,
   under the reply's message id (message_mean) or one sentence id for the whole reply
   (sentence_mean).
3. The conversation with the reply is rendered again, and what that adds (the reply's closing
   tokens, `<|im_end|>\\n` in ChatML) is decoded in one more call under the reply's message id,
   so the memory holds the whole turn when chat() returns; when the rendering's tokens differ from
   the generated ones, context and memory start over from the whole conversation.

A call whose ids are all -1 writes token by token (the reference's rule). chat(write=False) makes
the same calls, reading the memory only (and, unlike the reference, keeps the memory when the
conversation diverges: only the context starts over).

Beyond the reference: drop_context() and memory=PATH give a memory that holds more than the
conversation shows. Then the tokens the memory has already seen are decoded again only to rebuild
the KV cache (reading, not writing), and a conversation that diverges does not wipe the memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from . import atomic
from . import memfile
from .completion import (ContextFullError, Generation, GenerationSlot, TextStream, chat_segments, check_prompt,
                         max_new_tokens, reply_segment_id, stop_list)
from .sampling import SamplingParams, new_sampler, sampling_params
from .segments import Segments, with_generation_prompt
from .snapshot import engine_kv_rows, memory_from_state, read_reference_snapshot

if TYPE_CHECKING:
    from .model import Context, Model
    from .scheduler import BatchScheduler

SESSION_MAGIC = b"DMEMSES1"
SESSION_VERSION = 2


@dataclass(frozen=True)
class TurnResult:
    """A finished turn: the reply and the prompt's length in tokens."""
    generation: Generation
    prompt_tokens: int


@dataclass(frozen=True)
class SessionState:
    """What a ChatSession is, without its KV cache: enough to continue it exactly (ChatSession.export,
    ChatSession.restore). memory is None without an adapter."""
    messages: list[dict[str, Any]]
    seen: int          # leading tokens of the conversation the memory has seen
    carried: bool      # the memory holds more than the conversation shows
    memory: np.ndarray | None


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with a model; with a δ-mem adapter, its memory carries what was said.

    >>> s = model.session(system="You are terse.")
    >>> s.chat("My name is Ada.")
    >>> s.drop_context()          # forget the tokens, keep the memory
    >>> s.chat("What is my name?")
    """

    def __init__(self, model: "Model", *, system: str | None = None, memory: str | os.PathLike | None = None,
                 n_ctx: int | None = None, n_threads: int | None = None, scheduler: "BatchScheduler | None" = None):
        """scheduler: generate the replies through this BatchScheduler of the model (batched with the
        other generations it runs) instead of in the calling thread alone; the answers are the same."""
        if scheduler is not None and scheduler.model is not model:
            raise ValueError("the scheduler runs another model than the session's")
        self.model = model
        self._scheduler = scheduler
        self._slot = GenerationSlot(model.context(n_ctx=n_ctx, n_threads=n_threads, poll=0 if scheduler is not None else None))
        self._granularity = (model.adapter or {}).get("write_granularity")
        self._messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
        self._segments: Segments | None = None   # of the last conversation rendered (resumed by the next)
        # Leading tokens of the conversation that the memory has seen (written, or read by a
        # read-only turn): decoding them again must not write them again.
        self._seen = 0
        # The memory holds more than the conversation shows (loaded, or the context dropped): a
        # diverging conversation must not wipe it.
        self._carried = False
        self.last_turn: TurnResult | None = None   # the last finished turn
        if memory is not None:
            self.ctx.load_memory(memory)
            self._carried = True

    # ---- public state ----
    @property
    def ctx(self) -> "Context":
        return self._slot.ctx

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation as [{"role", "content"}, ...] (since the last drop_context or forget)."""
        return [dict(m) for m in self._messages]

    @property
    def memory(self) -> np.ndarray:
        return self.ctx.memory

    def close(self) -> None:
        self._slot.close()

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- turns ----
    def chat(self, text: str, *, stream: bool = False, max_tokens: int | None = None,
             stop: str | list[str] | None = None, write: bool = True, sampling: SamplingParams | None = None,
             **overrides: Any) -> str | Iterator[str]:
        """Adds a user message, generates the assistant's answer and returns it (or streams its pieces).
        Sampling: `sampling` (default SamplingParams.chat()) with the fields named in overrides changed.
        write=False reads the δ-mem memory without writing it (the turn still joins the conversation)."""
        if not isinstance(text, str):
            raise ValueError("text must be a string")
        return self.reply(self._messages + [{"role": "user", "content": text}], stream=stream,
                          max_tokens=max_tokens, stop=stop, write=write, sampling=sampling, **overrides)

    def reply(self, messages: list[dict[str, Any]], *, stream: bool = False, max_tokens: int | None = None,
              stop: str | list[str] | None = None, write: bool = True, sampling: SamplingParams | None = None,
              **overrides: Any) -> str | Iterator[str]:
        """Answers `messages`, the whole conversation (ending with the user's message), which then
        replaces the session's: chat(text) is reply(messages + [user text]). Tokens the context
        holds already are reused; when messages do not extend the conversation, the memory is kept
        and only the tokens after the part it has seen are written (see the module's notes).
        A conversation that does not fit the context with room for a reply raises ContextFullError
        (drop_context() then continues memory-only)."""
        params = sampling_params(sampling or SamplingParams.chat(), **overrides)
        messages = [dict(m) for m in messages]
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("the conversation must end with the user's message")
        history = self._history(messages)
        prompt = with_generation_prompt(self.model.chat_format, history)
        check_prompt(self.ctx, prompt.tokens)
        budget = self._reply_budget(messages, prompt.tokens)
        stops = stop_list(stop)

        def work(ctx: "Context", on_piece) -> str:
            self._adopt(messages, prompt.tokens)
            return self._turn(ctx, messages, history, prompt, min(max_new_tokens(ctx, max_tokens), budget), stops,
                              params, bool(write), on_piece)

        if stream:
            return self._stream(self._slot.stream(work))
        return self._slot.run(work)

    def _adopt(self, messages: list[dict[str, Any]], prompt_tokens: list[int]) -> None:
        """Before a turn: when the new conversation does not extend the one the memory has seen,
        the memory has seen only their common tokens of it, and holds more than it shows."""
        if self._seen == 0 or self.model.adapter is None or messages[:len(self._messages)] == self._messages:
            return
        old = self._history(self._messages).tokens if self._messages else []
        common = _common_prefix(old, prompt_tokens)
        if common < min(self._seen, len(old)):
            self._seen = common
            self._carried = True

    @staticmethod
    def _stream(stream: TextStream[str]) -> Iterator[str]:
        with stream:
            yield from stream

    def _turn(self, ctx: "Context", messages: list[dict[str, Any]], history: Segments, prompt: Segments,
              max_tokens: int, stops: list[str], params: SamplingParams, write: bool, on_piece) -> str:
        self._messages = messages
        todo, ids = self._bring_up_to(ctx, prompt, write)
        if not todo:
            raise RuntimeError("the prompt adds no tokens to the conversation: nothing to generate from")
        reply_id = reply_segment_id(self.model, history)
        gen = self._generate(ctx, todo, ids, params, max_tokens=max_tokens, stops=stops, write=write,
                             reply_id=reply_id, on_piece=on_piece)
        if ctx.n_past < len(prompt.tokens) + len(gen.tokens):   # the loop does not decode its last token
            self._decode(ctx, gen.tokens[-1:], [reply_id], write)
        self._seen = ctx.n_past
        self._messages = messages + [{"role": "assistant", "content": gen.text}]
        todo, ids = self._bring_up_to(ctx, self._history(self._messages), write, keep_last=False)
        if todo:
            self._decode(ctx, todo, ids, write)
        self._seen = ctx.n_past
        self.last_turn = TurnResult(gen, len(prompt.tokens))
        return gen.text

    def _generate(self, ctx: "Context", todo: list[int], ids: list[int] | None, params: SamplingParams, *,
                  max_tokens: int, stops: list[str], write: bool, reply_id: int, on_piece) -> Generation:
        """The reply after todo (the prompt's tokens the context does not hold yet): in this thread,
        or as a request of the session's scheduler whose pieces go to on_piece (False cancels it)."""
        end_tokens = self.model.end_of_turn_tokens
        if self._scheduler is None:
            return ctx.generate(todo, new_sampler(params, ctx.tokens + todo), seg_ids=ids, max_tokens=max_tokens,
                                stop=stops, stop_tokens=end_tokens, write=write, seg_id=reply_id, on_piece=on_piece)
        req = self._scheduler.submit(todo, context=ctx, seg_ids=ids, max_tokens=max_tokens, stop=stops,
                                     stop_tokens=end_tokens, sampling=params, write=write, seg_id=reply_id)
        try:
            for piece in req:
                if on_piece is not None and on_piece(piece.encode()) is False:
                    req.cancel()
        finally:   # the reader gave up (or raised): the request must not run on without it
            req.cancel()
        return req.result()

    def _reply_budget(self, messages: list[dict[str, Any]], prompt: list[int]) -> int:
        """Tokens the reply may have so that it and the closing tokens after it fit the context."""
        closed = self.model.chat_format.tokens(messages + [{"role": "assistant", "content": ""}],
                                               add_generation_prompt=False)
        budget = self.ctx.n_ctx - len(prompt) - (len(closed) - _common_prefix(closed, prompt))
        if budget < 1:
            raise ContextFullError(f"the conversation fills the context (n_ctx = {self.ctx.n_ctx}): drop_context(), "
                             "forget(), or a session with a larger n_ctx")
        return budget

    def _history(self, messages: list[dict[str, Any]]) -> Segments:
        """The segments of messages (without the generation prompt)."""
        if self.model.adapter is None:   # no memory: only the tokens matter
            tokens = self.model.chat_format.tokens(messages, add_generation_prompt=False)
            return Segments(tokens, [-1] * len(tokens), [-1] * len(tokens), [dict(m) for m in messages])
        self._segments = chat_segments(self.model, messages, cached=self._segments)
        return self._segments

    def _bring_up_to(self, ctx: "Context", target: Segments, write: bool, keep_last: bool = True):
        """Makes the context hold a prefix of target's tokens; returns the rest and its ids (at least
        one token with keep_last, so that the generation has logits to start from)."""
        ids = target.ids(self._granularity)
        seen = ctx.tokens
        keep = _common_prefix(seen, target.tokens)
        if keep < len(seen):   # diverged: start over, as the reference does
            ctx.reset()
            keep = 0
            if write and not self._carried and self.model.adapter is not None:
                ctx.reset_memory()
                self._seen = 0
        replay = max(keep, min(self._seen, len(target.tokens) - int(keep_last)))
        if replay > keep:   # what the memory has seen: rebuild its KV rows without writing it again
            self._decode(ctx, target.tokens[keep:replay], None, write=False)
        return target.tokens[replay:], None if ids is None else ids[replay:]

    def _decode(self, ctx: "Context", tokens: list[int], ids: list[int] | None, write: bool) -> None:
        """ids: the granularity's effective ids (Segments.ids). With a scheduler, its next step decodes
        them (a pass of its own beside the scheduler's would fight it for the CPU threads). Context.decode
        takes sentence ids as the official module does, beside message ids that mark the tokens inside
        a message (>= 0)."""
        if self._scheduler is not None:
            self._scheduler.decode(tokens, context=ctx, seg_ids=ids, write=write)
        elif ids is None or self._granularity not in ("message_mean", "sentence_mean"):
            ctx.decode(tokens, logits="none", write=write)
        elif self._granularity == "message_mean":
            ctx.decode(tokens, logits="none", write=write, message_ids=ids)
        else:
            ctx.decode(tokens, logits="none", write=write, message_ids=[0 if i >= 0 else -1 for i in ids],
                       sentence_ids=ids)

    # ---- memory control ----
    def drop_context(self) -> None:
        """Discards the KV cache and the message history but keeps the δ-mem memory: later turns see
        the earlier conversation only through the memory."""
        self._require_adapter("drop_context")
        with self._slot.hold() as ctx:
            ctx.reset()
            self._messages = [m for m in self._messages if m["role"] == "system"]
            self._seen = len(self._history(self._messages).tokens) if self._messages else 0
            self._carried = True

    def forget(self) -> None:
        """Clears the memory and the conversation (the system prompt stays)."""
        with self._slot.hold() as ctx:
            ctx.reset()
            if self.model.adapter is not None:
                ctx.reset_memory()
            self._messages = [m for m in self._messages if m["role"] == "system"]
            self._seen = 0
            self._carried = False

    def memory_norms(self) -> list[float]:
        """Frobenius norm of each targeted layer's state (all heads together)."""
        self._require_adapter("memory_norms")
        return [float(np.linalg.norm(layer)) for layer in self.ctx.memory]

    def _require_adapter(self, what: str) -> None:
        if self.model.adapter is None:
            raise ValueError(f"{what} needs a model with a δ-mem adapter")

    # ---- persistence ----
    def _model_info(self) -> dict[str, Any]:
        return {"arch": self.model.arch, "n_layer": self.model.n_layer, "n_vocab": self.model.n_vocab}

    def export(self) -> SessionState:
        """The session's messages, memory and bookkeeping: restore() continues it exactly."""
        with self._slot.hold() as ctx:
            return self._state(ctx)

    def _state(self, ctx: "Context") -> SessionState:
        memory = ctx.memory if self.model.adapter is not None else None
        return SessionState([dict(m) for m in self._messages], self._seen, self._carried, memory)

    @classmethod
    def restore(cls, model: "Model", state: SessionState, **session_kwargs: Any) -> "ChatSession":
        """A session continuing an exported one; its KV cache is rebuilt by the next turn (reading the
        memory, not writing it). session_kwargs: the constructor's (n_ctx, n_threads, scheduler)."""
        session = cls(model, **session_kwargs)
        session._set_state(session.ctx, state)
        return session

    def rewind(self, state: SessionState) -> None:
        """Goes back to an exported state of this session (e.g. the end of an earlier turn). When the
        context still holds that state's conversation, its KV rows are kept: the session is then
        exactly as it was in that state."""
        with self._slot.hold() as ctx:
            self._set_state(ctx, state)
            target = self._history(self._messages).tokens if self._messages else []
            if _common_prefix(ctx.tokens, target) == len(target):
                ctx.truncate(len(target))
            else:
                ctx.reset()

    def _set_state(self, ctx: "Context", state: SessionState) -> None:
        if (state.memory is None) != (self.model.adapter is None):
            raise ValueError("the state's memory does not match the model's adapter (one has δ-mem, the other not)")
        if state.memory is not None:
            ctx.memory = state.memory
        self._messages = [dict(m) for m in state.messages]
        self._seen = state.seen
        self._carried = state.carried
        self._segments = None

    def save(self, path: str | os.PathLike, *, include_state: bool = False) -> None:
        """Writes messages and memory (and, with include_state, the KV cache) to one file, atomically."""
        with self._slot.hold() as ctx:
            adapter = self.model.adapter
            state = self._state(ctx)
            payload = [state.memory.astype("<f4").tobytes() if state.memory is not None else b""]
            if include_state:
                payload.append(ctx.get_state())
            header = {"version": SESSION_VERSION, "messages": state.messages, "seen": state.seen,
                      "carried": state.carried, "adapter": None if adapter is None else adapter["fingerprint"],
                      "model": self._model_info(), "include_state": include_state,
                      "memory_bytes": len(payload[0]), "state_bytes": len(payload[1]) if include_state else 0}
            atomic.write_bytes(path, memfile.pack(SESSION_MAGIC, header, payload))

    @classmethod
    def load(cls, model: "Model", path: str | os.PathLike, **ctx_kwargs: Any) -> "ChatSession":
        """A session written by save (or by version 1 of the format)."""
        path = os.fspath(path)
        header, payload = memfile.unpack(path, SESSION_MAGIC, "session")
        adapter = model.adapter
        fields = _session_fields(header, path)
        if fields["adapter"] != (None if adapter is None else adapter["fingerprint"]):
            raise ValueError(f"{path!r} is a session of another adapter (fingerprint {fields['adapter']!r})")
        if fields["model"].get("arch") != model.arch or fields["model"].get("n_vocab") != model.n_vocab:
            raise ValueError(f"{path!r} is a session of another model ({fields['model']})")
        session = cls(model, **ctx_kwargs)
        n_mem = fields["memory_bytes"]
        memory = None
        if adapter is not None:
            shape = session.ctx.memory_shape
            memory = memfile.floats(payload[:n_mem], int(np.prod(shape)), path, "memory").reshape(shape)
        session._set_state(session.ctx, SessionState(fields["messages"], fields["seen"], fields["carried"], memory))
        if fields["include_state"]:
            session.ctx.set_state(bytes(payload[n_mem:n_mem + fields["state_bytes"]]), path)
        return session

    @classmethod
    def from_reference_snapshot(cls, model: "Model", folder: str | os.PathLike, **ctx_kwargs: Any) -> "ChatSession":
        """A session continuing a snapshot folder of the δ-mem reference runtime
        (DeltaMemChatSession.save_snapshot): its messages, memory and KV cache. A snapshot of another
        model or adapter is a ValueError."""
        adapter = model.adapter
        if adapter is None:
            raise ValueError("a δ-mem session snapshot needs a model with a δ-mem adapter")
        where = os.fspath(folder)
        snap = read_reference_snapshot(folder)
        session = cls(model, **ctx_kwargs)
        history = session._history(snap.messages) if snap.messages else Segments()
        if history.tokens != snap.tokens:
            at = _common_prefix(history.tokens, snap.tokens)
            raise ValueError(f"{where}: the snapshot's tokens are not this model's chat template of its messages "
                             f"(they differ from token {at} on): a snapshot of another model or tokenizer")
        if len(snap.tokens) > session.ctx.n_ctx:
            raise ValueError(f"{where}: the conversation has {len(snap.tokens)} tokens, more than the context holds "
                             f"(n_ctx = {session.ctx.n_ctx})")
        session.ctx.memory = memory_from_state(snap.state, adapter["target_layers"], session.ctx.memory_shape, where)
        if snap.kv is not None:
            if len(snap.kv) != model.n_layer or any(k.shape[1] != len(snap.tokens) for k, _ in snap.kv):
                raise ValueError(f"{where}: the KV cache has {len(snap.kv)} layers of "
                                 f"{sorted({k.shape[1] for k, _ in snap.kv})} tokens, expected {model.n_layer} layers "
                                 f"of {len(snap.tokens)} (a snapshot of another model)")
            try:
                session.ctx.set_kv(snap.tokens, engine_kv_rows(snap.kv, model.arch))
            except ValueError as e:
                raise ValueError(f"{where}: the KV cache does not fit this model ({e})") from None
        session._messages = snap.messages
        session._seen = len(snap.tokens)   # without a KV cache, the tokens are decoded again by reading
        return session


def _session_fields(header: Any, path: str) -> dict[str, Any]:
    """The fields of a session file's header, checked (version 1 named two of them differently)."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path!r} has a corrupted session header ({what})")

    if not isinstance(header, dict):
        raise bad("not an object")
    messages = header.get("messages")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise bad("messages")
    fields = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
              "seen": header.get("seen", header.get("written")), "carried": header.get("carried", header.get("memory_only")),
              "adapter": header.get("adapter"), "model": header.get("model"),
              "include_state": header.get("include_state"), "memory_bytes": header.get("memory_bytes", 0),
              "state_bytes": header.get("state_bytes", 0)}
    for key in ("seen", "memory_bytes", "state_bytes"):
        if not isinstance(fields[key], int) or isinstance(fields[key], bool) or fields[key] < 0:
            raise bad(key)
    for key in ("carried", "include_state"):
        if not isinstance(fields[key], bool):
            raise bad(key)
    if not isinstance(fields["model"], dict) or not (fields["adapter"] is None or isinstance(fields["adapter"], str)):
        raise bad("model or adapter")
    return fields
