"""Chat sessions with δ-mem memory: sentence pieces, prefix reuse, persistence, memory-only continuation.
(What a session writes, call by call, against the reference runtime: test_session_fidelity.py.)"""
from __future__ import annotations

import numpy as np
import pytest

import pydeltamem
from dmem_fixtures import VARIANTS, make_adapter, write_adapter
from pydeltamem.convert.adapter import convert_adapter
from pydeltamem.segments import sentence_pieces
from pydeltamem.session import ChatSession

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def adapted(tiny_gguf, tiny_reference, tmp_path_factory):
    """adapted(variant) -> path of an adapter GGUF for the tiny Qwen3 backbone; plus the backbone path."""
    gguf_path = tiny_gguf("qwen3-untied", "f32")
    hf_model = tiny_reference("qwen3-untied")
    root = tmp_path_factory.mktemp("session_adapters")

    def get(variant: str):
        config, tensors = make_adapter(hf_model.config, VARIANTS[variant])
        folder = write_adapter(root / variant, config, tensors)
        out = root / f"{variant}.gguf"
        if not out.exists():
            convert_adapter(folder, out, base=gguf_path)
        return gguf_path, out
    return get


def test_sentence_pieces_cut_where_each_boundary_starts():
    # The reference's rule: a boundary is a blank line, or whitespace after . ! ? ; : (closing
    # quotes or brackets included); the cut is at its start, so it opens the next piece.
    text = 'He said "Hi." Then left! Why? Because: reasons\n\nNew para'
    assert sentence_pieces(text) == ['He said "Hi.', '" Then left!', " Why?", " Because:", " reasons", "\n\nNew para"]
    assert sentence_pieces("\n\nstarts blank. ") == ["\n\nstarts blank.", " "]
    assert sentence_pieces("") == [""] and sentence_pieces("no boundary") == ["no boundary"]


def test_turns_decode_only_new_tokens_and_write_memory(adapted):
    gguf_path, adapter = adapted("released")
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=512, kv_type="f32") as m:
        s = m.session(system="be brief")
        s.chat("hello there. how are you?", max_tokens=4, **GREEDY)
        n_after_first = s.ctx.n_past
        mem_first = s.memory.copy()
        assert np.abs(mem_first).max() > 0
        s.chat("tell me more", max_tokens=4, **GREEDY)
        assert s.ctx.n_past > n_after_first
        assert not np.array_equal(s.memory, mem_first)
        assert [msg["role"] for msg in s.messages] == ["system", "user", "assistant", "user", "assistant"]

        # The same conversation replayed from scratch in one prefill reaches the same memory when
        # the context holds it as the template renders it: the turns wrote each token exactly once.
        tokens = m.chat_format.tokens(s.messages, add_generation_prompt=False)
        assert s.ctx.tokens == tokens
        fresh = m.context(kv_type="f32")
        fresh.decode(tokens, logits="none")
        np.testing.assert_allclose(fresh.memory, s.memory, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("variant", ["released", "message_mean", "sentence_mean"])
def test_a_session_on_a_scheduler_decodes_only_in_its_steps(adapted, variant, monkeypatch):
    """A session that generates through a BatchScheduler also feeds its context there (a pass of its
    own beside the scheduler's steps would fight them for the CPU threads); its turns equal the same
    session alone, memory included."""
    gguf_path, adapter = adapted(variant)
    questions = ["hello there. how are you?", "tell me more. please!", "and then? go on."]
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=512, kv_type="f32") as m:
        alone = m.session(system="be brief")
        want = [alone.chat(q, max_tokens=5, **GREEDY) for q in questions]
        with pydeltamem.BatchScheduler(m, max_batch=2) as sched:
            s = ChatSession(m, system="be brief", scheduler=sched)

            def outside(self, *args, **kwargs):
                raise AssertionError("a pass outside the scheduler's steps")
            monkeypatch.setattr(pydeltamem.Context, "decode", outside)
            got = [s.chat(q, max_tokens=5, **GREEDY) for q in questions]
            monkeypatch.undo()
        assert got == want
        assert s.ctx.tokens == alone.ctx.tokens
        np.testing.assert_allclose(s.memory, alone.memory, rtol=1e-4, atol=1e-5)
        assert np.abs(alone.memory).max() > 0
        s.close()

