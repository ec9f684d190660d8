"""Sessions of the server: a ChatSession each, kept live while memory allows, durable in a SessionStore.

How a request's messages continue a session (its transcript: every message of its turns so far):
- they begin with the whole transcript (the OpenAI habit of sending the full history, or a new
  session): the messages after it are new;
- otherwise, when they hold no assistant message, the client sends only what is new: their
  non-system messages are new (a user message that repeats an earlier one is a new turn too);
- otherwise they are a history that differs from the session's (an edited message, a regenerated
  reply): the session goes back to the end of its last turn inside the part they share (its memory
  as it was then, bit for bit) and the rest of the messages are new. (Starting a session over is
  DELETE /v1/sessions/{id}.)
The new messages and the reply are the turn's, and the memory writes only them (what the context
holds already is reused, what the memory has seen is replayed without writing). A conversation that
no longer fits n_ctx continues memory-only: the context is dropped, the memory kept, and the turn
starts from the system prompt and the new messages.

Live sessions hold a context (its KV cache, n_ctx rows); beyond the cache budget the least
recently used idle ones are evicted: they close, and the next request restores them from the store
(memory and conversation; the KV cache is rebuilt by replaying the conversation, reading the
memory). Requests for one session run one after another, never interleaved.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .. import memfile
from ..completion import ContextFullError
from ..session import ChatSession, SessionState, TurnResult
from .store import SessionStore, TurnState

if TYPE_CHECKING:
    from ..model import Model
    from ..scheduler import BatchScheduler


@dataclass
class LiveSession:
    id: str
    transcript: list[dict[str, Any]]
    ends: list[int]                    # where each turn ended in the transcript; ends[0] = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    chat: ChatSession | None = None    # None while evicted
    users: int = 0                     # requests holding or waiting for it
    last_used: float = 0.0

    @property
    def turn(self) -> int:
        return len(self.ends) - 1


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


def plan_turn(transcript: list[dict[str, Any]], ends: list[int], messages: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """(the turn to continue from, the new messages) for a request's messages (see the module's notes)."""
    shared = 0
    while shared < min(len(transcript), len(messages)) and _same(transcript[shared], messages[shared]):
        shared += 1
    if shared == len(transcript):
        return len(ends) - 1, messages[shared:]
    if not any(m["role"] == "assistant" for m in messages):
        return len(ends) - 1, [m for m in messages if m["role"] != "system"]
    turn = max(t for t, end in enumerate(ends) if end <= shared)
    return turn, messages[ends[turn]:]


class SessionManager:
    """The sessions of one model: live ones in memory (at most cache_bytes of KV caches), all in store."""

    def __init__(self, model: "Model", scheduler: "BatchScheduler", store: SessionStore, *, n_ctx: int,
                 cache_bytes: int):
        self.model = model
        self.scheduler = scheduler
        self.store = store
        self.n_ctx = n_ctx
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._live: dict[str, LiveSession] = {}
        self._context_bytes: int | None = None   # one live session's KV cache

    # ---- bookkeeping ----
    @property
    def n_live(self) -> int:
        with self._lock:
            return sum(1 for s in self._live.values() if s.chat is not None)

    @contextlib.contextmanager
    def _use(self, session_id: str) -> Iterator[LiveSession]:
        """The session, held by this request alone for the block (others wait their turn)."""
        with self._lock:
            live = self._live.get(session_id)
            if live is None:
                transcript, ends = self.store.transcript(session_id)
                live = self._live[session_id] = LiveSession(session_id, transcript, ends)
            live.users += 1
        try:
            with live.lock:
                yield live
        finally:
            with self._lock:
                live.users -= 1
                live.last_used = time.monotonic()
                if live.chat is None and live.users == 0:
                    self._live.pop(session_id, None)

    def _chat_of(self, live: LiveSession) -> ChatSession:
        """The live session's ChatSession, restored from its last turn when it was evicted."""
        if live.chat is not None:
            return live.chat
        self._make_room(live)
        state = self._state(live.id, live.turn)
        live.chat = ChatSession.restore(self.model, state, n_ctx=self.n_ctx, scheduler=self.scheduler)
        if self._context_bytes is None:
            self._context_bytes = live.chat.ctx.kv_cache_bytes
        return live.chat

    def _make_room(self, incoming: LiveSession) -> None:
        """Evicts idle live sessions, least recently used first, until one more context fits the budget."""
        with self._lock:
            if self._context_bytes is None:
                return
            holding = [s for s in self._live.values() if s.chat is not None and s is not incoming]
            for victim in sorted((s for s in holding if s.users == 0), key=lambda s: s.last_used):
                if (len(holding) + 1) * self._context_bytes <= self.cache_bytes:
                    break
                victim.chat.close()
                victim.chat = None
                self._live.pop(victim.id, None)
                holding.remove(victim)

    def _state(self, session_id: str, turn: int) -> SessionState:
        """The session's state after turn (0: a new session)."""
        has_memory = self.model.adapter is not None
        if turn == 0:
            memory = np.zeros(self.model.memory_shape, dtype=np.float32) if has_memory else None
            return SessionState([], 0, False, memory)
        saved = self.store.state(session_id, turn)
        if saved is None:
            raise RuntimeError(f"session {session_id!r} has no turn {turn} in the store")
        memory = self._memory(saved.memory) if has_memory else None
        return SessionState(saved.messages, saved.seen, saved.carried, memory)

    def _memory(self, blob: bytes) -> np.ndarray:
        """A stored memory blob as the model's memory array (a copy: the engine may write it)."""
        return np.frombuffer(blob, dtype="<f4").reshape(self.model.memory_shape).copy()

    def memory_file(self, session_id: str) -> bytes | None:
        """The memory after the session's last turn, as a save_memory file; None for no such session."""
        blob = self.store.memory(session_id)
        if blob is None:
            return None
        return b"".join(memfile.memory_file(self.model.adapter, self._memory(blob)))

    def close(self) -> None:
        with self._lock:
            for live in self._live.values():
                if live.chat is not None:
                    live.chat.close()
                    live.chat = None
            self._live.clear()

    # ---- turns ----
    def turn(self, session_id: str, messages: list[dict[str, Any]], result: list[TurnResult],
             **reply_kwargs: Any) -> Iterator[str]:
        """The reply to messages in the session, piece by piece; the finished turn is committed to the
        store (also when the reader stops early: the reply so far is the turn's) and appended to result.
        A failed turn leaves the session as its last committed turn."""
        with self._use(session_id) as live:
            chat = self._chat_of(live)
            base, new = plan_turn(live.transcript, live.ends, messages)
            if base < live.turn:
                chat.rewind(self._state(live.id, base))
            before = chat.last_turn
            try:
                pieces = self._reply(chat, new, reply_kwargs)
                try:
                    yield from pieces
                finally:
                    pieces.close()
            finally:
                if chat.last_turn is not before:
                    self._commit(live, chat, base, new)
                    result.append(chat.last_turn)
                else:   # the turn failed part-way: back to the last committed state
                    chat.rewind(self._state(live.id, live.turn))

    def _reply(self, chat: ChatSession, new: list[dict[str, Any]], reply_kwargs: dict[str, Any]) -> Iterator[str]:
        try:
            return chat.reply(chat.messages + new, stream=True, **reply_kwargs)
        except ContextFullError:
            if self.model.adapter is None:
                raise
        chat.drop_context()   # memory-only from here: the memory keeps what the context cannot
        return chat.reply(chat.messages + [m for m in new if m["role"] != "system"], stream=True, **reply_kwargs)

    def _commit(self, live: LiveSession, chat: ChatSession, base: int, new: list[dict[str, Any]]) -> None:
        state = chat.export()
        reply = {"role": "assistant", "content": chat.last_turn.generation.text}
        added = [{"role": m["role"], "content": m["content"]} for m in new] + [reply]
        memory = None if state.memory is None else state.memory.astype("<f4").tobytes()
        turn = TurnState(base + 1, state.messages, state.seen, state.carried, memory)
        self.store.commit_turn(live.id, base, added, turn, tokens=chat.ctx.n_past)
        live.transcript = live.transcript[:live.ends[base]] + added
        live.ends = live.ends[:base + 1] + [len(live.transcript)]

    # ---- reading and deleting ----
    def transcript(self, session_id: str) -> list[dict[str, Any]]:
        with self._use(session_id) as live:
            return [dict(m) for m in live.transcript]

    def delete(self, session_id: str) -> bool:
        """Forgets the session (after the request it runs, if any)."""
        with self._use(session_id) as live:
            if live.chat is not None:
                live.chat.close()
                live.chat = None
            live.transcript, live.ends = [], [0]   # a request waiting for it starts the session anew
            return self.store.delete(session_id)
