"""DRY and XTC through the server (issue 25): session settings, per-request params and the OpenAI API accept
them, reproduce with a seed, and answer bad values with a 400 naming the field."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from server_util import LiveServer


@pytest.fixture(scope="module")
def client(tiny_chat_model, tmp_path_factory):
    with (
        LiveServer(tiny_chat_model, tmp_path_factory.mktemp("data"), anon_budget=256) as srv,
        httpx.Client(base_url=srv.url, timeout=120) as c,
    ):
        assert c.post("/api/sessions", json={"id": "s1"}).status_code == 201
        yield c


CHAT = [{"role": "user", "content": "tell me a story"}]
BAD: list[tuple[str, str, dict[str, Any], str]] = [  # (method, path, json, the field named in the message)
    ("POST", "/api/sessions", {"settings": {"dry_base": 0.5}}, "dry_base"),
    ("POST", "/api/sessions", {"settings": {"dry_sequence_breakers": ["\n", ""]}}, "dry_sequence_breakers"),
    ("PATCH", "/api/sessions/s1/settings", {"xtc_probability": 2}, "xtc_probability"),
    ("PATCH", "/api/sessions/s1/settings", {"dry_allowed_length": 0}, "dry_allowed_length"),
    ("POST", "/api/sessions/s1/messages", {"text": "hi", "params": {"dry_multiplier": -1}}, "dry_multiplier"),
    ("POST", "/api/sessions/s1/messages", {"text": "hi", "params": {"xtc_threshold": 3}}, "xtc_threshold"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "dry_penalty_last_n": -5}, "dry_penalty_last_n"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "dry_sequence_breakers": "abc"}, "dry_sequence_breakers"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "xtc_probability": "often"}, "xtc_probability"),
]


@pytest.mark.parametrize("method,path,body,field", BAD, ids=[f"{b[0]} {b[1]} {b[3]}" for b in BAD])
def test_bad_dry_and_xtc_values_are_400(client, method, path, body, field):
    r = client.request(method, path, json=body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    assert client.get("/health").json()["status"] == "ok"


def test_session_settings_hold_dry_and_xtc(client):
    changes = {"dry_multiplier": 1.2, "dry_sequence_breakers": ["\n", "*"], "xtc_probability": 0.5}
    r = client.patch("/api/sessions/s1/settings", json=changes)
    assert r.status_code == 200, r.text
    settings = client.get("/api/sessions/s1").json()["settings"]
    assert {k: settings[k] for k in changes} == changes
    assert settings["dry_base"] == 1.75 and settings["xtc_threshold"] == 0.1


def test_openai_dry_xtc_is_seeded_reproducible(client):
    body = {
        "messages": CHAT,
        "max_tokens": 24,
        "temperature": 1.0,
        "seed": 5,
        "dry_multiplier": 0.8,
        "xtc_probability": 0.5,
        "xtc_threshold": 0.05,
    }
    texts = [client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] for _ in "ab"]
    assert texts[0] == texts[1] and texts[0]
    other = client.post("/v1/chat/completions", json={**body, "seed": 6}).json()["choices"][0]["message"]["content"]
    assert other != texts[0]
