"""Chat sessions write δ-mem memory exactly as the reference chat runtime (DeltaMemChatSession) does.

The oracle is `ReferenceSession` below: the reference's turn, written here from its session code
(deltamem/runtime/session.py, core/write_segmentation.py) — the conversation rendered message by
message with the Hugging Face tokenizer and template, the span and sentence rules, and the decode
calls of generate_reply (the prompt suffix; one call per generated token; the closing tokens;
starting over when the tokens diverge), greedy decoding — driving the float64 δ-mem reference
(tests/dmem_reference.py). Its decode calls are compared, token for token and id for id, with the
calls our session makes on its Context (observed on Context's public methods), and its memory and
replies with ours after every turn.
"""
from __future__ import annotations

import copy
import json
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

import pydeltamem
from dmem_fixtures import VARIANTS, make_adapter, write_adapter
from dmem_reference import DeltaMemReference
from pydeltamem.convert.adapter import convert_adapter
from pydeltamem.model import Context

TURNS = [
    "The capital of France is Paris. The capital of Italy is Rome!",
    "Memory lets a model remember what it has read: a small matrix per layer.\n\nWhy? Because it is written.",
    "She said \"hello\" and he said 'goodbye'; they're here.",
]
SYSTEM = "You are a quick brown fox."
MAX_NEW = 6
# Replies are drawn from whole words that are single tokens, so that their text tokenizes back to the
# same tokens and turns run the reference's usual path (the diverging one has its own test).
REPLY_WORDS = (" capital", " the", " is", " small", " token", " read", " and", " of")
GRANULARITY = {"released": "token", "message_mean": "message_mean", "sentence_mean": "sentence_mean"}


# ---- the reference runtime's rules, with the Hugging Face tokenizer ----------------------------------

_BOUNDARY = re.compile(r"\n{2,}|(?<=[.!?;:])(?:[\"')\]\u201d\u2019]+)?\s+")


def reference_sentence_chunks(text: str) -> list[str]:
    """write_segmentation.split_text_into_sentence_token_chunks: cut where each boundary starts."""
    if not text:
        return [""]
    chunks, start = [], 0
    for match in _BOUNDARY.finditer(text):
        if match.start() > start:
            chunks.append(text[start:match.start()])
        start = match.start()
    if start < len(text):
        chunks.append(text[start:])
    return chunks or [text]


