"""The HTTP side of `deltamem serve`: a Starlette app over an Engine (OpenAI's routes and shapes).

Generation runs in worker threads; the event loop only moves pieces. A streamed reply is sent as
server-sent events, `data: {chunk}` each, ending with `data: [DONE]`. A client that goes away
(streaming or not) cancels its generation. Every error is OpenAI's {"error": {...}} shape.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import threading
from typing import Any, AsyncIterator, Callable, Iterator

import numpy as np

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..completion import (ContextFullError, chat_chunk, chat_response, completion_chunk, completion_response,
                          response_header, usage)
from ..sampling import SamplingParams
from . import api
from .api import APIError
from .engine import Engine, Job

_END = object()


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Server:
    """The routes of one Engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.config = engine.config

    # ---- the request's envelope: auth, readiness, body ----
    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "a valid API key is needed: Authorization: Bearer KEY", type="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _require_ready(self) -> None:
        if not self.engine.loaded:
            message = "the model is loading" if self.engine.load_error is None else "the model failed to load"
            raise APIError(503, message, type="server_error", code="model_not_ready", headers={"Retry-After": "1"})

    async def _json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object, read no further than max_body_bytes."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise api.bad(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise api.bad("the body must be a JSON object")
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        name = body.get("model")
        if name is not None and name not in (self.config.alias, "default"):
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.config.alias!r}",
                           code="model_not_found", param="model")

    def _session_id(self, request: Request, body: dict[str, Any]) -> str | None:
        header, field = request.headers.get("x-session-id"), body.get("session_id")
        if header is not None and field is not None and header != field:
            raise api.bad("X-Session-Id and session_id name different sessions", "session_id")
        value = header if header is not None else field
        return None if value is None else api.session_id(value)

    def route(self, endpoint: str, handler: Callable, *, auth: bool = True, ready: bool = True):
        """handler(request) wrapped in the envelope, the error shape and the request counter."""
        async def wrapped(request: Request) -> Response:
            try:
                if auth:
                    self._authorize(request)
                if ready:
                    self._require_ready()
                response = await handler(request)
            except APIError as e:
                response = _error_response(e)
            self.engine.metrics.request(endpoint, response.status_code)
            return response
        return wrapped

    # ---- generation ----
    async def chat_completions(self, request: Request) -> Response:
        body = await self._json(request)
        self._check_model(body)
        messages = api.chat_messages(body)
        gen = api.generate_fields(body, SamplingParams.chat(), n_vocab=self.engine.model.n_vocab)
        session = self._session_id(request, body)
        header = response_header("chatcmpl", self.config.alias)

        def chunk(text: str | None, finish: str | None) -> dict:
            if text is None:   # the first chunk names the role
                return chat_chunk(header, {"role": "assistant"}, None)
            return chat_chunk(header, {"content": text} if text else {}, finish)

        return await self._generate(request, lambda: self.engine.chat(messages, gen, session), gen,
                                    lambda job: chat_response(header, job.generation, job.prompt_tokens), chunk,
                                    role_chunk=True)

    async def completions(self, request: Request) -> Response:
        body = await self._json(request)
        self._check_model(body)
        if self._session_id(request, body) is not None:
            raise api.bad("sessions continue conversations: use /v1/chat/completions for a session", "session_id")
        prompt = api.completion_prompt(body, self.engine.model.n_vocab)
        gen = api.generate_fields(body, SamplingParams(), n_vocab=self.engine.model.n_vocab)
        header = response_header("cmpl", self.config.alias)
        return await self._generate(request, lambda: self.engine.complete(prompt, gen), gen,
                                    lambda job: completion_response(header, job.generation, job.prompt_tokens),
                                    lambda text, finish: completion_chunk(header, text or "", finish), role_chunk=False)

    async def _generate(self, request: Request, make_job: Callable[[], Job], gen: api.Generate,
                        respond: Callable[[Job], dict], chunk: Callable[[str | None, str | None], dict],
                        role_chunk: bool) -> Response:
        """Admits the job, starts it (its errors before the first piece are HTTP errors) and answers
        with its whole result or as a stream."""
        release = self.engine.admit()
        try:
            job, pieces, first = await anyio.to_thread.run_sync(_start, make_job)
        except BaseException:
            release()
            raise
        if gen.stream:
            return self._sse(job, pieces, first, chunk, gen.include_usage, role_chunk, release)
        try:
            await self._drain(request, job, pieces, first)
        finally:
            release()
        self.engine.metrics.tokens(job.prompt_tokens, len(job.generation.tokens))
        return JSONResponse(respond(job))

    async def _drain(self, request: Request, job: Job, pieces, piece) -> None:
        """Runs the job to its end; a client that disconnects meanwhile stops it."""
        try:
            while piece is not _END:
                if await request.is_disconnected():
                    raise APIError(499, "the client disconnected", code="client_disconnected")
                piece = await anyio.to_thread.run_sync(_next_piece, pieces)
        finally:
            await _close(job)

    def _sse(self, job: Job, pieces, first, chunk: Callable[[str | None, str | None], dict], include_usage: bool,
             role_chunk: bool, release: Callable[[], None]) -> StreamingResponse:
        """The job as server-sent events. Closing the stream (the client went away) cancels the job."""
        async def events() -> AsyncIterator[bytes]:
            try:
                if role_chunk:
                    yield _event(chunk(None, None))
                piece = first
                while piece is not _END:
                    yield _event(chunk(piece, None))
                    piece = await anyio.to_thread.run_sync(_next_piece, pieces)
                gen = job.generation
                last = chunk("", gen.finish)
                if include_usage:
                    last["usage"] = usage(job.prompt_tokens, len(gen.tokens))
                yield _event(last)
                yield b"data: [DONE]\n\n"
                self.engine.metrics.tokens(job.prompt_tokens, len(gen.tokens))
            except APIError as e:   # a failure after the headers went out: an error event, then the end
                yield _event(e.body())
            finally:
                await _close(job)
                release()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- the rest of the API ----
    async def health(self, request: Request) -> Response:
        if self.engine.load_error is not None:
            return JSONResponse({"status": "error", "error": str(self.engine.load_error)}, status_code=503)
        if not self.engine.loaded:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.alias, "object": "model", "created": int(self.engine.started), "owned_by": "pydeltamem"}]})

    async def tokenize(self, request: Request) -> Response:
        body = await self._json(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise api.bad("'content' must be a string", "content")
        add_special = body.get("add_special", False)
        if not isinstance(add_special, bool):
            raise api.bad("'add_special' must be true or false", "add_special")
        tokens = await anyio.to_thread.run_sync(lambda: self.engine.model.tokenize(content, add_special=add_special))
        return JSONResponse({"tokens": tokens})

    async def detokenize(self, request: Request) -> Response:
        body = await self._json(request)
        tokens = body.get("tokens")
        n_vocab = self.engine.model.n_vocab
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab
                                                   for t in tokens):
            raise api.bad(f"'tokens' must be a list of token ids (0 to {n_vocab - 1})", "tokens")
        return JSONResponse({"content": self.engine.model.detokenize(tokens)})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(self._prometheus(), media_type="text/plain; version=0.0.4")

    def _prometheus(self) -> str:
        e, m = self.engine, self.engine.metrics
        running = e.scheduler.n_running if e.scheduler else 0
        lines = ["# HELP deltamem_requests_total Requests answered, by endpoint and HTTP status.",
                 "# TYPE deltamem_requests_total counter"]
        for (endpoint, status), n in sorted(m.requests.items()):
            lines.append(f'deltamem_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        gauges = [("prompt_tokens_total", "counter", "Prompt tokens of finished generations.", m.prompt_tokens),
                  ("completion_tokens_total", "counter", "Generated tokens of finished generations.", m.completion_tokens),
                  ("requests_in_flight", "gauge", "Generations admitted (running or queued).", e.in_flight),
                  ("requests_running", "gauge", "Generations in the batch now.", running),
                  ("queue_length", "gauge", "Generations admitted and waiting for the batch.", max(0, e.in_flight - running)),
                  ("sessions", "gauge", "Sessions in the store.", e.sessions.store.count() if e.sessions else 0),
                  ("sessions_live", "gauge", "Sessions with a context in memory.", e.sessions.n_live if e.sessions else 0),
                  ("decode_tokens_per_second", "gauge", f"Tokens generated per second over the last "
                   f"{m.WINDOW:g} s.", round(m.decode_rate(), 3))]
        for name, kind, help_text, value in gauges:
            lines += [f"# HELP deltamem_{name} {help_text}", f"# TYPE deltamem_{name} {kind}", f"deltamem_{name} {value}"]
        return "\n".join(lines) + "\n"

    # ---- sessions ----
    def _path_session(self, request: Request) -> str:
        return api.session_id(request.path_params["session_id"])

    async def list_sessions(self, request: Request) -> Response:
        after = request.query_params.get("after")
        if after is not None:
            after = api.session_id(after)
        try:
            limit = min(max(int(request.query_params.get("limit", "100")), 1), 1000)
        except ValueError:
            raise api.bad("'limit' must be an integer", "limit") from None
        infos = await anyio.to_thread.run_sync(lambda: self.engine.sessions.store.list(limit, after))
        return JSONResponse({"object": "list", "data": [self._session_object(i) for i in infos],
                             "has_more": len(infos) == limit})

    def _session_object(self, info, messages: list | None = None) -> dict[str, Any]:
        shape = self.engine.model.memory_shape
        out = {"id": info.id, "object": "session", "turns": info.turns, "tokens": info.tokens,
               "memory_bytes": 0 if shape is None else 4 * int(np.prod(shape)),
               "created": info.created, "updated": info.updated}
        if messages is not None:
            out["messages"] = messages
        return out

    async def get_session(self, request: Request) -> Response:
        sid = self._path_session(request)
        info = await anyio.to_thread.run_sync(lambda: self.engine.sessions.store.info(sid))
        if info is None:
            raise APIError(404, f"no session {sid!r}", code="session_not_found")
        messages = await anyio.to_thread.run_sync(lambda: self.engine.sessions.transcript(sid))
        return JSONResponse(self._session_object(info, messages))

    async def session_memory(self, request: Request) -> Response:
        sid = self._path_session(request)
        if self.engine.model.adapter is None:
            raise APIError(404, "this server's model has no δ-mem adapter: sessions have no memory",
                           code="no_memory")
        data = await anyio.to_thread.run_sync(lambda: self.engine.sessions.memory_file(sid))
        if data is None:
            raise APIError(404, f"no session {sid!r}", code="session_not_found")
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{sid}.dmem"'})

    async def delete_session(self, request: Request) -> Response:
        sid = self._path_session(request)
        gone = await anyio.to_thread.run_sync(lambda: self.engine.sessions.delete(sid))
        if not gone:
            raise APIError(404, f"no session {sid!r}", code="session_not_found")
        return JSONResponse({"id": sid, "object": "session", "deleted": True})


