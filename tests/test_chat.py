"""Chat templates (rendering, helpers, sandbox, ChatML fallback) and chat completions on SmolLM2."""
from __future__ import annotations

import datetime
import warnings

import pytest

import pydeltamem
from pydeltamem.chat_template import CHATML_TEMPLATE, ChatTemplateError, model_chat_template, render_chat
from pydeltamem.defaults import default_model_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model():
    with pydeltamem.Model(default_model_path(), n_ctx=512, n_threads=1) as m:
        yield m


# ---- templates -------------------------------------------------------------------------------------

def test_smollm2_template_renders_like_hugging_face(model):
    # SmolLM2's template adds its default system prompt when the conversation has none.
    assert model.apply_chat_template(QUESTION) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}] + QUESTION
    assert model.apply_chat_template(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")


def test_missing_template_falls_back_to_chatml_with_a_warning():
    with pytest.warns(UserWarning, match="ChatML"):
        template = model_chat_template({"general.name": "no template here"})
    assert template == CHATML_TEMPLATE
    assert render_chat(template, [{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_chat_template({"tokenizer.chat_template": "{{ 1 }}"}) == "{{ 1 }}"


def test_template_helpers():
    msgs = [{"role": "user", "content": "héllo \"you\""}]
    template = ("{{ bos_token }}{{ messages[0] | tojson }}|{{ strftime_now('%Y') }}|"
                "{% if add_generation_prompt %}GO{% endif %}{{ eos_token }}")
    year = str(datetime.datetime.now().year)
    assert render_chat(template, msgs, bos_token="<s>", eos_token="</s>") == (
        '<s>{"role": "user", "content": "héllo \\"you\\""}|' + year + "|GO</s>")
    assert render_chat(template, msgs, add_generation_prompt=False).endswith(f"|{year}|")


def test_raise_exception_and_bad_templates_are_value_errors():
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first!') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="system first!"):
        render_chat(strict, [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="invalid chat template"):
        render_chat("{% for %}", [])
    with pytest.raises(ValueError, match="role"):
        render_chat(CHATML_TEMPLATE, [{"content": "no role"}])


def test_templates_run_sandboxed():
    with pytest.raises(ChatTemplateError):   # the immutable sandbox forbids mutating inputs
        render_chat("{{ messages.append(1) }}", [])
    with pytest.raises(ChatTemplateError):   # and reaching Python internals
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])


# ---- chat completions ------------------------------------------------------------------------------

def test_chat_completion_has_the_openai_shape(model):
    out = model.create_chat_completion(QUESTION, max_tokens=32, temperature=0)
    assert out["object"] == "chat.completion"
    assert out["id"].startswith("chatcmpl-")
    assert isinstance(out["created"], int) and out["model"] == model.model_path
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(model.tokenize(model.apply_chat_template(QUESTION), parse_special=True))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_stops_at_the_end_of_turn(model):
    out = model.create_chat_completion([{"role": "user", "content": "Say hello."}], temperature=0)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 100
    assert "<|im_end|>" not in out["choices"][0]["message"]["content"]


def test_streaming_chat_yields_the_same_message(model):
    whole = model.create_chat_completion(QUESTION, max_tokens=24, temperature=0)
    chunks = list(model.create_chat_completion(QUESTION, max_tokens=24, temperature=0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    assert content == whole["choices"][0]["message"]["content"]


def test_seeded_chat_is_reproducible(model):
    kw = dict(max_tokens=16, temperature=1.0, seed=7)
    first = model.create_chat_completion(QUESTION, **kw)["choices"][0]["message"]["content"]
    assert model.create_chat_completion(QUESTION, **kw)["choices"][0]["message"]["content"] == first


def test_a_growing_conversation_decodes_only_its_new_tokens(model, decoded_prompt_lengths):
    decoded = decoded_prompt_lengths
    conversation = [{"role": "user", "content": "Name a colour."}]
    first = model.create_chat_completion(conversation, max_tokens=12, temperature=0)
    n_first = first["usage"]["total_tokens"]
    conversation += [first["choices"][0]["message"], {"role": "user", "content": "And another one?"}]
    second = model.create_chat_completion(conversation, max_tokens=12, temperature=0)
    n_second_prompt = second["usage"]["prompt_tokens"]

    # The second prompt starts with the first prompt and answer; only what follows is decoded
    # (the last generated token of the first turn was never decoded, so at most one more).
    assert decoded[1] <= n_second_prompt - n_first + 2
    assert decoded[1] < n_second_prompt // 2

    # Reuse does not change the answer: a fresh model says the same.
    with pydeltamem.Model(default_model_path(), n_ctx=512, n_threads=1) as other:
        fresh = other.create_chat_completion(conversation, max_tokens=12, temperature=0)
    assert decoded[2] == n_second_prompt
    assert fresh["choices"][0]["message"] == second["choices"][0]["message"]


def test_token_properties(model):
    assert model.token_eot is not None and model.token_eos is not None
    assert model.detokenize([model.token_eot], special=True) == "<|im_end|>"
    assert model.detokenize([model.token_eot]) == ""   # control tokens are hidden by default
    assert model.tokenize("<|im_end|>", add_special=False, parse_special=True) == [model.token_eot]


# ---- the reference runtime's rendering: thinking switch, generation tags, content parts -------------

# The part of Qwen3's hybrid template that the switch changes, written here: thinking models open a
# reasoning block themselves unless the prompt closes an empty one.
HYBRID_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint("qwen3-untied"))


@pytest.mark.parametrize("name, thinking", [
    ("Qwen3-4B", False), ("Qwen3 8B", False), ("Qwen3-4B-Instruct-2507", None), ("Qwen3-4B-Thinking-2507", None),
    ("SmolLM3-3B", False), ("SmolLM2-135M-Instruct", None), ("Llama 3.2 1B", None)])
def test_hybrid_thinking_models_render_as_the_reference_does(hf_tokenizer, name, thinking):
    from pydeltamem.chat_template import ChatFormat, thinking_override

    assert thinking_override({"general.name": name}) is thinking
    fmt = ChatFormat(HYBRID_TEMPLATE, bos_token="", eos_token="", tokenize=lambda text, add: [],
                     enable_thinking=thinking_override({"general.name": name}))
    options = {} if thinking is None else {"enable_thinking": thinking}
    expected = hf_tokenizer.apply_chat_template(QUESTION, chat_template=HYBRID_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True, **options)
    assert fmt.render(QUESTION) == expected
    assert ("<think>" in expected) is (thinking is False)


def test_generation_tags_render_what_they_enclose(hf_tokenizer):
    # SmolLM3's templates wrap assistant turns in {% generation %} for training masks.
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}<a>{{ m['content'] }}</a>"
                "{% endgeneration %}{% else %}<u>{{ m['content'] }}</u>{% endif %}{% endfor %}")
    messages = QUESTION + [{"role": "assistant", "content": "Paris."}]
    expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert render_chat(template, messages) == expected == "<u>What is the capital of France?</u><a>Paris.</a>"


def test_openai_content_forms(model):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]},
             {"role": "assistant", "content": None}]
    assert render_chat(CHATML_TEMPLATE, parts, add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is the capital\nof France?<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")
    by_parts = model.create_chat_completion(parts[:1], max_tokens=8, temperature=0)
    by_text = model.create_chat_completion([{"role": "user", "content": "What is the capital\nof France?"}],
                                           max_tokens=8, temperature=0)
    assert by_parts["choices"][0]["message"] == by_text["choices"][0]["message"]
    with pytest.raises(ValueError, match="text content parts"):
        model.create_chat_completion([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ValueError, match="content must be"):
        model.create_chat_completion([{"role": "user", "content": 5}])