def _lcp(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class ReferenceSpans:
    """_tokenize_chat_messages_with_write_span_ids and _sentence_ids_for_message_delta."""

    def __init__(self, tokenizer, sentences: bool):
        self.tok, self.sentences = tokenizer, sentences

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def render(self, messages, generation_prompt: bool) -> list[int]:
        out = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def sentence_ids(self, content: str, delta: list[int], next_id: int):
        ids = [-1] * len(delta)
        content_ids = self.encode(content)
        if not content_ids:
            return ids, next_id
        start = next((i for i in range(len(delta) - len(content_ids) + 1)
                      if delta[i:i + len(content_ids)] == content_ids), None)
        if start is None:
            return ids, next_id
        chunks = [self.encode(c) for c in reference_sentence_chunks(content)]
        if [t for c in chunks for t in c] != content_ids:
            ids[start:start + len(content_ids)] = [next_id] * len(content_ids)
            return ids, next_id + 1
        for c in chunks:
            if c:
                ids[start:start + len(c)] = [next_id] * len(c)
                start += len(c)
                next_id += 1
        return ids, next_id

    def spans(self, messages, generation_prompt: bool):
        tokens, message_ids, sentence_ids, previous = [], [], [], []
        next_message, next_sentence = 0, 0
        for i, message in enumerate(messages):
            current = self.render(messages[:i + 1], False)
            keep = _lcp(previous, current)
            assert len(previous) - keep <= 16
            del tokens[keep:], message_ids[keep:], sentence_ids[keep:]
            delta = current[keep:]
            tokens += delta
            if message["role"] == "system":
                message_ids += [-1] * len(delta)
                sentence_ids += [-1] * len(delta)
            else:
                message_ids += [next_message] * len(delta)
                next_message += 1
                if self.sentences:
                    ids, next_sentence = self.sentence_ids(message["content"], delta, next_sentence)
                    sentence_ids += ids
                else:
                    sentence_ids += [-1] * len(delta)
            previous = current
        if generation_prompt:
            prompted = self.render(messages, True)
            keep = _lcp(previous, prompted)
            del tokens[keep:], message_ids[keep:], sentence_ids[keep:]
            tail = prompted[keep:]
            tokens += tail
            message_ids += [-1] * len(tail)
            sentence_ids += [-1] * len(tail)
        return tokens, message_ids, sentence_ids


def effective_ids(granularity: str, message_ids, sentence_ids):
    """The ids a call's writes use: the granularity's, or none (token writes) when missing or all -1
    (delta_impl._message_write_inputs / _sentence_write_inputs)."""
    chosen = {"message_mean": message_ids, "sentence_mean": sentence_ids}.get(granularity)
    if chosen is None or not any(i >= 0 for i in chosen):
        return None
    return [int(i) for i in chosen]


def reply_vocabulary(tokenizer) -> list[int]:
    words = [tokenizer.encode(w, add_special_tokens=False) for w in REPLY_WORDS]
    assert all(len(w) == 1 for w in words)
    return [w[0] for w in words] + [tokenizer.eos_token_id]


def banned_bias(tokenizer, n_vocab: int) -> dict[int, float]:
    allowed = set(reply_vocabulary(tokenizer))
    return {t: float("-inf") for t in range(n_vocab) if t not in allowed}


class ReferenceSession:
    """DeltaMemChatSession.generate_reply (greedy) over the float64 reference; `calls` records each
    decode call as (tokens, effective ids, write) and each start-over as "reset". With `vocabulary`,
    the greedy choice is among those tokens only."""

    def __init__(self, ref: DeltaMemReference, tokenizer, granularity: str, system: str | None = None,
                 vocabulary: list[int] | None = None):
        self.ref, self.tok, self.granularity = ref, tokenizer, granularity
        self.vocabulary = vocabulary
        self.spans = ReferenceSpans(tokenizer, sentences=granularity == "sentence_mean")
        self.messages = [] if system is None else [{"role": "system", "content": system}]
        self.processed: list[int] = []
        self.calls: list = []

    def decode(self, tokens, message_ids, sentence_ids, write):
        ids = effective_ids(self.granularity, message_ids, sentence_ids)
        self.calls.append((list(tokens), ids, write))
        return self.ref.decode(tokens, message_ids=ids, sentence_ids=ids, write=write)[-1]

    def ingest(self, full, generation_prompt: bool, write: bool):
        keep = _lcp(self.processed, full)
        if keep < len(self.processed):
            self.ref.reset()
            self.calls.append("reset")
            keep = 0
        tokens, message_ids, sentence_ids = self.spans.spans(self.messages, generation_prompt)
        assert tokens == full
        logits = None
        if full[keep:]:
            logits = self.decode(full[keep:], message_ids[keep:], sentence_ids[keep:], write)
        self.processed = list(full)
        return logits

    def turn(self, text: str, max_new: int = MAX_NEW, write: bool = True) -> str:
        self.messages.append({"role": "user", "content": text})
        logits = self.ingest(self.spans.render(self.messages, True), True, write)
        _, _, sentence_ids = self.spans.spans(self.messages, False)
        reply_message = sum(m["role"] != "system" for m in self.messages)
        reply_sentence = max([i for i in sentence_ids if i >= 0], default=-1) + 1
        generated, token = [], self.choose(logits)
        for _ in range(max_new):
            if token == self.tok.eos_token_id:
                break
            generated.append(token)
            logits = self.decode([token], [reply_message], [reply_sentence], write)
            self.processed.append(token)
            token = self.choose(logits)
        reply = self.tok.decode(generated, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})
        self.ingest(self.spans.render(self.messages, False), False, write)
        return reply

    def choose(self, logits: torch.Tensor) -> int:
        if self.vocabulary is None:
            return int(torch.argmax(logits))
        return self.vocabulary[int(torch.argmax(logits[self.vocabulary]))]

    def snapshot(self, folder, dtype=torch.bfloat16) -> None:
        """save_snapshot's folder; the reference continues from the values as saved (rounded to dtype)."""
        folder.mkdir(parents=True, exist_ok=True)
        _, message_ids, sentence_ids = self.spans.spans(self.messages, False)
        (folder / "session.json").write_text(json.dumps({
            "messages": self.messages, "processed_input_ids": self.processed,
            "write_message_ids": message_ids, "write_sentence_ids": sentence_ids}, ensure_ascii=False, indent=2))
        state = {}
        for layer, s in self.ref.state.items():
            saved = s.to(dtype)
            self.ref.state[layer] = saved.to(torch.float64)
            state[f"model.layers.{layer}.self_attn"] = saved.unsqueeze(0) if s.shape[0] > 1 else saved
        torch.save(state, folder / "delta_state.pt")
        saved_cache = copy.copy(self.ref.cache)
        saved_cache.layers = []
        for layer in self.ref.cache.layers:
            layer.keys, layer.values = (x.to(dtype).to(torch.float64) for x in (layer.keys, layer.values))
            saved_layer = copy.copy(layer)
            saved_layer.keys, saved_layer.values = layer.keys.to(dtype), layer.values.to(dtype)
            saved_cache.layers.append(saved_layer)
        torch.save(saved_cache, folder / "past_key_values.pt")


