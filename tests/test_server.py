"""`deltamem serve`, the real server process on a loopback port, spoken to with the openai client and
with raw HTTP. Oracles: the library's ChatSession run alone in this process (same messages, greedy)
for replies and memory bytes, the non-streamed reply for the streamed one, the memory a session had
before a SIGKILL for the one it has after the restart, and a conversation run alone on the server
for the same conversation under concurrent load."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")

import pydeltamem  # noqa: E402
from pydeltamem import memfile  # noqa: E402
from pydeltamem.bench.make_models import adapter_for  # noqa: E402
from pydeltamem.completion import ContextFullError  # noqa: E402
from pydeltamem.session import ChatSession  # noqa: E402
from test_backbone import smollm2_gguf  # noqa: E402

GREEDY = {"temperature": 0.0}
N_CTX = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `deltamem serve` process (started by start(), ready when /health says 200)."""

    def __init__(self, folder: Path, *args: str, sessions: Path | None = None):
        self.folder = folder
        self.args = list(args)
        self.sessions = sessions or folder / "sessions.sqlite3"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = folder / f"serve-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "Server":
        cmd = [sys.executable, "-m", "pydeltamem.cli", "serve", "-m", smollm2_gguf(), "--port", str(self.port),
               "--sessions", str(self.sessions), "-t", "2", "--n-ctx", str(N_CTX), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=self.folder)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.log.read_text()}")
            try:
                if request(self, "GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready within {timeout} s: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def request(server: Server, method: str, path: str, body=None, headers: dict | None = None,
            raw: bytes | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one raw HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def chat(server: Server, messages: list[dict], session: str | None = None, **fields) -> dict:
    headers = {} if session is None else {"X-Session-Id": session}
    status, _, data = request(server, "POST", "/v1/chat/completions",
                              {"messages": messages, "max_tokens": 8, **GREEDY, **fields}, headers)
    assert status == 200, data
    return json.loads(data)


def reply_of(response: dict) -> str:
    return response["choices"][0]["message"]["content"]


def memory_of(server: Server, session: str) -> bytes:
    status, _, data = request(server, "GET", f"/v1/sessions/{session}/memory")
    assert status == 200, data
    return data


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    return str(adapter_for(smollm2_gguf(), out_dir=tmp_path_factory.mktemp("adapter")))


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter):
    s = Server(tmp_path_factory.mktemp("serve"), "--adapter", adapter, "--parallel", "4").start()
    yield s
    s.stop()


class Library:
    """The library's model with the same adapter, and sessions that generate through a BatchScheduler
    as the server's do (the batched pass rounds differently from a lone decode on a quantised model)."""

    def __init__(self, model: pydeltamem.Model, scheduler: pydeltamem.BatchScheduler):
        self.model, self.scheduler = model, scheduler

    def session(self, **kw) -> ChatSession:
        return ChatSession(self.model, n_ctx=kw.pop("n_ctx", N_CTX), scheduler=self.scheduler, **kw)

    def restore(self, state) -> ChatSession:
        return ChatSession.restore(self.model, state, n_ctx=N_CTX, scheduler=self.scheduler)

    def memory_file(self, memory: np.ndarray) -> bytes:
        return b"".join(memfile.memory_file(self.model.adapter, memory))


@pytest.fixture(scope="module")
def library(adapter):
    with pydeltamem.Model(smollm2_gguf(), adapter=adapter, n_ctx=N_CTX, n_threads=2) as m:
        with pydeltamem.BatchScheduler(m, max_batch=4) as sched:
            yield Library(m, sched)


# ---------------------------------------------------------------------- the API

