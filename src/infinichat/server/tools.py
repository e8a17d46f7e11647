"""OpenAI `tools` / `tool_choice` on /v1/chat/completions, through the model's own chat template.

- The template must have tool support: it reads the `tools` variable (as Qwen 2.5/3, Hermes, Llama 3.1 templates
  do); otherwise a request with tools is a 400. The tools, the assistant messages' `tool_calls` and the `tool`
  messages' answers are handed to the template as Hugging Face's `apply_chat_template(tools=...)` gives them
  (a call's `arguments` as an object).
- The model writes a call in the Hermes / Qwen form `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
  the reply's calls are parsed out of its text into `tool_calls` (finish reason "tool_calls"), the rest stays
  the content.
- `tool_choice` "required" or a named function constrains decoding (engine/grammar.py) to exactly one such block
  whose JSON matches a tool's name and parameters schema, so the call is valid whatever the weights; "auto" lets
  the model choose (and its calls are parsed when well-formed); "none" renders the tools but parses nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from typing import Any

from infinichat.engine.grammar import Grammar
from infinichat.model.chat_template import template_variables
from infinichat.server.errors import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(\{.*?\})\s*" + re.escape(CLOSE), re.S)


def template_reads_tools(template: str | None) -> bool:
    """Whether the chat template uses the `tools` variable (None: the ChatML fallback, which does not)."""
    if not template:
        return False
    try:
        return "tools" in template_variables(template)
    except Exception:  # a template that does not parse has no tool support (rendering reports the error)
        return False


def check_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools as the template receives them; a 400 naming the first bad one."""
    out: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param=f"tools.{i}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ApiError(
                400, f"tools[{i}].function.name {name!r}: 1-64 letters, digits, _ . -", param=f"tools.{i}.function.name"
            )
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object", f"tools.{i}.function")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools: two functions have the same name", param="tools")
    return out


def chosen(tools: list[dict[str, Any]], tool_choice: Any) -> tuple[str, list[dict[str, Any]]]:
    """(mode, the tools a call may use): mode "none" | "auto" | "required"."""
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return tool_choice or "auto", tools
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    match = [t for t in tools if t["function"]["name"] == name]
    if not match:
        raise ApiError(
            400,
            f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': ...}}}} "
            f"naming one of the tools, got {tool_choice!r}",
            param="tool_choice",
        )
    return "required", match


def call_grammar(tools: list[dict[str, Any]]) -> Grammar:
    """Exactly one `<tool_call>` block whose JSON is {"name": one of the tools, "arguments": its parameters}."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    lark = f"start: {json.dumps(OPEN + chr(10))} call {json.dumps(chr(10) + CLOSE)}\ncall: %json {json.dumps(schema)}\n"
    return Grammar("lark", lark)


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Assistant `tool_calls` (arguments parsed into objects) and tool answers, as chat templates read them."""
    out = []
    for m in messages:
        d = dict(m)
        calls = d.get("tool_calls")
        if calls:
            d["tool_calls"] = [_template_call(c) for c in calls]
        out.append({k: v for k, v in d.items() if v is not None})
    return out


def _template_call(c: dict[str, Any]) -> dict[str, Any]:
    fn = dict(c.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        with contextlib.suppress(json.JSONDecodeError):
            fn["arguments"] = json.loads(args)
    return {"id": c.get("id"), "type": "function", "function": fn}


def parse_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(content without the call blocks, or None when nothing else is left; the OpenAI `tool_calls`)."""
    names = {t["function"]["name"] for t in tools}
    calls, kept, at = [], [], 0
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue  # not a call: stays in the content
        if not isinstance(obj, dict) or obj.get("name") not in names:
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        kept.append(text[at : m.start()])
        at = m.end()
        calls.append(
            {
                "id": "call_" + secrets.token_hex(12),
                "type": "function",
                "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
    kept.append(text[at:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls
