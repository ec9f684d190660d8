"""Which tokens of a conversation carry which δ-mem message and sentence ids.

The rules of the δ-mem reference chat runtime, which segment-mean adapters were trained with:

- The conversation is rendered message by message. Each message's span is what its turn adds to
  the tokens of the conversation before it (role header, content, closing tokens, and anything the
  template puts there, such as a default system prompt before the first message); when adding a
  message re-renders the end of the previous ones (some templates do), those tokens are replaced
  and join the new message's span, at most `MAX_ROLLBACK` of them.
- A system message's span carries id -1; every other message gets the next message id (0, 1, ...).
- The generation prompt appended after the last message carries -1.
- Sentence ids (sentence_mean) mark only a message's content tokens: the content is cut into
  sentences before each boundary (a blank line, or whitespace after . ! ? ; : and optional closing
  quotes or brackets, so the whitespace starts the next sentence); each sentence is tokenized on
  its own and gets the next sentence id. When the sentences' tokens do not add up to the content's
  tokens, the whole content is one sentence; when the content's tokens are not found in the
  message's span, it has none.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .chat_template import ChatFormat, message_text

MAX_ROLLBACK = 16   # tokens a new message may re-render at the end of the previous ones
_SENTENCE_BOUNDARY = re.compile(r"\n{2,}|(?<=[.!?;:])(?:[\"')\]\u201d\u2019]+)?\s+")


def sentence_pieces(text: str) -> list[str]:
    """text cut before each sentence boundary; "".join(pieces) == text."""
    cuts = [m.start() for m in _SENTENCE_BOUNDARY.finditer(text) if m.start() > 0]
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    return pieces or [text]


def _find(haystack: list[int], needle: list[int]) -> int | None:
    n = len(needle)
    return next((i for i in range(len(haystack) - n + 1) if haystack[i:i + n] == needle), None)


def content_sentence_ids(text_tokens: Callable[[str], list[int]], content: str, span: list[int],
                         next_id: int) -> tuple[list[int], int]:
    """Sentence ids of a message's span (-1 outside its content) and the next free sentence id."""
    ids = [-1] * len(span)
    content_tokens = text_tokens(content) if content else []
    start = _find(span, content_tokens) if content_tokens else None
    if start is None:
        return ids, next_id
    sentences = [text_tokens(piece) for piece in sentence_pieces(content)]
    if [t for s in sentences for t in s] != content_tokens:
        sentences = [content_tokens]   # the pieces tokenize differently: one sentence
    for sentence in filter(None, sentences):
        ids[start:start + len(sentence)] = [next_id] * len(sentence)
        start += len(sentence)
        next_id += 1
    return ids, next_id


@dataclass
class Segments:
    """Tokens of a rendered conversation with the ids of each (len(tokens) == len(message_ids) == ...)."""
    tokens: list[int] = field(default_factory=list)
    message_ids: list[int] = field(default_factory=list)
    sentence_ids: list[int] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)   # the messages rendered so far
    next_message_id: int = 0
    next_sentence_id: int = 0

    def ids(self, granularity: str | None) -> list[int] | None:
        """The ids a write granularity averages over (None for token writes). A sentence writes only
        inside a message (the official rule: both ids >= 0), so sentence ids come masked by message ids."""
        if granularity == "sentence_mean":
            return [s if m >= 0 else -1 for m, s in zip(self.message_ids, self.sentence_ids)]
        return {"message_mean": self.message_ids}.get(granularity)

    @property
    def reply_sentence_id(self) -> int:
        """The sentence id the next reply's generated tokens carry: one past the highest in use."""
        return max((i for i in self.sentence_ids if i >= 0), default=-1) + 1

    def _replace_tail(self, tokens: list[int], what: str) -> int:
        """Keeps the prefix shared with tokens (the new full rendering); returns its length."""
        keep = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            keep += 1
        if len(self.tokens) - keep > MAX_ROLLBACK:
            raise ValueError(f"the chat template is not prefix-stable ({what} re-renders "
                             f"{len(self.tokens) - keep} earlier tokens): the δ-mem write spans are undefined")
        del self.tokens[keep:], self.message_ids[keep:], self.sentence_ids[keep:]
        return keep

    def _append(self, tokens: list[int], message_id: int, sentence_ids: list[int]) -> None:
        self.tokens += tokens
        self.message_ids += [message_id] * len(tokens)
        self.sentence_ids += sentence_ids


def extend_segments(fmt: ChatFormat, seg: Segments, messages: Sequence[Mapping[str, Any]], *,
                    sentences: bool) -> Segments:
    """seg (of a prefix of messages, or empty) extended over the rest of messages (no generation prompt)."""
    out = Segments(list(seg.tokens), list(seg.message_ids), list(seg.sentence_ids), list(seg.messages),
                   seg.next_message_id, seg.next_sentence_id)
    for message in messages[len(seg.messages):]:
        out.messages.append(dict(message))
        rendered = fmt.tokens(out.messages, add_generation_prompt=False)
        keep = out._replace_tail(rendered, "a new message")
        span = rendered[keep:]
        if message["role"] == "system":
            out._append(span, -1, [-1] * len(span))
            continue
        sentence_ids = [-1] * len(span)
        if sentences:
            sentence_ids, out.next_sentence_id = content_sentence_ids(
                fmt.text_tokens, message_text(message.get("content")), span, out.next_sentence_id)
        out._append(span, out.next_message_id, sentence_ids)
        out.next_message_id += 1
    return out


def segments_for(fmt: ChatFormat, messages: Sequence[Mapping[str, Any]], *, sentences: bool,
                 cached: Segments | None = None) -> Segments:
    """The segments of messages (no generation prompt); `cached` (segments of earlier messages)
    is resumed when messages begin with its messages, which gives the same result faster."""
    start = cached if cached is not None and list(messages[:len(cached.messages)]) == cached.messages else Segments()
    return extend_segments(fmt, start, messages, sentences=sentences)


def with_generation_prompt(fmt: ChatFormat, seg: Segments) -> Segments:
    """seg followed by the generation prompt (ids -1)."""
    out = Segments(list(seg.tokens), list(seg.message_ids), list(seg.sentence_ids), list(seg.messages),
                   seg.next_message_id, seg.next_sentence_id)
    prompted = fmt.tokens(out.messages, add_generation_prompt=True)
    keep = out._replace_tail(prompted, "the generation prompt")
    tail = prompted[keep:]
    out._append(tail, -1, [-1] * len(tail))
    return out