# ---- our session, observed ------------------------------------------------------------------------

@pytest.fixture
def observed(monkeypatch):
    """The decode calls our sessions make, in ReferenceSession.calls' form."""
    calls: list = []
    decode, generate, reset_memory = Context.decode, Context.generate, Context.reset_memory

    def granularity(ctx):
        return GRANULARITY.get((ctx.model.adapter or {}).get("write_granularity"), "token")

    def spy_decode(self, tokens, logits="last", *, message_ids=None, sentence_ids=None, write=True):
        calls.append((list(tokens), effective_ids(granularity(self), message_ids, sentence_ids), write))
        return decode(self, tokens, logits, message_ids=message_ids, sentence_ids=sentence_ids, write=write)

    def spy_generate(self, tokens, sampler, *, seg_ids=None, seg_id=-1, write=True, **kw):
        before = self.n_past
        calls.append((list(tokens), effective_ids(granularity(self), seg_ids, seg_ids), write))
        gen = generate(self, tokens, sampler, seg_ids=seg_ids, seg_id=seg_id, write=write, **kw)
        for t in gen.tokens[:self.n_past - before - len(tokens)]:   # decoded inside the C++ loop
            calls.append(([t], [seg_id] if seg_id >= 0 else None, write))
        return gen

    def spy_reset_memory(self):
        calls.append("reset")
        reset_memory(self)

    monkeypatch.setattr(Context, "decode", spy_decode)
    monkeypatch.setattr(Context, "generate", spy_generate)
    monkeypatch.setattr(Context, "reset_memory", spy_reset_memory)
    return calls


@pytest.fixture(scope="module")
def backbone(tiny_checkpoint, tiny_gguf):
    """backbone(arch) -> (gguf path, HF tokenizer, fresh float HF model factory)."""
    from transformers import AutoTokenizer

    import tiny_models

    names = {"qwen3": "qwen3-untied", "smollm3": "smollm3-nope"}

    def get(arch: str):
        folder = tiny_checkpoint(names[arch])
        return (tiny_gguf(names[arch], "f32"), AutoTokenizer.from_pretrained(folder),
                lambda: tiny_models.load_reference(folder))
    return get


@pytest.fixture(scope="module")
def adapted(backbone, tmp_path_factory):
    """adapted(arch, variant) -> (gguf, adapter gguf, tokenizer, adapter config, tensors, HF model factory)."""
    root = tmp_path_factory.mktemp("fidelity")

    def get(arch: str, variant: str):
        gguf, tokenizer, hf_model = backbone(arch)
        config, tensors = make_adapter(hf_model().config, VARIANTS[variant])
        out = root / f"{arch}-{variant}.gguf"
        if not out.exists():
            convert_adapter(write_adapter(root / f"{arch}-{variant}", config, tensors), out, base=gguf)
        return gguf, out, tokenizer, config, tensors, hf_model
    return get


