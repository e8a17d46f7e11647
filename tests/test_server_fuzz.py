"""Fuzzing the session and OpenAI request schemas (hypothesis): arbitrary Unicode (lone surrogates included),
sizes and numbers, in the right fields and the wrong ones. Whatever comes in: never a 5xx, the server alive,
a refused request (4xx) leaves its session exactly as it was, and a session no request names never changes."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from server_util import LiveServer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "max_tokens", "stop")

any_char = st.characters(codec=None, exclude_categories=())  # every code point, lone surrogates included
text = st.one_of(
    st.text(any_char, max_size=40),
    st.sampled_from(["", "hi", "\ud800", "a\udfffb", "x" * 300, "\x00", "💥" * 10]),
)
number = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 1e-300, 1e300, 2**64, 0.5]),
)
scalar = st.one_of(st.none(), st.booleans(), number, text)
junk = st.recursive(
    scalar, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=8
)
small_tokens = st.sampled_from([1, 2, 0, -3, 10**9, "4", None, 1.5])  # never a long valid generation
param_value = st.one_of(number, text, st.lists(text, max_size=6), st.none())
params = st.dictionaries(st.one_of(st.sampled_from(SAMPLING), text), param_value, max_size=3).map(
    lambda d: {**d, "max_tokens": d.get("max_tokens", 2) if d.get("max_tokens") in (1, 2) else 2}
)
maybe_params = st.one_of(st.none(), params, junk)
turn = st.one_of(st.integers(-3, 5), number, text, st.none())
settings_body = st.dictionaries(
    st.one_of(st.sampled_from(["budget", "policy", "user_name", "temperature", "max_tokens", "n_sink"]), text),
    st.one_of(number, text, st.none()),
    max_size=3,
).map(lambda d: {k: v for k, v in d.items() if k != "max_tokens" or v in (1, 2)})  # no long valid generation
role = st.one_of(st.sampled_from(["user", "assistant", "system", "developer", "tool"]), text)
message = st.fixed_dictionaries({"role": role, "content": st.one_of(text, st.none(), junk)})
chat = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=3), junk)},
    optional={
        "max_tokens": small_tokens,
        "temperature": number,
        "top_p": number,
        "stop": st.one_of(text, st.lists(text, max_size=6)),
        "stream": st.booleans(),
        "n": st.integers(-1, 3),
        "logprobs": st.one_of(st.booleans(), number),
        "top_logprobs": number,
        "seed": number,
    },
).map(lambda d: {**d, "max_tokens": d.get("max_tokens") if d.get("max_tokens") in (1, 2) else 2})
completion = st.fixed_dictionaries(
    {"prompt": st.one_of(text, st.lists(st.integers(-5, 10**6), max_size=4), junk)},
    optional={"max_tokens": small_tokens, "temperature": number, "echo": st.booleans()},
).map(lambda d: {**d, "max_tokens": d.get("max_tokens") if d.get("max_tokens") in (1, 2) else 2})
sid = st.one_of(st.just("fz"), st.sampled_from(["nope", "a.b", "x" * 65, "%2e%2e"]))

REQUESTS = st.one_of(
    st.tuples(
        st.just("POST"),
        st.just("/api/sessions"),
        st.fixed_dictionaries(
            {},
            optional={
                "id": st.one_of(text, number),
                "name": st.one_of(text, number),
                "system_prompt": st.one_of(text, junk),
                "settings": st.one_of(settings_body, junk),
                "card": junk,
                "card_png": text,
            },
        ),
        st.none(),
    ),
    st.tuples(
        st.just("POST"),
        sid.map("/api/sessions/{}/messages".format),
        st.fixed_dictionaries({"text": st.one_of(text, junk)}, optional={"params": maybe_params}),
        st.none(),
    ),
    st.tuples(
        st.just("POST"),
        st.sampled_from(["retry", "continue", "narrate", "suggest"]).map("/api/sessions/fz/{}".format),
        st.one_of(st.none(), st.fixed_dictionaries({"params": maybe_params})),
        st.none(),
    ),
    st.tuples(st.just("POST"), st.just("/api/sessions/fz/revert"), st.fixed_dictionaries({"turn": turn}), st.none()),
    st.tuples(
        st.just("POST"),
        st.just("/api/sessions/fz/select"),
        st.fixed_dictionaries({"turn": turn, "index": turn}),
        st.none(),
    ),
    st.tuples(
        st.just("POST"),
        st.just("/api/sessions/fz/rag"),
        st.fixed_dictionaries({"text": st.one_of(text, junk)}),
        st.none(),
    ),
    st.tuples(
        st.just("PATCH"),
        st.integers(-2, 4).map("/api/sessions/fz/messages/{}".format),
        st.fixed_dictionaries({"text": st.one_of(text, junk)}),
        st.none(),
    ),
    st.tuples(st.just("PATCH"), st.just("/api/sessions/fz/settings"), st.one_of(settings_body, junk), st.none()),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat, st.one_of(st.none(), sid)),
    st.tuples(st.just("POST"), st.just("/v1/completions"), completion, st.none()),
    st.tuples(st.just("POST"), st.just("/api/sessions/fz/messages"), junk, st.none()),
)


@pytest.fixture(scope="module")
def live(tiny_chat_model, tmp_path_factory):
    with LiveServer(tiny_chat_model, tmp_path_factory.mktemp("data"), anon_budget=256) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for s in ("fz", "witness"):
                assert c.post("/api/sessions", json={"id": s, "settings": {"max_tokens": 2}}).status_code == 201
            with c.stream("POST", "/api/sessions/witness/messages", json={"text": "I stay."}) as r:
                r.read()
        yield srv


def _state(c: httpx.Client, s: str) -> tuple:
    r = c.get(f"/api/sessions/{s}")
    if r.status_code != 200:
        return (r.status_code,)
    h = r.json()
    return (
        h["name"],
        h["system_prompt"],
        h["settings"],
        [(m["kind"], m["alternatives"], m["selected"]) for m in h["messages"]],
    )


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(req=REQUESTS)
def test_fuzzed_requests_never_5xx_and_change_nothing_when_refused(live, req):
    method, path, body, session_header = req
    with httpx.Client(base_url=live.url, timeout=120) as c:
        witness, target = _state(c, "witness"), _state(c, "fz")
        headers = {"Content-Type": "application/json"}
        if session_header is not None:
            headers["X-Session-Id"] = session_header
        content = json.dumps(body).encode() if body is not None else b""  # ensure_ascii: surrogates as \ud800
        r = c.request(method, path, content=content, headers=headers)
        r.read()
        event(f"{path.split('/')[-1]} {r.status_code}")  # --hypothesis-show-statistics: what was reached
        assert r.status_code < 500, (r.status_code, r.text[:500])
        assert '"server_error"' not in r.text, r.text[-500:]  # nor one inside a stream
        if r.status_code >= 400:
            err = r.json()["error"]
            assert err["message"] and set(err) == {"message", "type", "param", "code"}
            assert _state(c, "fz") == target, r.text[:300]  # a refused request changed nothing
        assert _state(c, "witness") == witness  # never named: never changed
        assert c.get("/health").status_code == 200
        if _state(c, "fz")[0] == 404:  # (nothing deletes it, but stay robust)
            c.post("/api/sessions", json={"id": "fz", "settings": {"max_tokens": 2}})
