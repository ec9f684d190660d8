"""Load for an OpenAI-compatible chat server (`deltamem bench --server`): N client threads, each a
conversation of T turns (turn k sends the whole history so far and a new user message), streamed,
temperature 0. Per request: its start, the arrival of its first content chunk (time to first token),
its end and its text.

The driver needs only the standard library (http.client and threads), so it loads the same way
whatever server it drives. Completion tokens are counted by the caller's `count_tokens(text)`
(token_counter: pydeltamem's tokenizer of the served GGUF), not read from a server's usage fields,
so that every server is counted alike.

    python -m pydeltamem.bench.server_load --port 8000 --model MODEL.gguf --clients 4
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

HOST = "127.0.0.1"
DEFAULT_TURNS, DEFAULT_MAX_TOKENS = 4, 64
SYSTEM = "You are a helpful assistant."
# Client i talks about TOPICS[i % len]; turn k asks QUESTIONS[k % len] about it. Each client's
# conversation differs from the others', and is the same from run to run and server to server.
TOPICS = ("the water cycle", "how a bicycle works", "the history of tea", "why the sky is blue",
          "how bread rises", "the planets of the solar system", "how vaccines work", "the rules of chess")
QUESTIONS = ("Tell me about {topic} in a few sentences.", "Give me one more detail about that.",
             "Explain it again for a ten-year-old.", "What is a common misconception about it?",
             "Summarise what you said in one sentence.", "Which question about it is still open?")


@dataclass
class Reply:
    start: float
    first: float | None    # the first chunk with content; None when none came
    end: float
    text: str
    error: str | None = None


def user_messages(client: int, turns: int) -> list[str]:
    topic = TOPICS[client % len(TOPICS)]
    return [QUESTIONS[k % len(QUESTIONS)].format(topic=topic) for k in range(turns)]


def _sse_data(resp: http.client.HTTPResponse) -> Iterator[str]:
    """The payloads of a server-sent event stream's `data:` lines (the servers send one line an
    event; comments such as sse-starlette's pings are skipped)."""
    for raw in iter(resp.readline, b""):
        line = raw.decode().strip()   # sse-starlette ends lines with \r\n
        if line.startswith("data:"):
            yield line[5:].strip()


def _read_stream(resp: http.client.HTTPResponse, start: float) -> Reply:
    first, parts = None, []
    for data in _sse_data(resp):
        if data == "[DONE]":
            return Reply(start, first, time.perf_counter(), "".join(parts))
        chunk = json.loads(data)
        if "error" in chunk:
            return Reply(start, first, time.perf_counter(), "".join(parts), f"error event: {chunk['error']}")
        text = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices", []))
        if text and first is None:
            first = time.perf_counter()
        parts.append(text)
    return Reply(start, first, time.perf_counter(), "".join(parts), "the stream ended without data: [DONE]")


def stream_chat(port: int, messages: list[dict], session: str, max_tokens: int, timeout: float,
                logit_bias: dict[str, float] | None = None) -> Reply:
    """One streamed chat completion, timed from just before the request is sent."""
    request = {"messages": messages, "stream": True, "temperature": 0, "max_tokens": max_tokens}
    if logit_bias:
        request["logit_bias"] = logit_bias
    body = json.dumps(request)
    headers = {"Content-Type": "application/json", "X-Session-Id": session}
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body.encode(), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read(2000).decode(errors="replace")
            return Reply(start, None, time.perf_counter(), "", f"HTTP {resp.status}: {detail}")
        return _read_stream(resp, start)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Reply(start, None, time.perf_counter(), "", f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def converse(port: int, client: int, turns: int, max_tokens: int, timeout: float,
             logit_bias: dict[str, float] | None = None) -> list[Reply]:
    """Client `client`'s conversation, in its own session; it stops at the first failed turn."""
    messages = [{"role": "system", "content": SYSTEM}]
    replies = []
    for question in user_messages(client, turns):
        messages.append({"role": "user", "content": question})
        reply = stream_chat(port, messages, f"bench-{client}", max_tokens, timeout, logit_bias)
        replies.append(reply)
        if reply.error:
            break
        messages.append({"role": "assistant", "content": reply.text})
    return replies


def run_load(port: int, clients: int, turns: int, max_tokens: int, timeout: float, warmup: bool = True,
             logit_bias: dict[str, float] | None = None) -> list[Reply]:
    """Every client's replies, the clients running at once. The warm-up request (a session of its
    own, not timed) takes what a server does on its first request out of the measure. logit_bias
    goes with every request (end_token_bias: replies of max_tokens tokens)."""
    if warmup:
        reply = stream_chat(port, [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": user_messages(0, 1)[0]}],
                            "bench-warmup", max_tokens, timeout, logit_bias)
        if reply.error:
            return [replace(reply, error=f"warm-up: {reply.error}")]
    results: list[list[Reply]] = [[] for _ in range(clients)]

    def client(i: int) -> None:
        results[i] = converse(port, i, turns, max_tokens, timeout, logit_bias)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for replies in results for r in replies]


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[-1] if len(xs) > 1 else xs[0]


def summarize_load(replies: list[Reply], count_tokens: Callable[[str], int]) -> dict:
    """Wall time (first start to last end), requests/s, aggregate completion tokens/s, time to first
    token p50/p95 and latency p50 in ms, mean tokens a reply; "errors" lists what failed."""
    errors = [r.error for r in replies if r.error]
    if errors:
        return {"errors": errors}
    wall = max(r.end for r in replies) - min(r.start for r in replies)
    tokens = [count_tokens(r.text) for r in replies]
    ttft = [(r.first - r.start) * 1e3 for r in replies if r.first is not None]
    return {
        "requests": len(replies),
        "wall_s": wall,
        "requests_per_s": len(replies) / wall,
        "tokens_per_s": sum(tokens) / wall,
        "ttft_p50_ms": statistics.median(ttft) if ttft else None,
        "ttft_p95_ms": _p95(ttft) if ttft else None,
        "latency_p50_ms": statistics.median((r.end - r.start) * 1e3 for r in replies),
        "tokens_per_reply": statistics.fmean(tokens),
        "errors": [],
    }


def token_counter(gguf: str) -> Callable[[str], int]:
    """The number of tokens of a text by pydeltamem's tokenizer of `gguf` (imported only here: the
    driver itself runs on the standard library)."""
    import pydeltamem

    model = pydeltamem.Model(gguf, n_ctx=256)
    return lambda text: len(model.tokenize(text, add_special=False))


def end_token_bias(gguf: str) -> dict[str, float]:
    """OpenAI's strongest logit_bias (-100) on the tokens that end a reply of `gguf`'s model: with it
    every reply runs to max_tokens, so servers compare on the same number of tokens, however long
    the model (or its δ-mem adapter) would have answered."""
    import pydeltamem

    with pydeltamem.Model(gguf, n_ctx=256) as model:
        return {str(t): -100.0 for t in model.end_of_turn_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description="drive a running OpenAI-compatible chat server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the served GGUF (its tokenizer counts the tokens)")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--turns", type=int, default=DEFAULT_TURNS)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    parser.add_argument("--natural-replies", action="store_true",
                        help="let replies end where the model ends them (default: every reply max_tokens long)")
    args = parser.parse_args()
    bias = None if args.natural_replies else end_token_bias(args.model)
    replies = run_load(args.port, args.clients, args.turns, args.max_tokens, args.timeout, logit_bias=bias)
    print(json.dumps(summarize_load(replies, token_counter(args.model)), indent=1))


if __name__ == "__main__":
    main()
