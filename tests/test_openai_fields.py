"""The recorded list of OpenAI request fields (server/openai_fields.py), walked: every field the request models
take is listed and every listed field is taken; each refused field is a 400 naming it (and its neutral values
pass); each honoured one names a test that exists; unknown fields are 400s."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from infinichat.server.openai_compat import ChatBody, CompletionBody
from infinichat.server.openai_fields import CHAT, COMPLETIONS, FIELDS, fields_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
MSGS = [{"role": "user", "content": "Tell me about the sea."}]
PATHS = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions"}
BASE = {CHAT: {"messages": MSGS}, COMPLETIONS: {"prompt": "The sea"}}
# a value of each refused field that asks for something this server does not do
ASKS = {
    "service_tier": "flex",
    "store": True,
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "high",
    "verbosity": "low",
    "web_search_options": {},
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "best_of": 3,
    "echo": True,
    "suffix": "the end",
}


def post(live, endpoint: str, **body) -> httpx.Response:
    return httpx.post(live.url + PATHS[endpoint], json={**BASE[endpoint], "max_tokens": 4, **body}, timeout=60)


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["message"]["content"] if "message" in c else c["text"]


@pytest.mark.parametrize(("endpoint", "model"), [(CHAT, ChatBody), (COMPLETIONS, CompletionBody)])
def test_every_field_is_listed(endpoint, model):
    assert set(model.model_fields) == set(fields_of(endpoint))
    assert model.model_config.get("extra") == "forbid"


def test_every_honoured_field_names_a_test_that_exists():
    for f in FIELDS:
        if f.status == "refused":
            continue
        path, _, name = f.test.partition("::")
        src = (ROOT / path).read_text(encoding="utf-8")
        assert not name or re.search(rf"^def {name}\(", src, re.M), f"{f.name}: no test {f.test}"


@pytest.mark.parametrize(
    ("endpoint", "name"), [(e, f.name) for f in FIELDS if f.status == "refused" for e in f.endpoints]
)
def test_refused_fields_are_400_naming_them(live, endpoint, name):
    r = post(live, endpoint, **{name: ASKS[name]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == name and name in err["message"]
    for neutral in fields_of(endpoint)[name].neutral:
        assert post(live, endpoint, **{name: neutral}).status_code == 200


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_unknown_fields_are_400(live, endpoint):
    r = post(live, endpoint, frobnicate=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate", r.text
    if endpoint == CHAT:
        r = post(live, endpoint, messages=[{"role": "user", "content": "x", "mood": "odd"}])
        assert r.status_code == 400 and "mood" in r.json()["error"]["message"], r.text


def test_accepted_fields(live):
    plain = text(post(live, CHAT, temperature=0, max_tokens=8))
    tagged = post(
        live,
        CHAT,
        temperature=0,
        max_tokens=8,
        user="u1",
        safety_identifier="s1",
        metadata={"k": "v"},
        prompt_cache_key="c",
        model="anything",
    )
    assert text(tagged) == plain and tagged.json()["model"] == "tiny-llama"
    assert text(post(live, COMPLETIONS, temperature=0, user="u1")) == text(post(live, COMPLETIONS, temperature=0))


def test_max_completion_tokens(live):
    r = post(live, CHAT, max_completion_tokens=3, temperature=1.0, seed=1, logit_bias={"268": -100, "270": -100})
    assert r.json()["usage"]["completion_tokens"] == 3


def test_penalties_change_the_text(live):
    base = text(post(live, COMPLETIONS, temperature=0, max_tokens=40))
    for name in ("presence_penalty", "frequency_penalty"):
        assert text(post(live, COMPLETIONS, temperature=0, max_tokens=40, **{name: 2.0})) != base, name


def test_extensions_are_honoured(live):
    greedy = text(post(live, COMPLETIONS, temperature=0, max_tokens=20))
    assert text(post(live, COMPLETIONS, temperature=1.0, seed=3, top_k=1, max_tokens=20)) == greedy
    assert text(post(live, COMPLETIONS, temperature=1.0, seed=3, min_p=1.0, max_tokens=20)) == greedy
    assert text(post(live, COMPLETIONS, temperature=1.0, seed=3, top_p=1e-6, max_tokens=20)) == greedy
    hot = text(post(live, COMPLETIONS, temperature=1.5, seed=3, max_tokens=20))
    assert hot != greedy  # the two above were not greedy by chance
    pen = text(post(live, COMPLETIONS, temperature=0, repeat_penalty=3.0, max_tokens=40))
    off = text(post(live, COMPLETIONS, temperature=0, repeat_penalty=3.0, repeat_last_n=0, max_tokens=40))
    assert pen != text(post(live, COMPLETIONS, temperature=0, max_tokens=40)) and off == text(
        post(live, COMPLETIONS, temperature=0, max_tokens=40)
    )


def test_stop_strings_end_the_text(live):
    greedy = text(post(live, COMPLETIONS, temperature=0, max_tokens=20))
    cut = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    r = post(live, COMPLETIONS, temperature=0, max_tokens=20, stop=[cut])
    assert text(r) == greedy[: greedy.index(cut)] and r.json()["choices"][0]["finish_reason"] == "stop"


def test_a_reply_message_goes_back_as_the_client_got_it(live):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    r = oc.chat.completions.create(model="x", messages=MSGS, max_tokens=3, temperature=0)
    again = [*MSGS, r.choices[0].message.model_dump(), {"role": "user", "content": "More."}]
    assert oc.chat.completions.create(model="x", messages=again, max_tokens=3, temperature=0).choices[0].message
    bad = post(live, CHAT, messages=[{"role": "assistant", "content": "x", "audio": {"id": "a"}}])
    assert bad.status_code == 400 and "audio" in bad.json()["error"]["message"], bad.text


def test_message_names_reach_the_template_or_are_refused_in_a_session(live):
    named = [{"role": "user", "content": "Hi", "name": "ann"}]
    assert post(live, CHAT, messages=named).status_code == 200
    r = httpx.post(
        live.url + PATHS[CHAT], json={"messages": named, "max_tokens": 2}, headers={"X-Session-Id": "n1"}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.name", r.text
