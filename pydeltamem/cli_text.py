"""`deltamem generate` and `deltamem chat`: text generation from the terminal, streamed as it comes."""
from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from .cli_devices import add_device_options, device_kwargs
from .defaults import default_model_path, model_path_from_spec
from .hub import adapter_gguf_from_hub
from .model import Model
from .sampling import SamplingParams
from .session import ChatSession

# The defaults each command samples with: create_completion's and create_chat_completion's.
SAMPLING_DEFAULTS = {"generate": SamplingParams(), "chat": SamplingParams.chat()}


def model_files(spec: str | None, adapter: str | None = None) -> tuple[str, str | None]:
    """The GGUF paths of -m (a GGUF path, REPO_ID:FILENAME_GLOB on the Hugging Face Hub, or None: the
    default model, pydeltamem.defaults) and of --adapter (a δ-mem adapter GGUF, or the REPO_ID of an
    official δ-mem release on the Hub, converted once for this model)."""
    path = default_model_path() if spec is None else model_path_from_spec(spec)
    if adapter is not None and not os.path.exists(adapter) and _looks_like_repo_id(adapter):
        adapter = adapter_gguf_from_hub(adapter, path)
    return path, adapter


def load_model(spec: str | None, *, n_ctx: int, n_threads: int | None, adapter: str | None = None,
               **devices) -> Model:
    """A Model of model_files(spec, adapter); devices: Model()'s device arguments."""
    path, adapter = model_files(spec, adapter)
    return Model(path, n_ctx=n_ctx, n_threads=n_threads, adapter=adapter, **devices)


def _looks_like_repo_id(text: str) -> bool:
    owner, slash, name = text.partition("/")
    return bool(slash and owner and name) and "/" not in name and not text.endswith(".gguf")


def _add_model_options(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("-m", "--model", metavar="MODEL",
                   help="GGUF path or REPO_ID:FILENAME_GLOB (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", metavar="ADAPTER",
                   help="δ-mem adapter: a GGUF (see deltamem convert-adapter) or the REPO_ID of an official release "
                        "on the Hugging Face Hub, e.g. declare-lab/delta-mem_qwen3_4b-instruct")
    defaults = SAMPLING_DEFAULTS[command]
    p.add_argument("--temp", type=float, default=defaults.temperature, metavar="T",
                   help=f"temperature, 0 = greedy (default {defaults.temperature:g})")
    p.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K", help=f"top-k (default {defaults.top_k})")
    p.add_argument("--top-p", type=float, default=defaults.top_p, metavar="P", help=f"top-p (default {defaults.top_p:g})")
    p.add_argument("--min-p", type=float, default=defaults.min_p, metavar="P", help=f"min-p (default {defaults.min_p:g})")
    p.add_argument("--repeat-penalty", type=float, default=defaults.repeat_penalty, metavar="R",
                   help=f"repeat penalty over the last {defaults.penalty_last_n} tokens (default {defaults.repeat_penalty:g})")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="RNG seed (default: random)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, metavar="N", help="context length (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="threads (default: physical cores)")
    add_device_options(p)


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, seed=args.seed)


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
                                             "/exit (or end of input); with a δ-mem adapter also /memory "
                                             "(per-layer state norms), /save FILE, /load FILE, /forget "
                                             "(clear memory and conversation), /drop (drop the context, keep "
                                             "the memory).")
    chat.add_argument("--system", metavar="TEXT", help="system prompt")
    chat.add_argument("-n", "--max-tokens", type=int, default=None, metavar="N",
                      help="tokens per answer at most (default: until the end of the turn)")
    _add_model_options(chat, "chat")
    chat.set_defaults(func=_run_chat)


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


def _run_generate(args: argparse.Namespace) -> int:
    model = load_model(args.model, n_ctx=args.ctx_size, n_threads=args.threads, adapter=args.adapter,
                       **device_kwargs(args))
    if not args.no_echo:
        _write(sys.stdout, args.prompt)
    for chunk in model.create_completion(args.prompt, max_tokens=args.max_tokens, stream=True, sampling=_sampling(args)):
        _write(sys.stdout, chunk["choices"][0]["text"])
    _write(sys.stdout, "\n")
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    model = load_model(args.model, n_ctx=args.ctx_size, n_threads=args.threads, adapter=args.adapter,
                       **device_kwargs(args))
    interactive = sys.stdin.isatty()
    session = model.session(system=args.system)
    if interactive:
        print("Type a message; /reset forgets the conversation, /exit (or Ctrl-D) quits"
              + ("; /memory /save FILE /load FILE /forget /drop manage δ-mem." if model.adapter else "."),
              file=sys.stderr)
    while True:
        line = _read_line("> " if interactive else None)
        if line is None or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            session = _chat_command(text, session, model)
            continue
        try:
            for piece in session.chat(line, stream=True, max_tokens=args.max_tokens, sampling=_sampling(args)):
                _write(sys.stdout, piece)
        except KeyboardInterrupt:   # Ctrl-C stops this answer, not the chat
            if not interactive:
                raise
        _write(sys.stdout, "\n")


def _chat_command(text: str, session: ChatSession, model: Model) -> ChatSession:
    """Runs one /command; returns the session to go on with. Replies go to stderr: stdout carries
    only the answers, so that piped output stays clean."""
    command, _, arg = text.partition(" ")
    arg = arg.strip()

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if command == "/reset":
            session.forget()   # the conversation, and the memory that holds it
            say("(conversation reset)")
        elif command in ("/memory", "/save", "/load", "/forget", "/drop") and model.adapter is None:
            say(f"{command} needs a δ-mem adapter (--adapter)")
        elif command == "/memory":
            norms = session.memory_norms()
            say("memory norms per layer: " + " ".join(f"{n:.3f}" for n in norms))
        elif command == "/save":
            session.save(_require(arg, command))
            say(f"(session saved to {arg})")
        elif command == "/load":
            session = model.load_session(_require(arg, command))
            say(f"(session loaded from {arg}: {len(session.messages)} messages)")
        elif command == "/forget":
            session.forget()
            say("(memory and conversation cleared)")
        elif command == "/drop":
            session.drop_context()
            say("(context dropped; the memory is kept)")
        else:
            say(f"unknown command {command}")
    except (ValueError, OSError) as e:
        say(f"error: {e}")
    return session


def _require(arg: str, command: str) -> str:
    if not arg:
        raise ValueError(f"{command} needs a file name")
    return arg


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
