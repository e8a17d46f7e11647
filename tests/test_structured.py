"""Constrained decoding (engine/grammar.py) and logit_bias: through the official `openai` client and llama.cpp's
fields on a tiny random-weight model (whatever the weights, the output must match the grammar), in the sampler
alone, and on the llama.cpp backend."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from server_util import events

from infinichat.engine.grammar import Grammar, GrammarConstraint, GrammarError, check_grammar
from infinichat.engine.sampling import Sampler, SamplingParams

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]


def _schema_format(schema=SCHEMA):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_through_the_openai_client(oc, seed):
    r = oc.chat.completions.create(
        model="x", messages=MSGS, max_tokens=120, temperature=1.0, seed=seed, response_format=_schema_format()
    )
    c = r.choices[0]
    assert c.finish_reason == "stop"  # the grammar's end stopped it, not the token limit
    jsonschema.validate(json.loads(c.message.content), SCHEMA)
    again = oc.chat.completions.create(
        model="x", messages=MSGS, max_tokens=120, temperature=1.0, seed=seed, response_format=_schema_format()
    )
    assert again.choices[0].message.content == c.message.content  # seeds still reproduce


def test_json_schema_streams(oc):
    kw = {"model": "x", "messages": MSGS, "max_tokens": 120, "temperature": 1.0, "seed": 7}
    whole = oc.chat.completions.create(**kw, response_format=_schema_format()).choices[0].message.content
    parts = list(oc.chat.completions.create(**kw, response_format=_schema_format(), stream=True))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == whole and parts[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_on_completions(oc):
    r = oc.completions.create(
        model="x",
        prompt="JSON:",
        max_tokens=200,
        temperature=0.8,
        seed=5,
        extra_body={"response_format": {"type": "json_object", "schema": {"type": "object", "maxProperties": 2}}},
    )
    obj = json.loads(r.choices[0].text)
    assert isinstance(obj, dict) and len(obj) <= 2


def test_json_schema_field(live):
    """llama-server's json_schema field on /v1/completions."""
    schema = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4}
    r = httpx.post(
        live.url + "/v1/completions",
        json={"prompt": "Numbers:", "max_tokens": 60, "temperature": 1.0, "seed": 3, "json_schema": schema},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)


