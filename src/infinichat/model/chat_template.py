"""Render a model's chat template (Jinja2, sandboxed) into the prompt text.

The environment mirrors what Hugging Face templates are written against: `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII text, and the
`raise_exception` / `strftime_now` globals. A model without a template gets ChatML.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache, lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from infinichat.errors import InfinichatError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _TemplateRefusal(Exception):
    """Raised by `raise_exception(...)` inside a template (e.g. 'roles must alternate')."""


def _raise_exception(message: str) -> None:
    raise _TemplateRefusal(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja2's built-in `tojson`, no HTML escaping: the output is prompt text, not markup.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

    tags = {"generation"}  # noqa: RUF012  (jinja2's Extension API: a plain class attribute set)

    def parse(self, parser: Any) -> list[Any]:
        next(parser.stream)  # the `generation` name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Parse a template once; a syntax error becomes an `InfinichatError` naming the line."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InfinichatError(
            f"the chat template is not valid Jinja2 (line {e.lineno}: {e.message}); "
            "fix the template, or give none to use ChatML"
        ) from None


def template_variables(source: str) -> set[str]:
    """The variables a template reads from its caller (e.g. `tools`: the template has tool support)."""
    from jinja2 import meta

    return set(meta.find_undeclared_variables(_environment().parse(source)))


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InfinichatError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise InfinichatError(
                f"message {i} must be a dict with a 'role' key (and usually 'content'), got {m!r:.80}"
            )


def render_chat_template(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """The prompt text for `messages` under `template` (ChatML when `template` is None).

    `extra` becomes template variables too (`tools`, `documents`, `enable_thinking`, ...) and may
    override `bos_token` / `eos_token`. Errors in the template, or a refusal it raises, become an
    `InfinichatError` that says what went wrong.
    """
    _check_messages(messages)
    compiled = compile_template(template if template is not None else CHATML_TEMPLATE)
    variables: dict[str, Any] = {"bos_token": bos_token, "eos_token": eos_token}
    variables.update(extra)
    variables["messages"] = [dict(m) for m in messages]
    variables["add_generation_prompt"] = add_generation_prompt
    try:
        return compiled.render(**variables)
    except _TemplateRefusal as e:
        raise InfinichatError(f"the model's chat template refused this conversation: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise InfinichatError(
            f"the chat template failed on {len(messages)} message(s): {type(e).__name__}: {e}; "
            "messages are accepted as [{'role': 'system'|'user'|'assistant', 'content': str}, ...]"
        ) from None
