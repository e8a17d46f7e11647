"""OpenAI tools through the model's chat template (server/tools.py), with the official client, on a tiny random
model given a tool-capable (Qwen/Hermes-style) template: a required or named tool call is constrained to a valid
call and parsed into `tool_calls`; the tools and earlier calls reach the template; a template without tool support
is a 400."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from server_util import LiveServer

from infinichat.server.tools import parse_calls, template_reads_tools

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the shape of Qwen 2.5's template, shortened: tools in the system turn, calls as <tool_call> blocks
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for t in tools %}{{ t.function | tojson }}
{% endfor %}</tools>
Call a function as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}{% if m.role == 'system' %}{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def live(tiny_chat_model, tmp_path_factory):
    tok = copy.copy(tiny_chat_model.tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    with LiveServer(dataclasses.replace(tiny_chat_model, tokenizer=tok), tmp_path_factory.mktemp("data")) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain(tiny_chat_model, tmp_path_factory):
    with LiveServer(tiny_chat_model, tmp_path_factory.mktemp("data2")) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def _check(call, tools):
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in spec
    jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])


@pytest.mark.parametrize("seed", [1, 2])
def test_tool_call_parsed_through_the_openai_client(oc, seed):
    tools = [WEATHER, TIME]
    r = oc.chat.completions.create(
        model="x", messages=MSGS, tools=tools, tool_choice="required", max_tokens=200, temperature=1.0, seed=seed
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    _check(c.message.tool_calls[0], tools)
    # the call and its answer go back through the template, and the model answers
    call = c.message.tool_calls[0]
    more = [
        *MSGS,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    r2 = oc.chat.completions.create(model="x", messages=more, tools=tools, max_tokens=5, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length")
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens + 20  # the call and the answer were rendered


def test_tool_choice_named_function(oc):
    choice = {"type": "function", "function": {"name": "get_time"}}
    kw = {"model": "x", "messages": MSGS, "tools": [WEATHER, TIME], "max_tokens": 200, "temperature": 1.0, "seed": 3}
    r = oc.chat.completions.create(**kw, tool_choice=choice)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    _check(call, [TIME])
    parts = list(oc.chat.completions.create(**kw, tool_choice=choice, stream=True))
    calls = [tc for p in parts if p.choices for tc in (p.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_time", call.function.arguments)]
    assert parts[-1].choices[0].finish_reason == "tool_calls"


def test_auto_renders_the_tools_and_parses_nothing_unasked(oc):
    with_tools = oc.chat.completions.create(model="x", messages=MSGS, tools=[WEATHER], max_tokens=4, temperature=0)
    without = oc.chat.completions.create(model="x", messages=MSGS, max_tokens=4, temperature=0)
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 30  # the tool list was in the prompt
    assert with_tools.choices[0].finish_reason in ("stop", "length")  # a random model writes no call block


def test_bad_tool_requests_are_400(oc, plain):
    with pytest.raises(openai.BadRequestError, match="no tool support"):
        plain.chat.completions.create(model="x", messages=MSGS, tools=[WEATHER], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        oc.chat.completions.create(
            model="x", messages=MSGS, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}
        )
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        oc.chat.completions.create(model="x", messages=MSGS, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]"):
        oc.chat.completions.create(model="x", messages=MSGS, tools=[{"type": "retrieval"}])
    with pytest.raises(openai.BadRequestError, match="tool messages need the request's tools"):
        oc.chat.completions.create(model="x", messages=[*MSGS, {"role": "tool", "content": "x", "tool_call_id": "1"}])


def test_parse_calls_and_template_detection():
    text = 'Sure.<tool_call>\n{"name": "get_time", "arguments": {"zone": 2}}\n</tool_call><tool_call>{bad}</tool_call>'
    content, calls = parse_calls(text, [TIME])
    assert content == "Sure.<tool_call>{bad}</tool_call>" and json.loads(calls[0]["function"]["arguments"]) == {
        "zone": 2
    }
    assert parse_calls("no calls", [TIME]) == ("no calls", [])
    assert template_reads_tools(TOOL_TEMPLATE) and not template_reads_tools(None)
    assert not template_reads_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