def test_gbnf_grammar_field(live):
    g = 'root ::= answer " " answer\nanswer ::= "yes" | "no" | "maybe"'
    r = httpx.post(
        live.url + "/v1/chat/completions",
        json={"messages": MSGS, "max_tokens": 30, "temperature": 1.0, "seed": 2, "grammar": g},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    a, b = r.json()["choices"][0]["message"]["content"].split(" ")
    assert {a, b} <= {"yes", "no", "maybe"} and r.json()["choices"][0]["finish_reason"] == "stop"


BAD_CONSTRAINTS = [
    ({"response_format": {"type": "xml"}}, "response_format", ["xml", "json_schema"]),
    ({"response_format": {"type": "json_schema", "json_schema": "nope"}}, "response_format", ["object"]),
    ({"response_format": _schema_format({"type": "wizard"})}, "response_format", ["wizard"]),
    ({"json_schema": {"type": "object"}, "grammar": 'root ::= "a"'}, "json_schema", ["at most one"]),
    ({"grammar": "root ::= ("}, "grammar", ["grammar"]),
    ({"logit_bias": {"abc": 1}}, "logit_bias", ["abc"]),
    ({"logit_bias": {"5": 101}}, "logit_bias", ["101"]),
    ({"logit_bias": {"99999": 1}}, "logit_bias", ["99999"]),
    ({"logit_bias": {"5": "x"}}, "logit_bias", ["'x'"]),
]


@pytest.mark.parametrize(("extra", "param", "words"), BAD_CONSTRAINTS)
def test_bad_structured_requests_are_400(live, extra, param, words):
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and all(w in err["message"] for w in words), err


def _session_reply(live, sid: str, params: dict) -> httpx.Response | dict:
    """The done event of a send to session `sid` with `params`, or the response when it is refused."""
    with httpx.stream(
        "POST",
        f"{live.url}/api/sessions/{sid}/messages",
        json={"text": "Describe a person.", "params": params},
        timeout=60,
    ) as r:
        if r.status_code != 200:
            r.read()
            return r
        return next(d for name, d in events(r) if name == "done")


def test_session_api_takes_the_same_constraints(live, tiny_chat_model):
    """The session API's params take response_format, grammar, json_schema and logit_bias, read as /v1 reads them
    (one function: server/constraints.py), and refuse the same bad values with a 400 naming params.FIELD."""
    assert httpx.post(live.url + "/api/sessions", json={"id": "constrained"}).status_code == 201
    done = _session_reply(
        live, "constrained", {"max_tokens": 120, "temperature": 1.0, "seed": 1, "response_format": _schema_format()}
    )
    assert done["finish_reason"] == "stop"
    jsonschema.validate(json.loads(done["text"]), SCHEMA)
    g = 'root ::= answer " " answer\nanswer ::= "yes" | "no" | "maybe"'
    done = _session_reply(live, "constrained", {"max_tokens": 30, "temperature": 1.0, "seed": 2, "grammar": g})
    assert set(done["text"].split(" ")) <= {"yes", "no", "maybe"} and done["finish_reason"] == "stop"
    schema = {"type": "array", "items": {"type": "integer"}, "maxItems": 3}
    done = _session_reply(live, "constrained", {"max_tokens": 40, "temperature": 1.0, "seed": 3, "json_schema": schema})
    jsonschema.validate(json.loads(done["text"]), schema)
    target = tiny_chat_model.tokenizer.encode("Q")[0]
    done = _session_reply(
        live, "constrained", {"max_tokens": 5, "temperature": 1.0, "seed": 4, "logit_bias": {str(target): 100}}
    )
    assert done["text"] == "QQQQQ"
    done = _session_reply(live, "constrained", {"max_tokens": 5, "temperature": 1.0, "logit_bias": [[target, 100]]})
    assert done["text"] == "QQQQQ"  # llama.cpp's form too
    before = httpx.get(live.url + "/api/sessions/constrained").json()["messages"]
    wrong_types = [  # /v1's pydantic model refuses these before; the session API's params are plain JSON
        ({"grammar": 5}, "grammar", ["string"]),
        ({"response_format": "json"}, "response_format", ["object"]),
        ({"json_schema": [1]}, "json_schema", ["schema"]),
        ({"logit_bias": 7}, "logit_bias", ["token ids"]),
    ]
    for extra, param, words in [*BAD_CONSTRAINTS, *wrong_types]:
        r = _session_reply(live, "constrained", {"max_tokens": 4, **extra})
        assert isinstance(r, httpx.Response) and r.status_code == 400, (extra, r)
        err = r.json()["error"]
        assert err["param"] == "params." + param and all(w in err["message"] for w in words), err
    assert httpx.get(live.url + "/api/sessions/constrained").json()["messages"] == before  # refused: unchanged


def test_logit_bias_through_the_openai_client(oc, tiny_chat_model):
    tok = tiny_chat_model.tokenizer
    kw = {"model": "x", "messages": MSGS, "max_tokens": 3, "temperature": 0, "logprobs": True}

    def first_token(r) -> int:
        return tok.encode(bytes(r.choices[0].logprobs.content[0].bytes).decode("utf-8", "replace"))[0]

    first = first_token(oc.chat.completions.create(**kw))
    banned = first_token(oc.chat.completions.create(**kw, logit_bias={str(first): -100}))
    assert banned != first
    target = tok.encode("Q")[0]
    forced = oc.chat.completions.create(
        model="x", messages=MSGS, max_tokens=5, temperature=1.0, seed=4, logit_bias={str(target): 100}
    )
    assert forced.choices[0].message.content == "QQQQQ"


# --- the sampler alone -------------------------------------------------------------------------


def test_mask_applies_before_the_filters_and_greedy(tiny_chat_model):
    """Greedy and top-k sampling under a grammar pick only tokens it allows, whatever the logits."""
    tok = tiny_chat_model.tokenizer
    V = tok.vocab_size
    g = Grammar("regex", "(ab|cd)+!")
    for params in (SamplingParams(temperature=0, grammar=g), SamplingParams(top_k=3, seed=1, grammar=g)):
        c = GrammarConstraint(g, tok, V)
        s = Sampler(params, V, constraint=c)
        gen = torch.Generator().manual_seed(0)
        out: list[int] = []
        while not c.done and len(out) < 50:
            out.append(s.sample(torch.randn(V, generator=gen), out).token)
        text = tok.decode(out)
        assert c.done and text.endswith("!") and set(text[:-1]) <= set("abcd"), text


def test_logit_bias_in_the_sampler():
    V = 10
    logits = torch.zeros(V)
    s = Sampler(SamplingParams(temperature=0, logit_bias=((7, 5.0), (7, 1.0))), V)
    assert s.sample(logits, []).token == 7  # repeated ids add up
    with pytest.raises(Exception, match="logit_bias"):
        SamplingParams(logit_bias=((1, 200.0),)).validate()
    with pytest.raises(Exception, match="outside the vocabulary"):
        Sampler(SamplingParams(logit_bias=((10, 1.0),)), V)


def test_bad_grammars_say_why(tiny_chat_model):
    tok = tiny_chat_model.tokenizer
    with pytest.raises(GrammarError, match="not valid JSON"):
        check_grammar(Grammar("json_schema", "{nope"), tok)
    with pytest.raises(GrammarError, match="json_schema"):
        check_grammar(Grammar.json_schema({"type": "wizard"}), tok)
    with pytest.raises(GrammarError, match="empty"):
        check_grammar(Grammar("lark", " "), tok)


@pytest.mark.slow
def test_json_schema_on_both_backends(default_engine, default_tokenizer):
    """The same grammar path on the torch engine and on llama.cpp (the default model, its 49k vocabulary)."""
    from infinichat.engine.textgen import Generation, stream_text

    tok = default_tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    ids = tok.encode(prompt, add_bos=tok.add_bos)
    texts = []
    for seed in (1, 2):
        seq = default_engine.new_cache(capacity=512)
        params = SamplingParams(temperature=0.8, seed=seed, max_tokens=200, grammar=Grammar.json_schema(SCHEMA))
        result = Generation()
        text = "".join(c.text for c in stream_text(default_engine, tok, seq, ids, params, result=result))
        jsonschema.validate(json.loads(text), SCHEMA)
        assert result.finish_reason == "stop", text
        texts.append(text)
    assert texts[0] != texts[1]  # sampled, not forced into one answer
