"""Chat sessions whose δ-mem memory persists: across turns, across saves, and past the KV cache.

A session keeps the conversation as messages plus the token ids the model saw for each message's
content, and assigns the ids δ-mem's segment-mean writes group by, as the reference runtime does:
system prompt and template glue −1, each user/assistant message its own increasing message id,
sentence ids inside message contents (split at blank lines and after . ! ? ; : plus optional closing
quotes/brackets, plus whitespace). Each turn decodes only the tokens the context has not seen.
"""
from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from . import atomic as _atomic
from . import memory as _memfile
from .completion import _Request, _sampler_args, chat_prompt, _token_text

if TYPE_CHECKING:
    from .model import Model

SESSION_MAGIC = b"DMEMSES1"
_SENTENCE_END = re.compile(r"[.!?;:][\"'”’»)\]}]*\s+|\n[ \t]*\n\s*")
_SENTINEL = re.compile("\ue000(\\d+)\ue001")   # stands in for message contents while finding template glue
_CHAT_DEFAULTS = dict(temperature=0.2, top_p=0.95, top_k=40, min_p=0.05, typical_p=1.0, repeat_penalty=1.0,
                      frequency_penalty=0.0, presence_penalty=0.0, seed=None, logit_bias=None)


@dataclass
class _Message:
    role: str
    content: str
    message_id: int                                    # -1 for the system prompt
    tokens: list[int] = field(default_factory=list)    # content tokens, as the model saw them
    sentence_ids: list[int] = field(default_factory=list)

    def public(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content, "message_id": self.message_id, "tokens": self.tokens,
                "sentence_ids": self.sentence_ids}


def _message_from_json(m: Any, path: str) -> _Message:
    """A saved message; ValueError naming the file when it is not one."""
    if not isinstance(m, dict) or set(m) != {"role", "content", "message_id", "tokens", "sentence_ids"}:
        raise ValueError(f"{path!r} has a corrupted header: a message is {m!r}")
    return _Message(_memfile.field(m, "role", str, path), _memfile.field(m, "content", str, path),
                    _memfile.field(m, "message_id", int, path), _memfile.int_list(m, "tokens", path),
                    _memfile.int_list(m, "sentence_ids", path))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the sentences of text; whitespace after an end stays with it."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.end()))
        start = m.end()
    if start < len(text) or not spans:
        spans.append((start, len(text)))
    return spans


