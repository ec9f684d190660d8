"""What the server serves: one model, its batched generation loop, its sessions and the counters.

Every generation is a Job: an iterator of text pieces (the reply as it becomes final) whose
`generation` and `prompt_tokens` are set once it is exhausted. Closing a job early cancels its
generation (its slot in the batch goes to the next request). Jobs are admitted up to
parallel + queue at a time; beyond that the caller gets a 429.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..completion import ContextFullError, Generation
from ..model import Model
from ..scheduler import BatchScheduler
from ..session import ChatSession, TurnResult
from .api import APIError, Generate
from .sessions import SessionManager
from .store import SessionStore


@dataclass(frozen=True)
class ServerConfig:
    model_path: str
    adapter: str | None
    alias: str
    sessions_path: str
    n_ctx: int = 4096
    n_threads: int | None = None
    parallel: int = 4
    queue: int = 64
    cache_mib: int = 2048          # KV caches of live sessions
    max_body_bytes: int = 4 << 20
    api_key: str | None = None
    device_kwargs: dict | None = None


class Job:
    """A generation's pieces; then .generation and .prompt_tokens."""

    def __init__(self, pieces: Iterator[str], finished: Callable[[], TurnResult | None]):
        self._pieces = pieces
        self._finished = finished
        self.generation: Generation | None = None
        self.prompt_tokens = 0

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces
        self._collect()

    def close(self) -> None:
        """Stops the generation (a session's turn keeps what was generated so far)."""
        self._pieces.close()

    def _collect(self) -> None:
        result = self._finished()
        if result is not None and self.generation is None:
            self.generation, self.prompt_tokens = result.generation, result.prompt_tokens


class Metrics:
    """Counters for /metrics (Prometheus text)."""

    WINDOW = 10.0   # seconds over which decode tokens/s is measured

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def piece(self, n_tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n_tokens))
            self._trim(now)

    def decode_rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / self.WINDOW

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.WINDOW:
            self._recent.popleft()


class Engine:
    """Loads the model (load() may run in a thread: ready tells when it is done), then serves jobs."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.model: Model | None = None
        self.scheduler: BatchScheduler | None = None
        self.sessions: SessionManager | None = None
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.started = time.time()
        self._admitted = 0
        self._admit_lock = threading.Lock()

    # ---- lifecycle ----
    def load(self) -> None:
        c = self.config
        try:
            self.model = Model(c.model_path, n_ctx=c.n_ctx, n_threads=c.n_threads, adapter=c.adapter, poll=0,
                               **(c.device_kwargs or {}))
            store = SessionStore(c.sessions_path, self._identity())
            self.scheduler = BatchScheduler(self.model, max_batch=c.parallel, n_ctx=c.n_ctx)
            self.sessions = SessionManager(self.model, self.scheduler, store, n_ctx=c.n_ctx,
                                           cache_bytes=c.cache_mib << 20)
        except BaseException as e:   # reported by /health and the server's log
            self.load_error = e
            raise
        finally:
            self.ready.set()

    def _identity(self) -> dict[str, Any]:
        m = self.model
        adapter = m.adapter
        return {"arch": m.arch, "n_layer": m.n_layer, "n_vocab": m.n_vocab,
                "adapter": None if adapter is None else adapter["fingerprint"]}

    @property
    def loaded(self) -> bool:
        return self.ready.is_set() and self.load_error is None

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        if self.sessions is not None:
            self.sessions.close()
            self.sessions.store.close()
        if self.model is not None:
            self.model.close()

    # ---- admission ----
    def admit(self) -> Callable[[], None]:
        """A place among the parallel + queue jobs in flight (or a 429); call what it returns to give it up."""
        with self._admit_lock:
            if self._admitted >= self.config.parallel + self.config.queue:
                raise APIError(429, f"the server is busy: {self._admitted} requests are running or queued",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            self._admitted += 1
        released = threading.Event()

        def release() -> None:
            with self._admit_lock:
                if not released.is_set():
                    released.set()
                    self._admitted -= 1

        return release

    @property
    def in_flight(self) -> int:
        return self._admitted

    # ---- jobs ----
    def chat(self, messages: list[dict[str, str]], gen: Generate, session_id: str | None) -> Job:
        kwargs = dict(max_tokens=gen.max_tokens, stop=gen.stop, write=gen.write, sampling=gen.sampling)
        if session_id is not None:
            results: list[TurnResult] = []
            pieces = self.sessions.turn(session_id, messages, results, **kwargs)
            return Job(self._counted(pieces), lambda: results[0] if results else None)
        chat = ChatSession(self.model, n_ctx=self.config.n_ctx, scheduler=self.scheduler)
        try:
            stream = chat.reply(messages, stream=True, **kwargs)
        except ContextFullError as e:
            chat.close()
            raise APIError(400, str(e), code="context_length_exceeded", param="messages") from None
        except BaseException:
            chat.close()
            raise

        def pieces() -> Iterator[str]:
            try:
                yield from stream
            finally:
                stream.close()
                chat.close()

        return Job(self._counted(pieces()), lambda: chat.last_turn)

    def complete(self, prompt: str | list[int], gen: Generate) -> Job:
        tokens = self.model.prompt_tokens(prompt)
        if len(tokens) >= self.config.n_ctx:
            raise APIError(400, f"the prompt has {len(tokens)} tokens: the context holds {self.config.n_ctx}",
                           code="context_length_exceeded", param="prompt")
        req = self.scheduler.submit(tokens, max_tokens=gen.max_tokens, stop=gen.stop, sampling=gen.sampling,
                                    write=gen.write)

        def pieces() -> Iterator[str]:
            try:
                yield from req
            finally:
                req.cancel()

        def finished() -> TurnResult:
            return TurnResult(req.result(), len(tokens))

        return Job(self._counted(pieces()), finished)

    def _counted(self, pieces: Iterator[str]) -> Iterator[str]:
        """pieces, each also counted for the decode rate (one piece is about one token)."""
        try:
            for piece in pieces:
                self.metrics.piece(1)
                yield piece
        finally:
            pieces.close()
