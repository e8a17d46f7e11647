"""The role-play API (issue 22): lorebooks, rename and system prompt, avatars, stored per-token data, export /
import, a card's token count and fitted budget, server-rendered Markdown; each with its bad input (a clear 4xx,
nothing changed)."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import httpx
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEN = {"temperature": 0.0, "max_tokens": 4}
BOOK = {"entries": {"0": {"uid": 0, "key": ["dragon"], "comment": "The dragon", "content": "Dragons breathe fire."}}}


def png(extra: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
        + extra
        + chunk(b"IDAT", zlib.compress(b"\0\xff\x80\x40"))
        + chunk(b"IEND", b"")
    )


def card_png(card: dict) -> bytes:
    data = b"chara\0" + base64.b64encode(json.dumps(card).encode())
    return png(struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data)))


CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {"name": "Mira", "description": "{{char}} is a captain.", "first_mes": "Hi {{user}}!"},
}


@pytest.fixture(scope="module")
def c(live):
    with httpx.Client(base_url=live.url, timeout=120) as client:
        yield client


def raw(c, method: str, url: str, body) -> httpx.Response:
    """A JSON request as a client that escapes lone surrogates (\\ud800) would send it."""
    return c.request(method, url, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def send(c, sid: str, text: str) -> str:
    r = c.post(f"/api/sessions/{sid}/messages", json={"text": text, "params": {**GEN, "top_logprobs": 3}})
    assert r.status_code == 200, r.text
    return r.text


def test_card_png_avatar_names_and_user_name(c):
    r = c.post(
        "/api/sessions",
        json={
            "card_png": base64.b64encode(card_png(CARD)).decode(),
            "settings": {**GEN, "user_name": "Ann"},
            "user_avatar": "data:image/png;base64," + base64.b64encode(png()).decode(),
        },
    )
    assert r.status_code == 201, r.text
    h = r.json()
    sid = h["id"]
    assert h["name"] == "Mira" and h["character"] == "Mira" and h["avatars"] == {"char": True, "user": True}
    assert h["messages"][0]["text"] == "Hi Ann!" and h["messages"][0]["html"] == "<p>Hi Ann!</p>\n"
    a = c.get(f"/api/sessions/{sid}/avatar/char")
    assert a.status_code == 200 and a.headers["content-type"] == "image/png" and a.content.startswith(b"\x89PNG")
    assert c.get(f"/api/sessions/{sid}/avatar/user").status_code == 200
    assert c.get(f"/api/sessions/{sid}/avatar/other").status_code == 400
    # {{user}} follows the name: greeting re-rendered
    h = c.patch(f"/api/sessions/{sid}/settings", json={"user_name": "Bo"}).json()
    assert h["messages"][0]["text"] == "Hi Bo!" and "Bo" in h["system_prompt"]
    # bad avatars
    r = c.put(f"/api/sessions/{sid}/avatar/user", json={"image": base64.b64encode(b"not an image").decode()})
    assert r.status_code == 400 and "not an image" in r.json()["error"]["message"]
    assert c.put(f"/api/sessions/{sid}/avatar/user", json={"image": "%%"}).status_code == 400
    assert c.put(f"/api/sessions/{sid}/avatar/user", json={"image": None}).json()["avatars"]["user"] is False


def test_default_name_rename_and_system_prompt(c):
    sid = c.post("/api/sessions", json={"system_prompt": "You are terse.", "settings": GEN}).json()["id"]
    assert c.get(f"/api/sessions/{sid}").json()["name"] == "New chat"
    send(c, sid, "Where do   the old\nships go when they sink forever and ever")
    assert c.get(f"/api/sessions/{sid}").json()["name"] == "Where do the old ships go…"
    h = c.patch(f"/api/sessions/{sid}", json={"name": "Ships"}).json()
    assert h["name"] == "Ships"
    kv0 = c.get(f"/api/sessions/{sid}/kv").json()
    h = c.patch(f"/api/sessions/{sid}", json={"system_prompt": "You are a very long-winded sailor."}).json()
    assert h["system_prompt"] == "You are a very long-winded sailor." and len(h["messages"]) == 2
    kv1 = c.get(f"/api/sessions/{sid}/kv").json()
    assert [s["kind"] for s in kv1["segments"]] == [s["kind"] for s in kv0["segments"]]
    for body, words in [
        ({}, "nothing to change"),
        ({"name": 5}, "string"),
        ({"name": ""}, "must not be empty"),
        ({"name": "x" * 300}, "at most"),
        ({"name": "\ud800"}, "surrogate"),
        ({"system_prompt": "\udfff"}, "surrogate"),
        ({"system_prompt": "x " * 150_000}, "at most"),
        ({"colour": "red"}, "colour"),
    ]:
        r = raw(c, "PATCH", f"/api/sessions/{sid}", body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.text)
    after = c.get(f"/api/sessions/{sid}").json()
    assert after["name"] == "Ships" and after["system_prompt"] == "You are a very long-winded sailor."


def test_lorebook_api_and_cache_map(c):
    sid = c.post("/api/sessions", json={"system_prompt": "Tell tales.", "settings": {**GEN, "lore_ttl": 1}}).json()[
        "id"
    ]
    h = c.put(f"/api/sessions/{sid}/lorebook", json={"lorebook": BOOK}).json()
    assert h["lorebook"]["entries"][0]["name"] == "The dragon" and not h["lorebook"]["entries"][0]["active"]
    send(c, sid, "A dragon appears.")
    kv = c.get(f"/api/sessions/{sid}/kv").json()
    assert [s["label"] for s in kv["segments"] if s["kind"] == "lore"] == ["The dragon"]
    send(c, sid, "Lunch time.")
    kv = c.get(f"/api/sessions/{sid}/kv").json()
    assert [s for s in kv["segments"] if s["kind"] == "lore"] == []
    for body, words in [
        ({"lorebook": {"entries": 5}}, "entries"),
        ({"lorebook": {"entries": [{"keys": ["a"], "content": 1}]}}, "content"),
        ({"lorebook": {"entries": [{"keys": ["\ud800"], "content": "x"}]}}, "surrogate"),
        ({"lorebook": "no"}, "lorebook"),
        ({}, "lorebook"),
    ]:
        r = raw(c, "PUT", f"/api/sessions/{sid}/lorebook", body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.text)
    assert c.get(f"/api/sessions/{sid}").json()["lorebook"]["entries"][0]["name"] == "The dragon"
    assert c.put(f"/api/sessions/{sid}/lorebook", json={"lorebook": None}).json()["lorebook"] is None


def test_token_data_survives_and_export_import_round_trip(c):
    sid = c.post("/api/sessions", json={"system_prompt": "Be brief.", "settings": GEN}).json()["id"]
    send(c, sid, "Hello")
    c.post(
        f"/api/sessions/{sid}/retry",
        json={"params": {"temperature": 1.0, "seed": 5, "max_tokens": 4, "top_logprobs": 3}},
    )
    t = c.get(f"/api/sessions/{sid}/messages/1/tokens").json()
    assert 1 <= len(t["tokens"]) <= 4 and all(0 < len(x["top"]) <= 3 for x in t["tokens"])
    assert "".join(x["text"] for x in t["tokens"]) == t["text"]
    assert c.get(f"/api/sessions/{sid}/messages/1/tokens?alt=0").json()["alt"] == 0
    assert c.get(f"/api/sessions/{sid}/messages/9/tokens").status_code == 400
    assert c.get(f"/api/sessions/{sid}/messages/1/tokens?alt=7").status_code == 400
    ours = c.get(f"/api/sessions/{sid}/export").json()
    assert ours["format"] == "infinichat-chat" and len(ours["messages"][1]["alternatives"]) == 2
    r = c.post("/api/sessions/import", json={"data": ours, "name": "copy"})
    assert r.status_code == 201, r.text
    new = r.json()
    old = c.get(f"/api/sessions/{sid}").json()
    assert new["name"] == "copy"
    assert [(m["kind"], m["text"], len(m["alternatives"])) for m in new["messages"]] == [
        (m["kind"], m["text"], len(m["alternatives"])) for m in old["messages"]
    ]
    t2 = c.get(f"/api/sessions/{new['id']}/messages/1/tokens").json()
    assert t2["tokens"] == t["tokens"]  # what the user saw came along
    assert c.get(f"/api/sessions/{new['id']}/kv").json()["length"] == c.get(f"/api/sessions/{sid}/kv").json()["length"]
    st = c.get(f"/api/sessions/{sid}/export?format=jsonl")
    lines = [json.loads(x) for x in st.text.splitlines()]
    assert lines[0]["user_name"] == "User" and lines[1]["is_user"] and lines[2]["swipes"]
    r = c.post("/api/sessions/import", json={"data": st.text})
    assert r.status_code == 201, r.text
    assert [m["text"] for m in r.json()["messages"]] == [m["text"] for m in old["messages"]]
    assert c.get(f"/api/sessions/{sid}/export?format=xml").status_code == 400
    n = len(c.get("/api/sessions").json()["sessions"])
    for data, words in [
        ("{nope", "not valid JSON"),
        ({"format": "infinichat-chat", "version": 9, "messages": []}, "version"),
        ({"format": "infinichat-chat", "version": 1, "messages": [{"kind": "alien"}]}, "kind"),
        ([{"mes": 5}], "mes"),
        ([{"mes": "\ud800"}], "surrogate"),
        (7, "data"),
    ]:
        r = raw(c, "POST", "/api/sessions/import", {"data": data})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (data, r.text)
    assert len(c.get("/api/sessions").json()["sessions"]) == n  # a refused import leaves nothing


def test_inspect_fits_the_budget_and_refused_create_leaves_nothing(c, live):
    long_card = {**CARD, "data": {**CARD["data"], "description": "word " * 300}}
    info = c.post("/api/cards/inspect", json={"card": long_card}).json()
    assert info["name"] == "Mira" and info["system_tokens"] > 1000
    assert info["budget"] >= 2 * info["system_tokens"] and info["budget"] % 256 == 0 and info["fits"]
    h = c.post("/api/sessions", json={"card": long_card}).json()
    assert h["settings"]["budget"] == info["budget"]  # the default budget adapted to the card
    n = len(c.get("/api/sessions").json()["sessions"])
    r = c.post("/api/sessions", json={"id": "toolong", "card": long_card, "settings": {"budget": 512}})
    assert r.status_code == 400 and "half the budget" in r.json()["error"]["message"]
    assert len(c.get("/api/sessions").json()["sessions"]) == n and c.get("/api/sessions/toolong").status_code == 404
    assert not live.manager.db.avatar_path("toolong", "char").exists()
    assert c.post("/api/cards/inspect", json={"system_prompt": 5}).status_code == 400
    assert c.post("/api/cards/inspect", json={"card": {"spec": "x"}}).status_code == 400
    assert raw(c, "POST", "/api/cards/inspect", {"user_name": "\ud800"}).status_code == 400


def test_markdown_is_rendered_and_sanitized(c):
    evil = (
        "<script>alert(1)</script><img src=x onerror=alert(2)> **bold** [x](javascript:alert(3))\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\nprint('hi')\n```"
    )
    sid = c.post("/api/sessions", json={"system_prompt": "x", "settings": GEN}).json()["id"]
    c.post(f"/api/sessions/{sid}/messages", json={"text": evil, "params": GEN})
    html = c.get(f"/api/sessions/{sid}").json()["messages"][0]["html"]
    assert "<script" not in html and "<img" not in html and 'href="javascript' not in html
    assert "&lt;script&gt;" in html and "<strong>bold</strong>" in html and "<table>" in html
    assert '<span class="nb">print</span>' in html
    css = c.get("/api/highlight.css")
    assert css.status_code == 200 and ".md pre .nb" in css.text
