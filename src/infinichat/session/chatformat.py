"""A chat template, cut into per-message token pieces so a session evaluates only each new message.

A session's cache holds, in order: the system part (the system prompt or character card, pinned), then one
segment per message. Each message's tokens are what the template adds for it: render(history + [message])
minus render(history). That difference is computed once per message and never re-rendered, which only works
when the template renders a longer conversation as an extension of a shorter one ("prefix-stable"; ChatML,
Llama 3, Mistral-instruct v3, Qwen and SmolLM are). A template that is not (e.g. one that rewrites earlier
turns) is detected when the format is built, and ChatML is used instead, with a warning.

Header and suffix of a message (`<|im_start|>user\n` ... `<|im_end|>\n`) are found by rendering a sentinel
as its content. They are tokenized with special tokens parsed; the content itself is tokenized as plain text,
so a user typing `<|im_end|>` cannot forge a turn boundary.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from infinichat.errors import InfinichatError
from infinichat.model.chat_template import CHATML_TEMPLATE, render_chat_template

log = logging.getLogger(__name__)

SENTINEL = "\u2063sentinel\u2063"  # invisible separators around a word no message contains
_PROBE_A, _PROBE_B = "Hello there.", "What is two plus two?"


@dataclass(frozen=True)
class Pieces:
    """The template text around one message's content."""

    header: str
    suffix: str


class ChatFormat:
    def __init__(self, tokenizer, template: str | None = None):
        self.tok = tokenizer
        self.template = template if template is not None else getattr(tokenizer, "chat_template", None)
        self.bos_text = tokenizer.bos_token if tokenizer.bos_id is not None else ""
        self.eos_pieces = [tokenizer.id_to_piece(i) for i in sorted(tokenizer.eos_ids)]
        if not self._works():
            log.warning("the model's chat template does not render conversations incrementally; using ChatML")
            self.template = CHATML_TEMPLATE
            if not self._works():  # ChatML always should: a bug if not
                raise InfinichatError("cannot build an incremental chat format from ChatML")

    # ------------------------------------------------------------------ rendering
    def render(self, messages: Sequence[dict], gen: bool = False) -> str:
        return render_chat_template(
            self.template,
            messages,
            add_generation_prompt=gen,
            bos_token=self.tok.bos_token,
            eos_token=self.tok.eos_token,
        )

    def _works(self) -> bool:
        """Probe: a few conversations render as extensions of each other and split around a sentinel."""
        try:
            for sys in ([], [{"role": "system", "content": "Be brief."}]):
                convo = [
                    *sys,
                    {"role": "user", "content": _PROBE_A},
                    {"role": "assistant", "content": "Hi."},
                    {"role": "user", "content": _PROBE_B},
                ]
                base = self.system_text(sys[0]["content"] if sys else None)
                for k in range(1, len(convo) + 1):
                    text = self.render(convo[:k])
                    if not text.startswith(base):
                        return False
                    base = text
                self.pieces(convo, "assistant")
                self.generation_header(convo)
            return True
        except InfinichatError as e:
            log.debug("chat template probe failed: %s", e)
            return False

    def system_text(self, system_prompt: str | None) -> str:
        """The text every conversation starts with: the system block (the template's default one when
        `system_prompt` is None), found as what two different one-message conversations share, cut after
        the last end-of-turn marker."""
        sys = [{"role": "system", "content": system_prompt}] if system_prompt else []
        a = self.render([*sys, {"role": "user", "content": _PROBE_A}])
        b = self.render([*sys, {"role": "user", "content": _PROBE_B}])
        common = os.path.commonprefix([a, b])  # noqa: RUF071  (character by character is what is meant here)
        if sys:
            only = self.render(sys)
            if only and common.startswith(only):
                return only
        cut = max((common.rfind(p) + len(p) for p in self.eos_pieces if p and p in common), default=-1)
        if cut < 0:
            return self.bos_text if self.bos_text and common.startswith(self.bos_text) else ""
        while cut < len(common) and common[cut] in "\n ":
            cut += 1
        return common[:cut]

    def _base(self, history: Sequence[dict]) -> str:
        """The rendered text of `history`; a history of only the system message is the system text."""
        if all(m["role"] == "system" for m in history[:1]) and len(history) <= 1:
            return self.system_text(history[0]["content"] if history else None)
        return self.render(history)

    def _delta(self, history: Sequence[dict], message: dict, gen: bool = False) -> str:
        base = self._base(history)
        full = self.render([*history, message], gen=gen) if message else self.render(history, gen=gen)
        if not full.startswith(base):
            raise InfinichatError(
                "the chat template rendered earlier messages differently once a message was added; "
                "infinichat needs a template that extends the conversation (e.g. ChatML)"
            )
        return full[len(base) :]

    def pieces(self, history: Sequence[dict], role: str) -> Pieces:
        """Header and suffix the template puts around a `role` message appended to `history`."""
        text = self._delta(history, {"role": role, "content": SENTINEL})
        i = text.find(SENTINEL)
        if i < 0:
            raise InfinichatError(f"the chat template dropped the content of a {role!r} message")
        return Pieces(text[:i], text[i + len(SENTINEL) :])

    def generation_header(self, history: Sequence[dict]) -> str:
        """What the template adds to ask for an assistant reply (`<|im_start|>assistant\\n`)."""
        return self._delta(history, {}, gen=True)

    # ------------------------------------------------------------------ tokens
    def encode_special(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=False, parse_special=True) if text else []

    def encode_plain(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=False, parse_special=False) if text else []

    def system_tokens(self, system_prompt: str | None) -> list[int]:
        text = self.system_text(system_prompt)
        ids = self.encode_special(text)
        if self.tok.add_bos and self.tok.bos_id is not None and ids[:1] != [self.tok.bos_id]:
            ids.insert(0, self.tok.bos_id)
        return ids

    def message_tokens(self, history: Sequence[dict], role: str, content: str) -> tuple[list[int], int]:
        """Tokens of a whole message, and how many of them are the header."""
        p = self.pieces(history, role)
        head = self.encode_special(p.header)
        return head + self.encode_plain(content) + self.encode_special(p.suffix), len(head)