def _engine_errors(step: Callable[[], Any]) -> Any:
    """step() with the engine's ValueErrors (bad token ids, a conversation too long) as 400s."""
    try:
        return step()
    except ContextFullError as e:
        raise APIError(400, str(e), code="context_length_exceeded") from None
    except ValueError as e:
        raise api.bad(str(e)) from None


def _start(make_job: Callable[[], Job]) -> tuple[Job, Iterator[str], Any]:
    """The job, its piece iterator and its first piece (_END when none): what fails before the
    reply starts fails here, before any response is sent."""
    job = _engine_errors(make_job)
    pieces = iter(job)
    try:
        return job, pieces, _engine_errors(lambda: next(pieces, _END))
    except BaseException:
        job.close()
        raise


async def _close(job: Job) -> None:
    """Closes the job, also when the request's task is being cancelled (the client went away)."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(job.close)


def _next_piece(pieces: Iterator[str]) -> Any:
    return _engine_errors(lambda: next(pieces, _END))


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (no such route, wrong method) in OpenAI's shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error_response(APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})))


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


def create_app(engine: Engine, *, load_in_background: bool = True) -> Starlette:
    """The app; with load_in_background the model loads in a thread after startup (/health says 503
    until it is ready), and everything closes at shutdown."""
    s = Server(engine)
    routes = [
        Route("/health", s.route("/health", s.health, auth=False, ready=False), methods=["GET"]),
        Route("/v1/models", s.route("/v1/models", s.models), methods=["GET"]),
        Route("/v1/chat/completions", s.route("/v1/chat/completions", s.chat_completions), methods=["POST"]),
        Route("/v1/completions", s.route("/v1/completions", s.completions), methods=["POST"]),
        Route("/tokenize", s.route("/tokenize", s.tokenize), methods=["POST"]),
        Route("/detokenize", s.route("/detokenize", s.detokenize), methods=["POST"]),
        Route("/metrics", s.route("/metrics", s.metrics, ready=False), methods=["GET"]),
        Route("/v1/sessions", s.route("/v1/sessions", s.list_sessions), methods=["GET"]),
        Route("/v1/sessions/{session_id}", s.route("/v1/sessions/{id}", s.get_session), methods=["GET"]),
        Route("/v1/sessions/{session_id}", s.route("/v1/sessions/{id}", s.delete_session), methods=["DELETE"]),
        Route("/v1/sessions/{session_id}/memory", s.route("/v1/sessions/{id}/memory", s.session_memory),
              methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Requests waiting for a session, or for the batch, each hold a worker thread.
        anyio.to_thread.current_default_thread_limiter().total_tokens = max(
            40, 2 * (engine.config.parallel + engine.config.queue))
        loader = None
        if load_in_background:
            loader = threading.Thread(target=_load_quietly, args=(engine,), name="pydeltamem-load", daemon=True)
            loader.start()
        yield
        if loader is not None:
            loader.join()
        engine.close()

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error, Exception: _server_error})


def _load_quietly(engine: Engine) -> None:
    try:
        engine.load()
    except BaseException as e:   # kept in engine.load_error: /health answers 503 with it
        print(f"deltamem serve: error: the model failed to load: {e}", flush=True)