def memory_gap(ours: np.ndarray, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, that over the largest reference entry)."""
    ref = reference.numpy()
    diff = float(np.abs(ours.astype(np.float64) - ref).max())
    return diff, diff / float(np.abs(ref).max())


def assert_same_memory(ours, reference, label: str) -> None:
    abs_gap, rel_gap = memory_gap(ours, reference)
    print(f"{label}: max |Δmemory| = {abs_gap:.2e} ({rel_gap:.2e} of max |memory|)")
    assert float(np.abs(reference.numpy()).max()) > 0
    assert rel_gap < 2e-5, (label, abs_gap, rel_gap)


# ---- the tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["released", "message_mean", "sentence_mean"])
def test_three_turns_write_as_the_reference_runtime(adapted, observed, variant):
    gguf, adapter, tokenizer, config, tensors, hf_model = adapted("qwen3", variant)
    reference = ReferenceSession(DeltaMemReference(hf_model(), config, tensors), tokenizer, GRANULARITY[variant],
                                 system=SYSTEM, vocabulary=reply_vocabulary(tokenizer))
    closing = tokenizer.encode("<|im_end|>\n", add_special_tokens=False)
    with pydeltamem.Model(gguf, adapter=adapter, n_ctx=512, kv_type="f32") as m:
        s = m.session(system=SYSTEM)
        for i, text in enumerate(TURNS):
            start = len(observed), len(reference.calls)
            reply = s.chat(text, max_tokens=MAX_NEW, temperature=0, logit_bias=banned_bias(tokenizer, m.n_vocab))
            expected_reply = reference.turn(text)
            ours, theirs = observed[start[0]:], reference.calls[start[1]:]
            assert reply == expected_reply and reply
            assert [c[0] for c in ours] == [c[0] for c in theirs], f"turn {i}: tokens"
            assert ours == theirs, f"turn {i}: ids or write flags differ"
            assert s.messages == reference.messages
            assert_same_memory(s.memory, reference.ref.memory, f"{variant} turn {i}")
            # The reference's calls: the prompt suffix, one per generated token, the closing tokens
            # (under the reply's message id; sentence_mean gives them none, so they write token by token).
            n_reply = len(tokenizer.encode(reply, add_special_tokens=False))
            assert len(theirs) == 1 + n_reply + 1 and theirs[-1][0] == closing
            reply_id = 2 * i + 1
            assert theirs[-1][1] == ([reply_id] * 2 if variant == "message_mean" else None)
            if variant == "message_mean":   # the user message's span, the rest -1
                assert set(theirs[0][1]) == {-1, reply_id - 1}
            if variant == "sentence_mean":
                # The user message's sentences; the second turn's pieces tokenize differently from
                # its whole text (".\n\n" is one pre-token there, two in the pieces): one sentence.
                assert len(set(theirs[0][1]) - {-1}) == (1 if i == 1 else 2)


def test_read_only_turns_leave_the_memory_untouched(adapted, observed):
    gguf, adapter, tokenizer, config, tensors, hf_model = adapted("qwen3", "message_mean")
    reference = ReferenceSession(DeltaMemReference(hf_model(), config, tensors), tokenizer, "message_mean",
                                 vocabulary=reply_vocabulary(tokenizer))
    with pydeltamem.Model(gguf, adapter=adapter, n_ctx=512, kv_type="f32") as m:
        s = m.session()
        bias = banned_bias(tokenizer, m.n_vocab)
        for text, write in zip(TURNS, (True, False, True)):
            before = s.memory.copy()
            reply = s.chat(text, max_tokens=MAX_NEW, temperature=0, write=write, logit_bias=bias)
            assert reply == reference.turn(text, write=write)
            if not write:
                assert np.array_equal(s.memory, before)
            assert_same_memory(s.memory, reference.ref.memory, f"write={write}")
        assert observed == reference.calls
        assert [c[2] for c in observed].count(False) > 2   # the prompt, the reply, the closing tokens


def test_diverging_tokens_start_the_memory_over(adapted, observed):
    """A stop string cuts the reply: its tokens no longer match the conversation's rendering, so
    context and memory start over from the whole conversation, as the reference does on divergence."""
    gguf, adapter, tokenizer, config, tensors, hf_model = adapted("qwen3", "released")
    with pydeltamem.Model(gguf, adapter=adapter, n_ctx=512, kv_type="f32") as m:
        free = m.session().chat(TURNS[0], max_tokens=12, temperature=0)
        # A stop string of one character that first appears past the start and is a whole character
        # (a random model's text holds U+FFFD for bytes that are none; such a stop could never match).
        cut = next(i for i in range(1, len(free)) if free[i].strip() and free[i] != "\ufffd" and free[i] not in free[:i])
        stop = free[cut]
        observed.clear()
        s = m.session()
        answer = s.chat(TURNS[0], max_tokens=12, temperature=0, stop=stop)
        assert answer == free[:free.index(stop)]
        assert "reset" in observed
        full = m.chat_format.tokens(s.messages, add_generation_prompt=False)
        assert observed[-1] == (full, None, True) and s.ctx.tokens == full
    ref = DeltaMemReference(hf_model(), config, tensors)
    ref.decode(full)
    assert_same_memory(s.memory, ref.memory, "rebuilt")


@pytest.mark.parametrize("variant", ["message_mean", "sentence_mean"])
def test_chat_completions_write_with_the_session_ids(adapted, observed, variant):
    """create_chat_completion on a segment-mean adapter: the prompt under the reference's span ids,
    then each generated token under the reply's id (the loop leaves the last one undecoded)."""
    gguf, adapter, tokenizer, *_ = adapted("qwen3", variant)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]},
                {"role": "assistant", "content": " the capital"}, {"role": "user", "content": TURNS[1]}]
    tokens, message_ids, sentence_ids = ReferenceSpans(tokenizer, variant == "sentence_mean").spans(messages, True)
    reply_id = 3 if variant == "message_mean" else max(sentence_ids) + 1   # three messages before it
    with pydeltamem.Model(gguf, adapter=adapter, n_ctx=512, kv_type="f32") as m:
        out = m.create_chat_completion(messages, max_tokens=4, temperature=0, logit_bias=banned_bias(tokenizer, m.n_vocab))
    n_generated = out["usage"]["completion_tokens"]
    assert observed[0] == (tokens, effective_ids(variant, message_ids, sentence_ids), True)
    assert [c[1] for c in observed[1:]] == [[reply_id]] * (n_generated - 1 if n_generated == 4 else n_generated)


