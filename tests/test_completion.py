"""End-to-end completions on the real default model (SmolLM2-135M-Instruct, Q4_1)."""
from __future__ import annotations

import pytest

import pydeltamem
from pydeltamem import _core
from pydeltamem.defaults import default_model_path

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model():
    # One thread: the test machines are small and shared; greedy results do not depend on it.
    with pydeltamem.Model(default_model_path(), n_ctx=256, n_threads=1) as m:
        yield m


def complete(model, prompt=PROMPT, **kw):
    kw.setdefault("temperature", 0)
    return model.create_completion(prompt, **kw)


def streamed(model, prompt=PROMPT, **kw):
    kw.setdefault("temperature", 0)
    chunks = list(model.create_completion(prompt, stream=True, **kw))
    return chunks, "".join(c["choices"][0]["text"] for c in chunks)


def test_greedy_completion_names_paris(model):
    out = complete(model, max_tokens=6)
    assert out["choices"][0]["text"].startswith(" Paris")


def test_completion_has_the_openai_shape(model):
    out = complete(model, max_tokens=6)
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int)
    assert out["model"] == model.model_path
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    n_prompt = len(model.tokenize(PROMPT))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 6, "total_tokens": n_prompt + 6}


def test_call_is_an_alias_and_token_prompts_work(model):
    by_text = complete(model, max_tokens=5)["choices"][0]["text"]
    by_ids = model(model.tokenize(PROMPT), max_tokens=5, temperature=0)["choices"][0]["text"]
    assert by_ids == by_text


def test_streaming_yields_the_same_text(model):
    whole = complete(model, max_tokens=20)["choices"][0]["text"]
    chunks, text = streamed(model, max_tokens=20)
    assert text == whole
    assert len(chunks) > 2   # pieces arrive one by one, not as one block
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_same_seed_same_text_when_sampling(model):
    kw = dict(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = complete(model, seed=1234, **kw)["choices"][0]["text"]
    b = complete(model, seed=1234, **kw)["choices"][0]["text"]
    _, c = streamed(model, seed=1234, **kw)
    assert a == b == c
    others = {complete(model, seed=s, **kw)["choices"][0]["text"] for s in (1, 2, 3)}
    assert len(others | {a}) > 1   # the seed really drives the draw


def _greedy_pieces(model, n):
    """Text of each of the first n greedily generated tokens (straight from the C++ loop)."""
    ctx = model.context(n_ctx=64)
    greedy = _core.Sampler(temperature=0)
    tokens, text, _ = _core.generate(ctx._native, greedy, model.tokenize(PROMPT), n, [], [])
    ctx.close()
    pieces = [model.detokenize([t]) for t in tokens]
    assert "".join(pieces) == text.decode()
    return pieces


def test_stop_string_spanning_tokens_is_cut_and_excluded(model):
    greedy = complete(model, max_tokens=20)["choices"][0]["text"]
    pieces = _greedy_pieces(model, 20)
    assert "".join(pieces) == greedy
    # A stop string made of the last character of one piece and the first two of the next ones.
    k = next(i for i in range(2, len(pieces) - 1) if pieces[i] and len(pieces[i + 1]) >= 1)
    boundary = len("".join(pieces[:k + 1]))
    stop = greedy[boundary - 1:boundary + 2]
    assert len(stop) == 3 and not any(stop in p for p in pieces)
    expected = greedy[:greedy.index(stop)]

    out = complete(model, max_tokens=20, stop=stop)
    assert out["choices"][0]["text"] == expected
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks, text = streamed(model, max_tokens=20, stop=[stop])
    assert text == expected   # the held-back partial stop string never leaked into a chunk
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_earliest_of_several_stop_strings_wins(model):
    greedy = complete(model, max_tokens=20)["choices"][0]["text"]
    late, early = greedy[12:16], greedy[3:5]
    out = complete(model, max_tokens=20, stop=[late, early])
    assert out["choices"][0]["text"] == greedy[:min(greedy.index(late), greedy.index(early))]


def test_absent_stop_string_changes_nothing(model):
    greedy = complete(model, max_tokens=10)
    out = complete(model, max_tokens=10, stop=["\u2603 never \u2603"])
    assert out["choices"][0] == greedy["choices"][0]


def test_prompt_longer_than_the_context_is_rejected(model):
    with pytest.raises(ValueError, match="n_ctx"):
        complete(model, "word " * 400)
    with pytest.raises(ValueError, match="n_ctx"):
        complete(model, "word " * 400, stream=True)   # eagerly, not at the first next()


def test_no_max_tokens_runs_until_the_context_is_full():
    with pydeltamem.Model(default_model_path(), n_ctx=16, n_threads=1) as small:
        out = small.create_completion(PROMPT, max_tokens=None, temperature=0)
    n_prompt = out["usage"]["prompt_tokens"]
    assert out["choices"][0]["finish_reason"] == "length"
    # Every generated token but the last went through the 16-cell context.
    assert out["usage"]["completion_tokens"] == 16 - n_prompt + 1


def test_errors_in_the_generation_thread_reach_the_caller(model):
    beyond_vocab = {model.n_vocab + 10: 1.0}
    with pytest.raises(ValueError):
        complete(model, max_tokens=4, logit_bias=beyond_vocab)
    with pytest.raises(ValueError):
        list(model.create_completion(PROMPT, max_tokens=4, logit_bias=beyond_vocab, stream=True))


def test_errors_in_the_piece_callback_propagate(model):
    ctx = model.context(n_ctx=64)
    sampler = _core.Sampler(temperature=0)

    def explode(piece: bytes):
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        _core.generate(ctx._native, sampler, model.tokenize(PROMPT), 8, [], [], explode)


def test_abandoned_stream_stops_and_frees_the_model(model):
    stream = model.create_completion(PROMPT, max_tokens=200, temperature=0, stream=True)
    next(stream)
    stream.close()   # stops the worker at its next piece
    assert complete(model, max_tokens=6)["choices"][0]["text"].startswith(" Paris")


def test_an_unread_stream_gives_the_model_up(model):
    """A stream nobody reads (but that is still referenced) pauses once STREAM_BUFFER pieces wait;
    the next completion then ends it instead of waiting for the whole generation."""
    from pydeltamem.completion import STREAM_BUFFER

    endless = {t: float("-inf") for t in (model.token_eos, model.token_eot) if t is not None}
    stream = model.create_completion(PROMPT, max_tokens=None, temperature=0, stream=True, logit_bias=endless)
    next(stream)
    assert complete(model, max_tokens=6)["choices"][0]["text"].startswith(" Paris")
    rest = list(stream)   # what it had made before it was ended, then its end
    assert rest[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(rest) <= STREAM_BUFFER + 2 < model.n_ctx // 2


def test_repeating_a_prompt_decodes_only_its_last_token(model, decoded_prompt_lengths):
    decoded = decoded_prompt_lengths
    first = complete(model, "Once upon a time, in a land far away,", max_tokens=8)
    again = complete(model, "Once upon a time, in a land far away,", max_tokens=8)
    assert again["choices"] == first["choices"]
    assert decoded[1] == 1   # the cached prefix was kept; its last token is re-decoded for logits