def test_models_health_and_openai_client(server):
    assert request(server, "GET", "/health")[0] == 200
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [Path(smollm2_gguf()).stem]
    out = client.chat.completions.create(model="default", messages=[user("What is 2+2?")], max_tokens=12,
                                         temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == 12 or out.choices[0].finish_reason == "stop"
    text = client.completions.create(model=models.data[0].id, prompt="The capital of France is", max_tokens=6,
                                     temperature=0)
    assert text.object == "text_completion" and text.usage.prompt_tokens > 0 and text.choices[0].text


def test_streamed_chunks_reassemble_the_reply(server):
    client = server.client()
    messages = [user("Name three colours.")]
    whole = client.chat.completions.create(model="default", messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    plain = client.completions.create(model="default", prompt="Once upon a time", max_tokens=16, temperature=0)
    streamed = client.completions.create(model="default", prompt="Once upon a time", max_tokens=16, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    status, headers, data = request(server, "POST", "/v1/chat/completions",
                                    {"messages": messages, "max_tokens": 4, "stream": True, **GREEDY})
    assert headers["content-type"].startswith("text/event-stream")
    events = [line for line in data.decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_sessionless_chat_equals_the_library(server, library):
    messages = [{"role": "system", "content": "You are terse."}, user("Where is Paris?")]
    got = chat(server, messages, max_tokens=16)
    lone = library.session()
    assert reply_of(got) == lone.reply(messages, max_tokens=16, temperature=0)
    turn = lone.last_turn
    assert got["usage"]["prompt_tokens"] == turn.prompt_tokens
    assert got["usage"]["completion_tokens"] == len(turn.generation.tokens)
    lone.close()



def test_banned_end_tokens_give_replies_of_max_tokens(server):
    """`deltamem bench --server`'s fixed-length replies: OpenAI's logit_bias, -100 on the end tokens."""
    from pydeltamem.bench.server_load import end_token_bias

    messages = [user("Say hi.")]
    assert chat(server, messages, max_tokens=40)["choices"][0]["finish_reason"] == "stop"   # it would end early
    out = chat(server, messages, max_tokens=40, logit_bias=end_token_bias(smollm2_gguf()))
    assert out["usage"]["completion_tokens"] == 40 and out["choices"][0]["finish_reason"] == "length"

def test_tokenize_detokenize_and_metrics(server, library):
    status, _, data = request(server, "POST", "/tokenize", {"content": "Hello world"})
    tokens = json.loads(data)["tokens"]
    assert status == 200 and tokens == library.model.tokenize("Hello world", add_special=False)
    status, _, data = request(server, "POST", "/detokenize", {"tokens": tokens})
    assert json.loads(data)["content"] == "Hello world"
    chat(server, [user("Hi")], session="metrics-1")
    status, headers, data = request(server, "GET", "/metrics")
    text = data.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values['deltamem_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values["deltamem_completion_tokens_total"] >= 8 and values["deltamem_sessions"] >= 1
    for name in ("queue_length", "requests_in_flight", "sessions_live", "decode_tokens_per_second", "prompt_tokens_total"):
        assert f"deltamem_{name}" in values


@pytest.mark.parametrize("path, body, headers, status, code", [
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [user("x")]}, {}, 404, "model_not_found"),
    ("/v1/chat/completions", {"messages": []}, {}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, {}, 400, None),
    ("/v1/chat/completions", {"messages": [user("x"), {"role": "assistant", "content": "y"}]}, {}, 400, None),
    ("/v1/chat/completions", {"messages": [user("x")], "n": 2}, {}, 400, None),
    ("/v1/chat/completions", {"messages": [user("x")], "temperature": "hot"}, {}, 400, None),
    ("/v1/chat/completions", {"messages": [user("x")], "max_tokens": -5}, {}, 400, None),
    ("/v1/chat/completions", {"messages": [user("x")], "logit_bias": {"99999999": 1}}, {}, 400, None),
    ("/v1/chat/completions", {"messages": [user("x")]}, {"X-Session-Id": "../../etc/passwd"}, 400, "invalid_session_id"),
    ("/v1/chat/completions", {"messages": [user("x")]}, {"X-Session-Id": "a'; DROP TABLE turns;--"}, 400,
     "invalid_session_id"),
    ("/v1/chat/completions", {"messages": [user("x")], "session_id": "x" * 129}, {}, 400, "invalid_session_id"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, {}, 400, None),
    ("/v1/completions", {"prompt": "hello " * 3000}, {}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": ["a", "b"]}, {}, 400, None),
    ("/v1/completions", {"prompt": "x", "session_id": "s"}, {}, 400, None),
    ("/v1/nothing", {}, {}, 404, "not_found"),
    ("/detokenize", {"tokens": [-1]}, {}, 400, None),
])
def test_bad_requests_get_openai_errors(server, path, body, headers, status, code):
    got, _, data = request(server, "POST", path, body, headers)
    error = json.loads(data)["error"]
    assert got == status and isinstance(error["message"], str) and error["type"]
    if code is not None:
        assert error["code"] == code


def test_hostile_bodies(server):
    assert request(server, "POST", "/v1/chat/completions", raw=b"{not json")[0] == 400
    assert request(server, "POST", "/v1/chat/completions", raw=b"[1, 2]")[0] == 400
    assert request(server, "POST", "/v1/chat/completions", raw=b"[" * 100000 + b"]" * 100000)[0] in (400, 413)
    assert request(server, "POST", "/v1/chat/completions", raw=b"x" * (5 << 20))[0] == 413
    # A length claimed far beyond what is sent is refused before anything is read or allocated.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    assert request(server, "GET", "/v1/chat/completions")[0] == 405
    assert request(server, "GET", "/health")[0] == 200   # still serving


# ---------------------------------------------------------------------- sessions

def test_session_turns_equal_a_chat_session_alone(server, library):
    """Three turns through the server (only the new message each time) against the library's
    ChatSession with the same messages: the same replies and the same memory bytes."""
    session = library.session()
    for text in ("My name is Ada.", "I live in Paris.", "What is my name?"):
        got = reply_of(chat(server, [user(text)], session="alone-1", max_tokens=10))
        assert got == session.chat(text, max_tokens=10, temperature=0)
        assert memory_of(server, "alone-1") == library.memory_file(session.memory)
    status, _, data = request(server, "GET", "/v1/sessions/alone-1")
    info = json.loads(data)
    assert status == 200 and info["turns"] == 3 and info["memory_bytes"] == session.memory.nbytes
    assert [m["content"] for m in info["messages"][::2]] == ["My name is Ada.", "I live in Paris.", "What is my name?"]
    assert info["tokens"] == session.ctx.n_past
    header, payload = memfile.unpack_bytes(memory_of(server, "alone-1"), memfile.MEMORY_MAGIC, "memory", "http")
    assert header["fingerprint"] == library.model.adapter["fingerprint"]
    session.close()


def test_full_history_and_new_messages_give_the_same_session(server):
    history: list[dict] = [{"role": "system", "content": "Be brief."}]
    for text in ("Hello!", "Tell me a colour.", "Another one."):
        history.append(user(text))
        full = reply_of(chat(server, history, session="full-1"))
        new = reply_of(chat(server, history if len(history) == 2 else [user(text)], session="new-1"))
        assert full == new
        history.append({"role": "assistant", "content": full})
    assert memory_of(server, "full-1") == memory_of(server, "new-1")
    # The body field names a session as the header does (the openai client's extra_body).
    client = server.client()
    out = client.chat.completions.create(model="default", messages=[user("And a third?")], max_tokens=8,
                                         temperature=0, extra_body={"session_id": "full-1"})
    again = reply_of(chat(server, [user("And a third?")], session="new-1"))
    assert out.choices[0].message.content == again
    assert memory_of(server, "full-1") == memory_of(server, "new-1")


def test_edited_history_rewinds_the_memory(server):
    """A history that differs from the session's (an edited second question) continues from the end
    of the last shared turn: bit for bit the session that asked the edited question directly."""
    first = reply_of(chat(server, [user("I like tea.")], session="edit-1"))
    chat(server, [user("What do I like?")], session="edit-1")
    edited = [user("I like tea."), {"role": "assistant", "content": first}, user("What do I drink?")]
    got = reply_of(chat(server, edited, session="edit-1"))
    assert reply_of(chat(server, [user("I like tea.")], session="edit-2")) == first
    want = reply_of(chat(server, [user("What do I drink?")], session="edit-2"))
    assert got == want
    assert memory_of(server, "edit-1") == memory_of(server, "edit-2")
    info = json.loads(request(server, "GET", "/v1/sessions/edit-1")[2])
    assert info["turns"] == 2 and info["messages"][2]["content"] == "What do I drink?"
    # Without an assistant message, a repeated first question is a new turn, not a history to rewind to.
    before = memory_of(server, "edit-2")
    chat(server, [user("I like tea.")], session="edit-2")
    assert json.loads(request(server, "GET", "/v1/sessions/edit-2")[2])["turns"] == 3
    assert memory_of(server, "edit-2") != before


def test_write_false_reads_the_memory_only(server):
    chat(server, [user("Remember the number 7.")], session="ro-1")
    before = memory_of(server, "ro-1")
    chat(server, [user("What number?")], session="ro-1", write=False)
    assert memory_of(server, "ro-1") == before
    assert json.loads(request(server, "GET", "/v1/sessions/ro-1")[2])["turns"] == 2


def test_delete_and_list_sessions(server):
    chat(server, [user("Hi")], session="gone-1")
    listed = json.loads(request(server, "GET", "/v1/sessions?limit=1000")[2])
    assert "gone-1" in [s["id"] for s in listed["data"]]
    assert request(server, "DELETE", "/v1/sessions/gone-1")[0] == 200
    for path in ("/v1/sessions/gone-1", "/v1/sessions/gone-1/memory"):
        assert request(server, "GET", path)[0] == 404
    assert request(server, "DELETE", "/v1/sessions/gone-1")[0] == 404
    assert request(server, "GET", "/v1/sessions/%2e%2e")[0] == 400


def test_kill_9_and_restart_continue_with_identical_memory(tmp_path, adapter):
    s = Server(tmp_path, "--adapter", adapter).start()
    try:
        for text in ("My name is Ada.", "I have a cat."):
            chat(s, [user(text)], session="durable")
        chat(s, [user("Hello")], session="other")
        before = {sid: memory_of(s, sid) for sid in ("durable", "other")}
        # Killed in the middle of a turn: that turn is lost, nothing else.
        body = json.dumps({"messages": [user("Tell me a long story.")], "max_tokens": 400, "stream": True}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"X-Session-Id": "durable"})
        conn.getresponse().read(200)
        s.stop(signal.SIGKILL)
        s.start()
        assert {sid: memory_of(s, sid) for sid in ("durable", "other")} == before
        assert json.loads(request(s, "GET", "/v1/sessions/durable")[2])["turns"] == 2
        reply = reply_of(chat(s, [user("What is my name?")], session="durable"))
        assert reply and json.loads(request(s, "GET", "/v1/sessions/durable")[2])["turns"] == 3
        assert memory_of(s, "durable") != before["durable"]
    finally:
        s.stop()


def test_restored_session_equals_the_library_restore(tmp_path, adapter, library):
    """Eviction (a cache with room for one context) and a restart both continue a session from its
    exported state: what ChatSession.restore gives in the library."""
    with library.model.context(n_ctx=N_CTX) as probe:
        per_context = probe.kv_cache_bytes
    s = Server(tmp_path, "--adapter", adapter, "--cache-mib", str(per_context // 2**20 + 1)).start()
    try:
        a = library.session()
        chat(s, [user("My name is Ada.")], session="evict-a")
        a.chat("My name is Ada.", max_tokens=8, temperature=0)
        chat(s, [user("I am Bob.")], session="evict-b")   # evicts evict-a
        values = dict(line.split() for line in request(s, "GET", "/metrics")[2].decode().splitlines()
                      if line.startswith("deltamem_sessions_live"))
        assert values["deltamem_sessions_live"] == "1"
        state = a.export()
        a.close()
        a = library.restore(state)
        got = reply_of(chat(s, [user("What is my name?")], session="evict-a"))
        assert got == a.chat("What is my name?", max_tokens=8, temperature=0)
        assert memory_of(s, "evict-a") == library.memory_file(a.memory)
        a.close()
    finally:
        s.stop()


def test_memory_only_continuation_past_n_ctx(tmp_path, adapter, library):
    """Turns beyond n_ctx drop the context and keep the memory, as ChatSession.drop_context does."""
    s = Server(tmp_path, "--adapter", adapter, "--n-ctx", "160").start()   # the last --n-ctx counts
    try:
        lib = library.session(n_ctx=160)
        texts = [f"Fact {i}: the {w} is blue and I would like you to remember it well." for i, w in
                 enumerate(["sky", "sea", "car", "door", "pen", "cup"])]
        dropped = 0
        for text in texts:
            got = reply_of(chat(s, [user(text)], session="long", max_tokens=12))
            try:
                want = lib.chat(text, max_tokens=12, temperature=0)
            except ContextFullError:
                lib.drop_context()
                dropped += 1
                want = lib.chat(text, max_tokens=12, temperature=0)
            assert got == want
            assert memory_of(s, "long") == library.memory_file(lib.memory)
        assert dropped >= 1
        info = json.loads(request(s, "GET", "/v1/sessions/long")[2])
        assert info["turns"] == len(texts) and info["tokens"] < 160 and len(info["messages"]) == 2 * len(texts)
        lib.close()
    finally:
        s.stop()


# ---------------------------------------------------------------------- security and concurrency

def test_api_key(tmp_path):
    s = Server(tmp_path, "--api-key", "s3cret").start()
    try:
        assert request(s, "GET", "/health")[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, _, data = request(s, "GET", "/v1/models", headers=headers)
            assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"
            assert request(s, "GET", "/metrics", headers=headers)[0] == 401
            assert request(s, "GET", "/v1/sessions", headers=headers)[0] == 401
        assert request(s, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="nope").models.list()
        assert s.client(api_key="s3cret").models.list().data
    finally:
        s.stop()


def test_disconnect_frees_the_slot_and_a_full_queue_is_429(tmp_path):
    s = Server(tmp_path, "--parallel", "1", "--queue", "0").start()
    try:
        body = json.dumps({"messages": [user("Tell me a very long story.")], "max_tokens": 900, "stream": True,
                           "temperature": 0, "session_id": "cut"}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=body)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(300)
        status, headers, _ = request(s, "POST", "/v1/chat/completions", {"messages": [user("hi")], "max_tokens": 2})
        assert status == 429 and headers["retry-after"] == "1"
        conn.close()   # the client goes away mid-stream
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = request(s, "GET", "/metrics")[2].decode()
            if "deltamem_requests_in_flight 0" in metrics:
                break
            time.sleep(0.1)
        assert "deltamem_requests_in_flight 0" in metrics
        started = time.monotonic()
        assert reply_of(chat(s, [user("hi")], max_tokens=2)) is not None
        assert time.monotonic() - started < 20   # the cancelled story did not run its 900 tokens first
        info = json.loads(request(s, "GET", "/v1/sessions/cut")[2])
        assert info["turns"] == 1 and 0 < len(info["messages"][1]["content"])   # the reply so far is kept
    finally:
        s.stop()


def test_load_16_clients_on_8_sessions(server):
    """16 clients × 4 turns on 8 sessions at --parallel 4: every answer is what the same conversation
    gets alone, each session holds its own clients' messages only, nothing is lost."""
    answers: dict[str, str] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
            for turn in range(4):
                text = f"Client {i} says word number {turn}."
                out = c.chat.completions.create(model="default", messages=[user(text)], max_tokens=8, temperature=0,
                                                extra_headers={"X-Session-Id": f"load-{i // 2}"})
                answers[text] = out.choices[0].message.content
        except BaseException as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(answers) == 64
    for s in range(8):
        info = json.loads(request(server, "GET", f"/v1/sessions/load-{s}")[2])
        messages = info["messages"]
        assert info["turns"] == 8 and len(messages) == 16
        users = [m["content"] for m in messages[::2]]
        assert sorted(users) == sorted(f"Client {i} says word number {t}." for i in (2 * s, 2 * s + 1) for t in range(4))
        for question, reply in zip(users, [m["content"] for m in messages[1::2]]):
            assert answers[question] == reply
        # The same conversation, in the order the session served it, alone.
        for question, reply in zip(users, [m["content"] for m in messages[1::2]]):
            assert reply_of(chat(server, [user(question)], session=f"replay-{s}")) == reply
        assert memory_of(server, f"replay-{s}") == memory_of(server, f"load-{s}")


def test_health_is_503_while_loading(tmp_path, adapter, monkeypatch):
    from starlette.testclient import TestClient

    from pydeltamem.server.app import create_app
    from pydeltamem.server.engine import Engine, ServerConfig

    release = threading.Event()
    engine = Engine(ServerConfig(model_path=smollm2_gguf(), adapter=adapter, alias="m",
                                 sessions_path=str(tmp_path / "s.sqlite3"), n_ctx=256, n_threads=2))
    real_load = engine.load
    monkeypatch.setattr(engine, "load", lambda: (release.wait(60), real_load()))
    with TestClient(create_app(engine)) as http:
        assert http.get("/health").status_code == 503
        r = http.post("/v1/chat/completions", json={"messages": [user("hi")]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        release.set()
        assert engine.ready.wait(60)
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": [user("hi")], "max_tokens": 2}).status_code == 200


def test_a_sessions_file_of_another_adapter_is_refused(tmp_path, adapter):
    first = Server(tmp_path, "--adapter", adapter).start()
    chat(first, [user("hi")], session="x")
    first.stop()
    bare = Server(tmp_path)   # the same sessions file, without the adapter
    bare.start(wait=False)
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline:
            health = health_or_none(bare)
            if health is not None and health.get("status") != "loading":
                break
            time.sleep(0.1)
        assert health["status"] == "error" and "another model or adapter" in health["error"]
    finally:
        bare.stop()


def health_or_none(server: Server) -> dict | None:
    try:
        return json.loads(request(server, "GET", "/health")[2])
    except OSError:
        return None
