"""`deltamem generate` and `deltamem chat`, run as a user runs them: in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pydeltamem
from pydeltamem.defaults import default_model_path

from test_hub import build_hub_cache

FAST = ["--temp", "0", "-t", "1", "-c", "512"]


def deltamem(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pydeltamem.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def model():
    with pydeltamem.Model(default_model_path(), n_ctx=512, n_threads=1) as m:
        yield m


def test_generate_streams_the_completion(model):
    run = deltamem("generate", "The capital of France is", "-n", "8", *FAST)
    assert run.returncode == 0, run.stderr
    expected = model.create_completion("The capital of France is", max_tokens=8, temperature=0)
    assert run.stdout == "The capital of France is" + expected["choices"][0]["text"] + "\n"
    assert " Paris" in run.stdout


def test_generate_without_echo_and_with_a_model_path():
    run = deltamem("generate", "The capital of France is", "-n", "3", "--no-echo", "-m", default_model_path(), *FAST)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(" Paris")


def test_generate_seed_makes_sampling_repeatable():
    args = ("generate", "Once upon a time", "-n", "12", "--temp", "1.0", "--top-k", "0", "--top-p", "1",
            "--seed", "42", "-t", "1")
    assert deltamem(*args).stdout == deltamem(*args).stdout


def _answer(model, messages):
    return model.create_chat_completion(messages, temperature=0)["choices"][0]["message"]["content"]


def test_chat_from_piped_stdin_with_reset_and_exit(model):
    system = {"role": "system", "content": "You are a friendly assistant."}
    hi = {"role": "user", "content": "Hi!"}
    run = deltamem("chat", "--system", system["content"], *FAST,
                   stdin="Hi!\n/reset\nHi!\n/exit\nThis line is never read.\n")
    assert run.returncode == 0, run.stderr
    # After /reset the same question starts the same conversation again, so the answer repeats.
    answer = _answer(model, [system, hi])
    assert answer.strip()
    assert run.stdout == answer + "\n" + answer + "\n"   # no prompts or banners on stdout when piped


def test_chat_keeps_the_conversation_and_ends_at_end_of_input(model):
    run = deltamem("chat", *FAST, stdin="My name is Ada.\nWhat is my name?\n")
    assert run.returncode == 0, run.stderr
    hello = [{"role": "user", "content": "My name is Ada."}]
    first = _answer(model, hello)
    second = _answer(model, hello + [{"role": "assistant", "content": first},
                                     {"role": "user", "content": "What is my name?"}])
    assert run.stdout == first + "\n" + second + "\n"


def test_model_from_the_hub_cache(tmp_path):
    cache = build_hub_cache(tmp_path / "hub", "example-org/smol-GGUF",
                            {"smol.Q4_1.gguf": Path(default_model_path()), "smol.Q8_0.gguf": b"x"})
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    run = deltamem("generate", "The capital of France is", "-n", "3", "--no-echo",
                   "-m", "example-org/smol-GGUF:*Q4_1.gguf", *FAST, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(" Paris")
    run = deltamem("generate", "x", "-m", "example-org/smol-GGUF:*.gguf", *FAST, env=env)
    assert run.returncode == 1
    assert "smol.Q4_1.gguf" in run.stderr and "smol.Q8_0.gguf" in run.stderr


def test_missing_model_file_is_a_clean_error(tmp_path):
    run = deltamem("generate", "x", "-m", str(tmp_path / "absent.gguf"))
    assert run.returncode == 1
    assert "error" in run.stderr and "Traceback" not in run.stderr
