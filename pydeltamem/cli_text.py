"""`deltamem generate` and `deltamem chat`: text generation from the terminal, streamed as it comes."""
from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from .defaults import default_model_path
from .model import Model

SAMPLING_DEFAULTS = {"generate": 0.8, "chat": 0.2}   # temperatures of create_completion / create_chat_completion


def load_model(spec: str | None, *, n_ctx: int, n_threads: int | None) -> Model:
    """A Model from -m: a GGUF path, REPO_ID:FILENAME_GLOB on the Hugging Face Hub, or (None) the
    embedded default model."""
    if spec is None:
        return Model(default_model_path(), n_ctx=n_ctx, n_threads=n_threads)
    if os.path.exists(spec) or ":" not in spec:
        return Model(spec, n_ctx=n_ctx, n_threads=n_threads)
    repo_id, _, pattern = spec.partition(":")
    if not repo_id or not pattern:
        raise ValueError(f"-m expects a GGUF path or REPO_ID:FILENAME_GLOB, got {spec!r}")
    return Model.from_pretrained(repo_id, pattern, n_ctx=n_ctx, n_threads=n_threads)


def _add_model_options(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("-m", "--model", metavar="MODEL",
                   help="GGUF path or REPO_ID:FILENAME_GLOB (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--temp", type=float, default=SAMPLING_DEFAULTS[command], metavar="T",
                   help=f"temperature, 0 = greedy (default {SAMPLING_DEFAULTS[command]})")
    p.add_argument("--top-k", type=int, default=40, metavar="K", help="top-k (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="top-p (default 0.95)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="RNG seed (default: random)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, metavar="N", help="context length (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="threads (default: physical cores)")


def _sampling(args: argparse.Namespace) -> dict:
    return {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="complete a prompt, streaming the text to stdout",
                                description="Complete PROMPT with a model, streaming the text to stdout.")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("-n", "--max-tokens", type=int, default=256, metavar="N",
                     help="tokens to generate at most; <= 0: until the context is full (default 256)")
    gen.add_argument("--no-echo", action="store_true", help="print only the completion, not the prompt first")
    _add_model_options(gen, "generate")
    gen.set_defaults(func=_run_generate)

    chat = subparsers.add_parser("chat", help="chat with a model (interactive, or from piped stdin)",
                                 description="Chat with a model. Each input line is a user message; the answer "
                                             "streams to stdout. Commands: /reset (forget the conversation), "
                                             "/exit (or end of input).")
    chat.add_argument("--system", metavar="TEXT", help="system prompt")
    chat.add_argument("-n", "--max-tokens", type=int, default=None, metavar="N",
                      help="tokens per answer at most (default: until the end of the turn)")
    _add_model_options(chat, "chat")
    chat.set_defaults(func=_run_chat)


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


def _run_generate(args: argparse.Namespace) -> int:
    model = load_model(args.model, n_ctx=args.ctx_size, n_threads=args.threads)
    if not args.no_echo:
        _write(sys.stdout, args.prompt)
    for chunk in model.create_completion(args.prompt, max_tokens=args.max_tokens, stream=True, **_sampling(args)):
        _write(sys.stdout, chunk["choices"][0]["text"])
    _write(sys.stdout, "\n")
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    model = load_model(args.model, n_ctx=args.ctx_size, n_threads=args.threads)
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    if interactive:
        print("Type a message; /reset forgets the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        line = _read_line("> " if interactive else None)
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            if interactive:
                print("(conversation reset)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        answer = []
        try:
            for chunk in model.create_chat_completion(messages, max_tokens=args.max_tokens, stream=True,
                                                      **_sampling(args)):
                piece = chunk["choices"][0]["delta"].get("content", "")
                answer.append(piece)
                _write(sys.stdout, piece)
        except KeyboardInterrupt:   # Ctrl-C stops this answer, not the chat
            if not interactive:
                raise
        _write(sys.stdout, "\n")
        messages.append({"role": "assistant", "content": "".join(answer)})


def _read_line(prompt: str | None) -> str | None:
    """One line of input without its newline; None at the end of input."""
    if prompt is not None:
        try:
            return input(prompt)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None