class ChatSession:
    """A conversation with a model; with a δ-mem adapter, its memory carries what was said.

    >>> s = model.session(system="You are terse.")
    >>> s.chat("My name is Ada.")
    >>> s.drop_context()          # forget the tokens, keep the memory
    >>> s.chat("What is my name?")
    """

    def __init__(self, model: "Model", *, system: str | None = None, memory: str | os.PathLike | None = None,
                 n_ctx: int | None = None, n_threads: int | None = None):
        self.model = model
        self.ctx = model.context(n_ctx=n_ctx, n_threads=n_threads)
        self._lock = threading.Lock()
        self._history: list[_Message] = []
        self._next_message_id = 0
        self._next_sentence_id = 0
        # Leading tokens of the conversation whose content is already in the memory; re-decoding them
        # (to rebuild the KV cache) must read the memory without writing it again.
        self._written = 0
        # True once the memory holds more than the context shows (loaded, or the context dropped):
        # then a diverging history must not wipe the memory.
        self._memory_only = False
        if system is not None:
            self._history.append(self._new_message("system", system))
        if memory is not None:
            self.ctx.load_memory(memory)
            self._memory_only = True

    # ---- public state ----
    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation as [{"role", "content"}, ...] (since the last drop_context or forget)."""
        return [m.public() for m in self._history]

    @property
    def memory(self) -> np.ndarray:
        return self.ctx.memory

    def close(self) -> None:
        self.ctx.close()

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- turns ----
    def chat(self, text: str, *, stream: bool = False, max_tokens: int | None = None,
             stop: str | list[str] | None = None, **sampling: Any) -> str | Iterator[str]:
        """Adds a user message, generates the assistant's answer and returns it (or streams its pieces)."""
        unknown = set(sampling) - set(_CHAT_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown sampling arguments: {', '.join(sorted(unknown))}")
        if not isinstance(text, str):
            raise ValueError("text must be a string")
        user = self._new_message("user", text)
        tokens, seg_ids = self._conversation_tokens(self._history + [user], add_generation_prompt=True)
        request = _Request(self.model, tokens, max_tokens=max_tokens, stop=stop,
                           stop_tokens=(self.model.token_eot, self.model.token_eos),
                           sampler_args=_sampler_args(**{**_CHAT_DEFAULTS, **sampling}),
                           target=(self.ctx, self._lock), prepare=lambda ctx, _: self._prepare(tokens, seg_ids))
        if stream:
            return self._stream(request, user)
        generated, answer, _ = request.run()
        self._record_turn(user, generated, answer)
        return answer

    def _stream(self, request: _Request, user: _Message) -> Iterator[str]:
        for item in request.stream():
            if isinstance(item, str):
                if item:
                    yield item
            else:
                generated, answer, _ = item
                self._record_turn(user, generated, answer)

    def _record_turn(self, user: _Message, generated: list[int], answer: str) -> None:
        self._history.append(user)
        assistant = self._new_message("assistant", answer, tokens=self._answer_tokens(generated, answer))
        self._history.append(assistant)
        # The context now holds the prompt and every generated token but the last; all of it is written.
        self._written = len(self.ctx.tokens)

    def _answer_tokens(self, generated: list[int], answer: str) -> list[int]:
        # The generated ids are what the context saw; when a stop string cut the text they say more
        # than the answer, and the answer is tokenized afresh (the next turn then re-ingests).
        if self.model.detokenize(generated) == answer:
            return list(generated)
        return self.model.tokenize(answer, add_special=False)

    def _prepare(self, tokens: list[int], seg_ids: list[int] | None) -> tuple[list[int], list[int] | None]:
        """Brings the context up to all but the new tail of tokens; returns the tail and its ids."""
        ctx = self.ctx
        seen = ctx.tokens
        if seen != tokens[:len(seen)] or len(seen) == len(tokens):
            ctx.reset()   # the history diverged from what the context holds: re-ingest it
            if not self._memory_only and self.model.adapter is not None:
                ctx.reset_memory()
                self._written = 0
            seen = []
        start = len(seen)
        replay_end = max(start, min(self._written, len(tokens) - 1))
        if replay_end > start:
            ctx.decode(tokens[start:replay_end], logits="none", write=False)
        tail_ids = None if seg_ids is None else seg_ids[replay_end:]
        return tokens[replay_end:], tail_ids

    # ---- memory control ----
    def drop_context(self) -> None:
        """Discards the KV cache and the message history but keeps the δ-mem memory: later turns see
        the earlier conversation only through the memory."""
        self._require_adapter("drop_context")
        with self._lock:
            self.ctx.reset()
            self._history = [m for m in self._history if m.role == "system"]
            system_tokens, _ = self._conversation_tokens(self._history, add_generation_prompt=False)
            self._written = len(system_tokens) if self._history else 0
            self._memory_only = True

    def forget(self) -> None:
        """Clears the memory and the conversation (the system prompt stays)."""
        with self._lock:
            self.ctx.reset()
            if self.model.adapter is not None:
                self.ctx.reset_memory()
            self._history = [m for m in self._history if m.role == "system"]
            self._written = 0
            self._memory_only = False

    def memory_norms(self) -> list[float]:
        """Frobenius norm of each targeted layer's state (all heads together)."""
        self._require_adapter("memory_norms")
        mem = self.ctx.memory
        return [float(np.linalg.norm(layer)) for layer in mem]

    def _require_adapter(self, what: str) -> None:
        if self.model.adapter is None:
            raise ValueError(f"{what} needs a model with a δ-mem adapter")

    # ---- persistence ----
    def save(self, path: str | os.PathLike, *, include_state: bool = False) -> None:
        """Writes messages and memory (and, with include_state, the KV cache) to one file, atomically."""
        with self._lock:
            adapter = self.model.adapter
            header = {"version": 1, "messages": [m.to_json() for m in self._history],
                      "next_message_id": self._next_message_id, "next_sentence_id": self._next_sentence_id,
                      "written": self._written, "memory_only": self._memory_only,
                      "adapter": None if adapter is None else adapter["fingerprint"],
                      "model": {"arch": self.model.arch, "n_layer": self.model.n_layer, "n_vocab": self.model.n_vocab},
                      "include_state": include_state}
            payload = [self.ctx.memory.astype("<f4").tobytes() if adapter is not None else b""]
            if include_state:
                state = b"".join(self.ctx._state_chunks())
                header["state_bytes"] = len(state)
                payload.append(state)
            header["memory_bytes"] = len(payload[0])
            _atomic.write_bytes(path, _memfile.pack(SESSION_MAGIC, header, payload))

    @classmethod
    def load(cls, model: "Model", path: str | os.PathLike, **ctx_kwargs: Any) -> "ChatSession":
        path = os.fspath(path)
        header, payload = _memfile.unpack(path, SESSION_MAGIC, "session")
        adapter = model.adapter
        if header.get("adapter") != (None if adapter is None else adapter["fingerprint"]):
            raise ValueError(f"{path!r} is a session of another adapter (fingerprint {header.get('adapter')!r})")
        saved_model = _memfile.field(header, "model", dict, path)
        if saved_model.get("n_vocab") != model.n_vocab or saved_model.get("arch") != model.arch:
            raise ValueError(f"{path!r} is a session of another model ({saved_model})")
        messages = [_message_from_json(m, path) for m in _memfile.field(header, "messages", list, path)]
        next_ids = [_memfile.field(header, key, int, path) for key in ("next_message_id", "next_sentence_id")]
        n_mem = _memfile.field(header, "memory_bytes", int, path, default=0)
        state_bytes = _memfile.field(header, "state_bytes", int, path) if header.get("include_state") else None
        written = _memfile.field(header, "written", int, path)
        memory_only = _memfile.field(header, "memory_only", bool, path)
        session = cls(model, **ctx_kwargs)
        session._history = messages
        session._next_message_id, session._next_sentence_id = next_ids
        if adapter is not None:
            session.ctx.memory = _memfile.floats(payload[:n_mem], int(np.prod(session.ctx.memory_shape)), path,
                                                 "memory").reshape(session.ctx.memory_shape)
        if state_bytes is not None:
            session.ctx._load_state_bytes(bytes(payload[n_mem:n_mem + state_bytes]), path)
        session._written = written
        session._memory_only = memory_only or adapter is not None
        return session

    # ---- tokens and ids ----
    def _new_message(self, role: str, content: str, tokens: list[int] | None = None) -> _Message:
        if role == "system":
            message_id = -1
        else:
            message_id = self._next_message_id
            self._next_message_id += 1
        if tokens is None:
            tokens = self.model.tokenize(content, add_special=False) if content else []
        sentence_ids = self._sentence_ids(tokens) if role != "system" else [-1] * len(tokens)
        return _Message(role, content, message_id, list(tokens), sentence_ids)

    def _sentence_ids(self, tokens: list[int]) -> list[int]:
        """Each token joins the sentence its last character falls in (sentences of the decoded text)."""
        pieces = [self.model.detokenize([t]) for t in tokens]
        text = "".join(pieces)
        spans = sentence_spans(text)
        ids, pos, span = [], 0, 0
        for piece in pieces:
            pos += len(piece)
            while span + 1 < len(spans) and pos > spans[span][1]:
                span += 1
            ids.append(self._next_sentence_id + span)
        self._next_sentence_id += len(spans)
        return ids

    def _conversation_tokens(self, history: list[_Message], add_generation_prompt: bool) -> tuple[list[int], list[int] | None]:
        """The conversation's tokens, rendered by the chat template, and the δ-mem ids the adapter uses."""
        placeholders = [{"role": m.role, "content": f"\ue000{i}\ue001"} for i, m in enumerate(history)]
        rendered = chat_prompt(self.model, placeholders, add_generation_prompt=add_generation_prompt)
        bos = _token_text(self.model, self.model.token_bos)
        tokens: list[int] = []
        message_ids: list[int] = []
        sentence_ids: list[int] = []
        pos = 0
        for m in _SENTINEL.finditer(rendered):
            self._append_glue(rendered[pos:m.start()], tokens, message_ids, sentence_ids, first=not tokens and pos == 0, bos=bos)
            msg = history[int(m.group(1))]
            tokens += msg.tokens
            message_ids += [msg.message_id] * len(msg.tokens)
            sentence_ids += msg.sentence_ids
            pos = m.end()
        self._append_glue(rendered[pos:], tokens, message_ids, sentence_ids, first=not tokens and pos == 0, bos=bos)
        granularity = (self.model.adapter or {}).get("write_granularity")
        return tokens, {"message_mean": message_ids, "sentence_mean": sentence_ids}.get(granularity)

    def _append_glue(self, glue: str, tokens: list[int], message_ids: list[int], sentence_ids: list[int], *,
                     first: bool, bos: str) -> None:
        # Templates that write the BOS text themselves must not get a second one from the tokenizer.
        add_bos = first and not (bos and glue.startswith(bos))
        if not glue and not add_bos:
            return
        ids = self.model.tokenize(glue, add_special=add_bos, parse_special=True)
        tokens += ids
        message_ids += [-1] * len(ids)
        sentence_ids += [-1] * len(ids)


def session_file_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a session file (for tools)."""
    header, _ = _memfile.unpack(path, SESSION_MAGIC, "session")
    return json.loads(json.dumps(header))
