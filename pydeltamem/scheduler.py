"""Continuous batching: many generations at once, one batched forward pass a step.

A BatchScheduler owns a worker thread that advances every running request by one token per step
through the engine's step loop (_core.generators_step: one decode_batch over all of them, then each
request's own sampler, stop strings and max_tokens, all in C++). A request joins the running batch
at the next step after it is submitted and leaves when it finishes or is cancelled; the rest wait
in submission order while max_batch requests run. Each request decodes into its own context (given,
or a fresh one of the model), so its KV cache and δ-mem memory are its own.

>>> with BatchScheduler(model, max_batch=8) as sched:
...     reqs = [sched.submit(model.tokenize(p, add_special=True), max_tokens=32) for p in prompts]
...     for piece in reqs[0]:
...         print(piece, end="")
...     texts = [r.result().text for r in reqs]
"""
from __future__ import annotations

import codecs
import queue
import threading
from collections import deque
from typing import TYPE_CHECKING, Iterator, Sequence

from . import _core
from .completion import Generation, max_new_tokens, stop_list
from .sampling import SamplingParams, new_sampler

if TYPE_CHECKING:
    from .model import Context, Model

_DONE = object()   # the end of a request's stream of pieces


class BatchRequest:
    """One submitted generation: iterate it for its text as it becomes final (pieces), or wait
    for result(). cancel() ends it at the next step (its finish is then "cancelled")."""

    def __init__(self, scheduler: "BatchScheduler", ctx: "Context", owned: bool, prompt: list[int],
                 seg_ids: list[int] | None, generator: "_core.Generator"):
        self._scheduler = scheduler
        self.context = ctx
        self._owned = owned
        self._prompt = prompt
        self._seg_ids = seg_ids
        self._gen = generator
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancelled = False
        self._result: Generation | None = None
        self._error: BaseException | None = None

    # ---- the reader's side ----
    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._pieces.get()
            if item is _DONE:
                break
            yield item
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> Generation:
        """Waits for the end of the generation; raises what failed it."""
        if not self._done.wait(timeout):
            raise TimeoutError("the generation has not finished")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Ends the generation at the next step (or before it starts); its slot goes to the next request."""
        self._cancelled = True
        self._scheduler._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # ---- the worker's side ----
    def _push_text(self) -> None:
        text = self._decoder.decode(self._gen.take_text())
        if text:
            self._pieces.put(text)

    def _finish(self, finish: str | None = None, error: BaseException | None = None) -> None:
        tokens, text, native_finish = self._gen.result()
        if error is None:
            self._push_text()
            tail = self._decoder.decode(b"", final=True)
            if tail:
                self._pieces.put(tail)
        self._result = Generation(list(tokens), text.decode("utf-8", errors="replace"), finish or native_finish)
        self._error = error
        if self._owned:
            self.context.close()
        self._pieces.put(_DONE)
        self._done.set()


class BatchScheduler:
    """Runs submitted generations of one model together, at most max_batch at a time."""

    def __init__(self, model: "Model", *, max_batch: int = 8, n_ctx: int | None = None, max_queue: int = 0):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue      # 0: unbounded; else submit() raises when this many wait
        self._n_ctx = n_ctx
        self._lock = threading.Condition()
        self._waiting: deque[BatchRequest] = deque()
        self._feeding: deque[BatchRequest] = deque()   # decode() requests: they join the next step
        self._running: list[BatchRequest] = []
        self._closed = False
        self.steps = 0                  # batched steps run so far
        self._thread = threading.Thread(target=self._work, name="pydeltamem-batch", daemon=True)
        self._thread.start()

    # ---- submitting ----
    def submit(self, prompt: Sequence[int], *, max_tokens: int | None = 256, stop: str | Sequence[str] | None = None,
               sampling: SamplingParams | None = None, context: "Context | None" = None, write: bool = True,
               seg_ids: Sequence[int] | None = None, seg_id: int = -1,
               stop_tokens: Sequence[int] = ()) -> BatchRequest:
        """Queues a generation of up to max_tokens tokens after prompt (token ids). With context, it
        continues that context (which no one else may use until the request is done); without, it
        gets a fresh context of the model, closed when it ends. seg_ids / seg_id / write /
        stop_tokens: as Context.generate's."""
        from .model import _effective_ids, _token_list

        tokens = _token_list(prompt)
        owned = context is None
        ctx = self.model.context(n_ctx=self._n_ctx, poll=0) if owned else context
        try:
            self._check_prompt(ctx, tokens, seg_ids)
            sampler = new_sampler(sampling or SamplingParams(), ctx.tokens + tokens)
            gen = _core.Generator(ctx._native, sampler, max_new_tokens(ctx, max_tokens), stop_list(stop),
                                  _token_list(stop_tokens), write=bool(write), seg_id=int(seg_id))
        except BaseException:
            if owned:
                ctx.close()
            raise
        return self._enqueue(BatchRequest(self, ctx, owned, tokens, _effective_ids(seg_ids), gen), self._waiting)

    def decode(self, tokens: Sequence[int], *, context: "Context", seg_ids: Sequence[int] | None = None,
               write: bool = True) -> None:
        """Decodes tokens into context (which no one else may use meanwhile) in the scheduler's next
        step, batched with the running generations, and returns when they are in (raising what failed
        them): nothing is sampled and no logits are computed. It joins that step whatever the number
        running, since it takes one step. Feed a context this way rather than with context.decode()
        while the scheduler runs: two passes at once share the CPU threads badly (each one's threads
        wait at every barrier for the other's)."""
        from .model import _effective_ids, _token_list

        tokens = _token_list(tokens)
        self._check_prompt(context, tokens, seg_ids)
        greedy = new_sampler(SamplingParams(temperature=0.0))   # never asked: nothing is sampled
        gen = _core.Generator(context._native, greedy, 0, [], [], write=bool(write))
        req = self._enqueue(BatchRequest(self, context, False, tokens, _effective_ids(seg_ids), gen), self._feeding)
        if req.result().finish == "cancelled":
            raise ValueError("the scheduler was closed before the tokens were decoded")

    def _check_prompt(self, ctx: "Context", tokens: list[int], seg_ids: Sequence[int] | None) -> None:
        if not tokens:
            raise ValueError("the prompt is empty (no tokens)")
        if ctx.model is not self.model:
            raise ValueError("the context belongs to another model than the scheduler's")
        if ctx.n_past + len(tokens) > ctx.n_ctx:
            raise ValueError(f"the prompt has {len(tokens)} tokens, more than the context has room for "
                             f"({ctx.n_ctx - ctx.n_past} of n_ctx = {ctx.n_ctx})")
        if seg_ids is not None and len(seg_ids) != len(tokens):
            raise ValueError(f"seg_ids has {len(seg_ids)} entries for {len(tokens)} prompt tokens")

    def _enqueue(self, req: BatchRequest, line: deque) -> BatchRequest:
        with self._lock:
            refusal = self._refusal(req.context, bounded=line is self._waiting)
            if refusal is None:
                line.append(req)
                self._lock.notify()
                return req
        if req._owned:
            req.context.close()
        raise refusal

    def _refusal(self, ctx: "Context", bounded: bool) -> Exception | None:
        """Under the lock: why a request on ctx cannot be queued now, if it cannot (bounded: by
        max_queue, as generations are; decodes are not)."""
        if self._closed:
            return ValueError("the scheduler is closed")
        if bounded and self.max_queue and len(self._waiting) >= self.max_queue:
            return RuntimeError(f"the queue is full ({self.max_queue} requests waiting)")
        if any(r.context is ctx for r in list(self._waiting) + list(self._feeding) + self._running):
            return ValueError("the context already has a request in this scheduler")
        return None

    @property
    def n_running(self) -> int:
        return len(self._running)

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    # ---- lifecycle ----
    def close(self) -> None:
        """Cancels what is waiting and running, and stops the worker."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def __enter__(self) -> "BatchScheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # ---- the worker ----
    def _admit(self) -> None:
        """Under the lock: drops cancelled requests, moves the decodes and the waiting generations
        that have a free slot into the running batch."""
        for line in (self._waiting, self._feeding, self._running):
            for r in [r for r in line if r._cancelled or self._closed]:
                line.remove(r)
                r._finish("cancelled")
        while self._feeding:
            self._start(self._feeding.popleft())
        while self._waiting and len(self._running) < self.max_batch:
            self._start(self._waiting.popleft())

    def _start(self, r: BatchRequest) -> None:
        try:
            r._gen.start(r._prompt, r._seg_ids)
        except ValueError as e:
            r._finish(error=e)
            return
        self._running.append(r)

    def _work(self) -> None:
        while True:
            with self._lock:
                self._admit()
                while not self._running and not self._closed and not self._waiting and not self._feeding:
                    self._lock.wait()
                    self._admit()
                if self._closed and not self._running and not self._waiting and not self._feeding:
                    return
                batch = list(self._running)
            if not batch:
                continue
            self._step(batch)

    def _step(self, batch: list[BatchRequest]) -> None:
        try:
            going = _core.generators_step([r._gen for r in batch])
        except ValueError as e:
            # Nothing of the step happened: find who failed it by stepping each alone.
            if len(batch) == 1:
                with self._lock:
                    self._running.remove(batch[0])
                batch[0]._finish(error=e)
                return
            for r in batch:
                self._step([r])
            return
        self.steps += 1
        for r, go_on in zip(batch, going):
            if go_on:
                r._push_text()
            else:
                with self._lock:
                    self._running.remove(r)
                r._finish()