def test_drop_context_after_a_turn_keeps_the_whole_turn(adapted):
    gguf, adapter, tokenizer, *_ = adapted("qwen3", "released")
    with pydeltamem.Model(gguf, adapter=adapter, n_ctx=512, kv_type="f32") as m:
        s = m.session()
        s.chat(TURNS[0], max_tokens=MAX_NEW, temperature=0, logit_bias=banned_bias(tokenizer, m.n_vocab))
        conversation = m.chat_format.tokens(s.messages, add_generation_prompt=False)
        assert s.ctx.tokens == conversation   # closing tokens included: nothing is left to write
        fresh = m.context(kv_type="f32")
        fresh.decode(conversation, logits="none")
        np.testing.assert_allclose(s.memory, fresh.memory, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3", "smollm3"])
def test_reference_snapshot_continues_with_the_same_memory(adapted, tmp_path, arch):
    variant = "message_mean"
    gguf, adapter, tokenizer, config, tensors, hf_model = adapted(arch, variant)
    reference = ReferenceSession(DeltaMemReference(hf_model(), config, tensors), tokenizer, variant,
                                 vocabulary=reply_vocabulary(tokenizer))
    for text in TURNS[:2]:
        reference.turn(text)
    reference.snapshot(tmp_path / "snapshot")
    with pydeltamem.Model(gguf, adapter=adapter, n_ctx=512, kv_type="f32") as m:
        s = m.load_session(tmp_path / "snapshot")
        assert s.messages == reference.messages
        assert s.ctx.tokens == reference.processed
        np.testing.assert_array_equal(s.memory, reference.ref.memory.numpy().astype(np.float32))
        bias = banned_bias(tokenizer, m.n_vocab)
        assert s.chat(TURNS[2], max_tokens=MAX_NEW, temperature=0, logit_bias=bias) == reference.turn(TURNS[2])
        assert_same_memory(s.memory, reference.ref.memory, f"{arch} after the snapshot")


def test_snapshot_of_another_adapter_or_model_is_refused(adapted, tmp_path):
    gguf, adapter, tokenizer, config, tensors, hf_model = adapted("qwen3", "released")
    reference = ReferenceSession(DeltaMemReference(hf_model(), config, tensors), tokenizer, "token")
    reference.turn(TURNS[0])
    reference.snapshot(tmp_path / "snapshot")
    _, rank_4, *_ = adapted("qwen3", "rank_4")
    with pydeltamem.Model(gguf, adapter=rank_4, n_ctx=512) as m:
        with pytest.raises(ValueError, match="another adapter"):
            m.load_session(tmp_path / "snapshot")
    other_gguf, other_adapter, *_ = adapted("smollm3", "released")
    with pydeltamem.Model(other_gguf, adapter=other_adapter, n_ctx=512) as m:
        with pytest.raises(ValueError, match="another"):
            m.load_session(tmp_path / "snapshot")
    with pydeltamem.Model(gguf, adapter=adapter, n_ctx=512) as m:
        kv_file = tmp_path / "snapshot" / "past_key_values.pt"
        kv_file.rename(tmp_path / "kv.pt")
        torch.save({"not a cache": Fraction(1, 2)}, kv_file)   # a pickle naming other classes never runs them
        with pytest.raises(ValueError, match="refusing to load fractions.Fraction"):
            m.load_session(tmp_path / "snapshot")
        (tmp_path / "kv.pt").replace(kv_file)
        assert m.load_session(tmp_path / "snapshot").messages == reference.messages
        (tmp_path / "snapshot" / "session.json").write_text("[1, 2]")
        with pytest.raises(ValueError, match="session.json"):
            m.load_session(tmp_path / "snapshot")
