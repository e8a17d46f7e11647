"""Prompt assembly in token ids: the model's chat template (one user message) or plain text.

The template is rendered once around a placeholder; the text before and after it is tokenized with
special tokens parsed, the user content without (a haystack file holding `<|im_start|>` stays text). So a
prompt is `prefix + content + suffix` in ids, and the generators can count and place content tokens
exactly (the needle's slot is known, the length is hit to the token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from infinichat.errors import InfinichatError
from infinichat.model.tokenizer import Tokenizer

_MARK = "\u2063INFINICHAT-USER-CONTENT\u2063"


@dataclass(frozen=True)
class PromptFormat:
    """`ids(content)` = prefix + content + suffix. `chat`: the model's chat template wraps the content as
    one user message with the generation prompt after it; else plain text (BOS first if the model adds one)."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    chat: bool

    @property
    def overhead(self) -> int:
        return len(self.prefix) + len(self.suffix)

    def ids(self, content: Sequence[int]) -> list[int]:
        return [*self.prefix, *content, *self.suffix]


def prompt_format(tok: Tokenizer, chat: bool = True) -> PromptFormat:
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    if not chat:
        return PromptFormat(tuple(bos), (), False)
    rendered = tok.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True)
    if rendered.count(_MARK) != 1:
        raise InfinichatError(
            "the model's chat template does not place the user message verbatim, so the prompt cannot be "
            "assembled; use --no-chat-template"
        )
    before, after = rendered.split(_MARK)
    prefix = tok.encode(before, parse_special=True)
    if bos and prefix[:1] != bos:
        prefix = bos + prefix
    return PromptFormat(tuple(prefix), tuple(tok.encode(after, parse_special=True)), True)


def next_turn_format(tok: Tokenizer, chat: bool = True) -> PromptFormat:
    """A later user turn of one conversation, after the assistant's answer (the cache holds the answer without
    its end-of-turn token: generation stops at EOS without evaluating it): chat: the template's text from the
    end of an assistant message to the next user message, and its generation prompt after it; plain text:
    nothing around the content."""
    if not chat:
        return PromptFormat((), (), False)
    marks = [_MARK + str(i) for i in range(3)]
    msgs = [{"role": role, "content": m} for role, m in zip(("user", "assistant", "user"), marks, strict=True)]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True)
    if any(rendered.count(m) != 1 for m in marks):
        raise InfinichatError(
            "the model's chat template does not place the messages verbatim, so a later turn cannot be assembled"
        )
    between = rendered.split(marks[1])[1].split(marks[2])[0]
    after = rendered.split(marks[2])[1]
    return PromptFormat(
        tuple(tok.encode(between, parse_special=True)), tuple(tok.encode(after, parse_special=True)), True
    )


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """User text as ids; control-token spellings in it stay plain text."""
    return tok.encode(text, parse_special=False)