def test_save_load_and_drop_context(adapted, tmp_path):
    gguf_path, adapter = adapted("released")
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=512) as m:
        s = m.session(system="be brief")
        s.chat("remember the number seven.", max_tokens=4, **GREEDY)
        s.save(tmp_path / "with_state.ses", include_state=True)
        s.save(tmp_path / "light.ses")
        saved_memory = s.memory.copy()

        exact = m.load_session(tmp_path / "with_state.ses")
        assert exact.messages == s.messages
        assert np.array_equal(exact.memory, s.memory)
        assert exact.ctx.tokens == s.ctx.tokens
        assert exact.chat("and then?", max_tokens=4, **GREEDY) == s.chat("and then?", max_tokens=4, **GREEDY)

        light = m.load_session(tmp_path / "light.ses")
        assert light.ctx.n_past == 0 and light.messages == exact.messages[:3]
        assert np.array_equal(light.memory, saved_memory)
        before = light.memory.copy()
        light.chat("go on", max_tokens=2, **GREEDY)   # rebuilds the KV cache by reading, then writes the new turn
        assert light.ctx.n_past > 0 and not np.array_equal(light.memory, before)

        mem = s.memory.copy()
        s.drop_context()
        assert s.ctx.n_past == 0
        assert np.array_equal(s.memory, mem)
        assert [msg["role"] for msg in s.messages] == ["system"]
        s.chat("what number?", max_tokens=3, **GREEDY)
        # Only the system prompt and the new turn are in the context.
        assert [msg["role"] for msg in s.messages] == ["system", "user", "assistant"]
        assert s.ctx.tokens == m.chat_format.tokens(s.messages, add_generation_prompt=False)

        s.forget()
        assert not np.any(s.memory) and s.ctx.n_past == 0

        s2 = m.session(memory=None)
        s2.ctx.save_memory(tmp_path / "zero.mem")
        started = m.session(memory=tmp_path / "zero.mem")
        assert not np.any(started.memory)


def test_session_file_of_another_adapter_raises(adapted, tmp_path):
    gguf_path, adapter = adapted("released")
    _, other = adapted("rank_4")
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=256) as m:
        m.session().save(tmp_path / "a.ses")
    with pydeltamem.Model(gguf_path, adapter=other, n_ctx=256) as m2:
        with pytest.raises(ValueError, match="another adapter"):
            m2.load_session(tmp_path / "a.ses")


def test_session_without_adapter_is_a_plain_chat(tiny_gguf):
    with pydeltamem.Model(tiny_gguf("qwen3-untied", "f32"), n_ctx=256) as m:
        s = m.session()
        assert isinstance(s.chat("hi", max_tokens=3, **GREEDY), str)
        with pytest.raises(ValueError, match="δ-mem adapter"):
            s.drop_context()


def test_cli_chat_with_adapter_commands(adapted, tmp_path):
    import subprocess
    import sys

    gguf_path, adapter = adapted("released")
    session_file = tmp_path / "chat.ses"
    script = f"/memory\nhello there\n/memory\n/save {session_file}\n/drop\nagain\n/load {session_file}\n/forget\n/memory\n/exit\n"
    run = subprocess.run([sys.executable, "-m", "pydeltamem.cli", "chat", "-m", str(gguf_path), "--adapter", str(adapter),
                          "--temp", "0", "-n", "3", "-c", "256"], input=script, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    norms = [line for line in run.stderr.splitlines() if line.startswith("memory norms per layer:")]
    assert len(norms) == 3
    values = [[float(x) for x in line.split(":")[1].split()] for line in norms]
    assert all(v == 0 for v in values[0]) and any(v > 0 for v in values[1]) and all(v == 0 for v in values[2])
    assert session_file.exists()
    assert "(context dropped; the memory is kept)" in run.stderr
    assert "(session loaded from" in run.stderr
    assert len(run.stdout.splitlines()) == 2   # the two answers, nothing else


def test_completions_can_read_the_memory_without_writing_it(adapted):
    gguf_path, adapter = adapted("released")
    with pydeltamem.Model(gguf_path, adapter=adapter, n_ctx=256) as m:
        m("hello there. how are you?", max_tokens=3, **GREEDY)
        shared = m._shared.ctx   # the context completions share
        written = shared.memory.copy()
        assert np.abs(written).max() > 0
        n_before = shared.n_past
        m(shared.tokens + m.tokenize(" more", add_special=False), max_tokens=3, write=False, **GREEDY)   # extends
        assert shared.n_past > n_before and np.array_equal(shared.memory, written)
        m("something else entirely", max_tokens=3, write=False, **GREEDY)   # diverges: the memory stays
        assert np.array_equal(shared.memory, written)
        m.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=3, write=False, **GREEDY)
        assert np.array_equal(shared.memory, written)
        chunks = list(m.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=3, write=False,
                                               stream=True, **GREEDY))
        assert chunks and np.array_equal(shared.memory, written)
        m("something else entirely", max_tokens=3, **GREEDY)   # a writing completion that diverges starts over
        assert not np.array_equal(shared.memory, written)
