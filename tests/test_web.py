"""End-to-end tests of the web page: headless Debian Chromium (Playwright) against a real
`infinichat serve` on loopback with the default model. Replies are kept to a few tokens so the whole file
runs in about a minute. Screenshots of the main states go to test-artifacts/ (look at them)."""

from __future__ import annotations

import base64
import json
import re
import struct
import zlib

import pytest
from web_util import ServeProcess, launch_browser, shot, web_prerequisites

pytestmark = [pytest.mark.slow, pytest.mark.skipif(web_prerequisites() is not None, reason=str(web_prerequisites()))]

WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServeProcess(tmp_path_factory.mktemp("web-data")) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_browser(p)
        yield b
        b.close()


class Page:
    """A browser page on the server, recording JS dialogs and page errors (a test fails on either)."""

    def __init__(self, browser, server, viewport=WIDE):
        self.server = server
        self.ctx = browser.new_context(viewport=viewport)
        self.p = self.ctx.new_page()
        self.p.set_default_timeout(60_000)
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.p.on("dialog", self._dialog)
        self.p.on("pageerror", lambda e: self.errors.append(str(e)))

    def _dialog(self, d):
        self.dialogs.append(f"{d.type}: {d.message}")
        d.accept() if d.type == "confirm" else d.dismiss()

    def open(self, **create) -> str:
        """Create a session through the API and open it in the page; returns its id."""
        sid = self.server.api("POST", "/api/sessions", create)["id"]
        self.p.goto(f"{self.server.url}/#s={sid}")
        self.p.wait_for_selector("body[data-ready='1']")
        self.p.wait_for_selector("#composer:not([hidden])")
        return sid

    def done_count(self) -> int:
        return int(self.p.get_attribute("body", "data-done") or 0)

    def act(self, fn) -> None:
        """Run `fn` (a click or key press that starts an action) and wait until the page has finished it."""
        n = self.done_count()
        fn()
        self.p.wait_for_function(f"+(document.body.dataset.done || 0) > {n}")

    def send(self, text: str) -> None:
        self.p.fill("#input", text)
        self.act(lambda: self.p.press("#input", "Enter"))

    def click_msg_action(self, turn: int, action: str) -> None:
        """Hover message `turn` (its action bar shows on hover) and click one of its actions."""
        self.p.hover(f".msg[data-turn='{turn}'] .msg-head")
        self.p.click(f".msg[data-turn='{turn}'] .act-{action}")

    def history(self, sid: str) -> dict:
        return self.server.api("GET", f"/api/sessions/{sid}")

    def kv_used(self) -> int:
        label = self.p.get_attribute("#cm-bar", "aria-label")
        return int(re.match(r"(\d+) of", label).group(1))

    def status(self) -> str:
        return self.p.inner_text("#status")

    def close(self) -> None:
        self.ctx.close()
        assert not self.errors, f"page errors: {self.errors}"


@pytest.fixture
def page(browser, server):
    pg = Page(browser, server)
    yield pg
    pg.close()


def norm(s: str) -> str:
    """Text without Markdown marks and with single spaces (what the page shows vs. what the model wrote)."""
    return " ".join(re.sub(r"[*_`#>~\[\]()]", " ", s).split())


def test_send_streams_the_reply_and_the_cache_map_grows(page):
    sid = page.open(name="pirate", system_prompt="You are a friendly pirate.", settings={"max_tokens": 16, "seed": 7})
    p = page.p
    used0 = page.kv_used()
    assert p.locator("#cm-bar .cm-seg[data-kind='system']").count() == 1
    assert p.locator("#cm-bar .cm-seg[data-kind='user']").count() == 0
    p.fill("#input", "Hello, who are you?")
    n = page.done_count()
    p.press("#input", "Enter")
    # while streaming: a live bubble whose text grows, and Stop instead of Send
    p.wait_for_function("document.querySelector('.msg.live .msg-body')?.textContent.trim().length > 0")
    assert p.is_visible("#btn-stop")
    shot(p, "01-streaming")
    p.wait_for_function(f"+(document.body.dataset.done || 0) > {n}")

    run = p.evaluate("window.__infinichat.lastRun")
    hist = page.history(sid)
    assert [m["kind"] for m in hist["messages"]] == ["user", "assistant"]
    reply = hist["messages"][1]["text"]
    assert reply.strip() and 1 <= run["tokens"] <= 16
    assert run["paints"] >= 2, f"the reply was not shown while streaming: {run}"
    assert norm(p.inner_text(".msg[data-turn='1'] .msg-body")) == norm(reply)
    assert p.inner_text(".msg[data-turn='0'] .msg-body").strip() == "Hello, who are you?"
    # the cache map: the turn's user and reply segments appeared, and the used token count grew to match
    kv = page.server.api("GET", f"/api/sessions/{sid}/kv")
    assert page.kv_used() == kv["length"] > used0
    assert p.locator("#cm-bar .cm-seg[data-kind='user']").count() == 1
    assert p.locator("#cm-bar .cm-seg[data-kind='assistant']").count() == 1
    assert p.is_visible("#btn-send") and not p.is_visible("#btn-stop")
    shot(p, "02-chat-wide")


def test_retry_and_switch_alternatives(page):
    sid = page.open(name="retry", system_prompt="You are a poet.", settings={"max_tokens": 6, "temperature": 1.0})
    p = page.p
    page.send("Write a line about the sea.")
    first = page.history(sid)["messages"][1]["text"]
    page.act(lambda: p.press("#input", "Control+Enter"))  # Ctrl+Enter retries
    hist = page.history(sid)
    alts = [a["text"] for a in hist["messages"][1]["alternatives"]]
    assert len(hist["messages"]) == 2 and len(alts) == 2 and alts[0] == first
    assert hist["messages"][1]["selected"] == 1
    assert p.inner_text(".msg[data-turn='1'] .alt-pos") == "2/2"
    assert norm(p.inner_text(".msg[data-turn='1'] .msg-body")) == norm(alts[1])

    page.act(lambda: p.click(".msg[data-turn='1'] .alt-prev"))
    assert p.inner_text(".msg[data-turn='1'] .alt-pos") == "1/2"
    assert page.history(sid)["messages"][1]["selected"] == 0
    assert norm(p.inner_text(".msg[data-turn='1'] .msg-body")) == norm(alts[0])
    shot(p, "03-alternatives")
    page.act(lambda: p.click(".msg[data-turn='1'] .alt-next"))
    assert p.inner_text(".msg[data-turn='1'] .alt-pos") == "2/2"
    assert page.history(sid)["messages"][1]["selected"] == 1


def test_revert_then_suggest_and_send(page):
    sid = page.open(name="revert", system_prompt="You are a helpful assistant.", settings={"max_tokens": 6, "seed": 3})
    p = page.p
    page.send("Hi!")
    used_after_one_turn = page.kv_used()
    page.send("What is your name?")
    assert p.locator(".messages .msg").count() == 4
    assert page.kv_used() > used_after_one_turn

    page.act(lambda: page.click_msg_action(1, "revert"))  # keep messages #0 and #1
    assert p.locator(".messages .msg").count() == 2
    assert len(page.history(sid)["messages"]) == 2
    assert page.kv_used() == used_after_one_turn  # the cache map shrank back to the first turn

    page.act(lambda: p.click("#btn-suggest"))
    suggestion = p.input_value("#input")
    assert suggestion.strip(), "the suggestion did not fill the input box"
    assert len(page.history(sid)["messages"]) == 2  # a suggestion is not a message
    shot(p, "04-suggestion")
    page.act(lambda: p.press("#input", "Enter"))
    msgs = page.history(sid)["messages"]
    assert msgs[2]["kind"] == "user" and msgs[2]["text"] == suggestion
    assert msgs[3]["kind"] == "assistant"
    assert p.input_value("#input") == ""


def test_settings_apply_and_debug_view(page):
    sid = page.open(name="settings", system_prompt="You are a storyteller.", settings={"max_tokens": 40})
    p = page.p
    p.click("#btn-settings")
    p.fill("#settings-form [name=max_tokens]", "3")
    p.fill("#settings-form [name=temperature]", "0.5")
    assert p.input_value("#settings-form [name=dry_sequence_breakers]") == '["\\n",":","\\"","*"]'
    p.fill("#settings-form [name=dry_sequence_breakers]", "not json")
    p.click("#btn-apply")
    assert "JSON list of strings" in p.inner_text("#settings-msg")  # refused in the page, nothing sent
    p.fill("#settings-form [name=dry_sequence_breakers]", '["\\n", "*"]')
    p.fill("#settings-form [name=dry_multiplier]", "1.2")
    p.fill("#settings-form [name=xtc_probability]", "0.5")
    page.act(lambda: p.click("#btn-apply"))
    assert "Applied" in p.inner_text("#settings-msg")
    s = page.history(sid)["settings"]
    assert s["max_tokens"] == 3 and s["temperature"] == 0.5
    assert s["dry_multiplier"] == 1.2 and s["xtc_probability"] == 0.5 and s["dry_sequence_breakers"] == ["\n", "*"]
    shot(p, "05-settings")
    p.click("#btn-settings-close")

    p.check("#toggle-debug")
    page.send("Tell me a long story about a dragon.")
    toks = p.locator(".msg[data-turn='1'] .tok:not(.plain)")
    assert 1 <= toks.count() <= 3, f"max_tokens 3 gave {toks.count()} tokens"
    for i in range(toks.count()):
        prob = float(toks.nth(i).get_attribute("data-p"))
        assert 0.0 < prob <= 1.0
    # the tokens spell the reply
    assert (
        "".join(toks.nth(i).inner_text() for i in range(toks.count())).strip()
        == page.history(sid)["messages"][1]["text"].strip()
    )
    toks.nth(0).hover()
    p.wait_for_selector("#tooltip:not([hidden]) .tip-tok")
    rows = p.locator("#tooltip .tip-tok tr")
    assert 1 <= rows.count() <= 5
    assert re.search(r"\d+(\.\d)?%", p.inner_text("#tooltip"))
    shot(p, "06-debug-tokens")


def test_markup_from_model_and_card_is_text(page, tmp_path):
    p = page.p
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Eve <b>bold</b>",
            "description": '<img src=x onerror="window.pwned=1"> Eve is a <script>window.pwned=2</script> cat.',
            "personality": "curious",
            "scenario": "",
            "mes_example": "",
            "first_mes": "Hello <script>alert(1)</script> *waves* <img src=x onerror=alert(2)>",
        },
    }
    path = tmp_path / "eve.json"
    path.write_text(json.dumps(card))
    p.goto(page.server.url + "/")
    p.wait_for_selector("body[data-ready='1']")
    p.click("#btn-new-empty")
    p.set_input_files("#card-file", str(path))
    p.wait_for_selector("#card-preview b")
    assert p.inner_text("#card-preview b") == "Eve <b>bold</b>"
    page.act(lambda: p.click("#btn-create"))
    greeting = p.locator(".msg[data-turn='0'] .msg-body")
    assert "<script>alert(1)</script>" in greeting.inner_text()
    assert "<img src=x onerror=alert(2)>" in greeting.inner_text()
    p.click("#system-box summary")
    assert '<img src=x onerror="window.pwned=1">' in p.inner_text("#system-text")

    # an edited (model) message with markup stays text too
    evil = "<script>alert(3)</script><img src=x onerror=alert(4)> **still bold**"
    page.click_msg_action(0, "edit")
    p.fill(".msg[data-turn='0'] textarea", evil)
    page.act(lambda: p.click(".msg[data-turn='0'] .act-save"))
    body = p.locator(".msg[data-turn='0'] .msg-body")
    assert "<script>alert(3)</script><img src=x onerror=alert(4)>" in body.inner_text()
    assert body.locator("strong").inner_text() == "still bold"  # Markdown still works
    p.wait_for_timeout(300)  # let any injected onerror handler run (it must not exist)
    assert p.locator("#messages script, #messages img, #system-text img, #system-text script").count() == 0
    assert p.evaluate("window.pwned") is None
    assert page.dialogs == []
    shot(p, "07-markup-as-text")


def png_card(card: dict) -> bytes:
    """A 1x1 PNG carrying a character card in a tEXt "chara" chunk (base64 JSON), as Tavern tools write it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    text = b"chara\0" + base64.b64encode(json.dumps(card).encode())
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
        + chunk(b"tEXt", text)
        + chunk(b"IDAT", zlib.compress(b"\0\xff\x80\x40"))
        + chunk(b"IEND", b"")
    )


def test_png_card_continue_narrate_delete_reset(page, tmp_path):
    p = page.p
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Captain Mira",
            "description": "A starship captain.",
            "personality": "calm",
            "scenario": "On the bridge.",
            "mes_example": "",
            "first_mes": "Welcome aboard, {{user}}.",
        },
    }
    path = tmp_path / "mira.png"
    path.write_bytes(png_card(card))
    p.goto(page.server.url + "/")
    p.wait_for_selector("body[data-ready='1']")
    p.click("#btn-new-empty")
    p.set_input_files("#card-file", str(path))
    p.wait_for_selector("#card-preview img")
    page.act(lambda: p.click("#btn-create"))
    sid = p.evaluate("window.__infinichat.cur.id")
    assert page.history(sid)["messages"][0]["text"] == "Welcome aboard, User."
    assert "Welcome aboard, User." in p.inner_text(".msg[data-turn='0'] .msg-body")
    p.click("#btn-settings")  # settings panel: fewer tokens for speed
    p.fill("#settings-form [name=max_tokens]", "4")
    page.act(lambda: p.click("#btn-apply"))
    p.click("#btn-settings-close")

    page.send("Status report?")
    before = page.history(sid)["messages"][2]["text"]  # message 0 is the card's greeting
    page.act(lambda: p.click("#btn-continue"))  # the reply grows in place
    msgs = page.history(sid)["messages"]
    assert len(msgs) == 3 and msgs[2]["text"].startswith(before) and len(msgs[2]["text"]) >= len(before)
    page.act(lambda: p.click("#btn-narrate"))
    msgs = page.history(sid)["messages"]
    assert [m["kind"] for m in msgs] == ["assistant", "user", "assistant", "narration"]
    assert p.inner_text(".msg[data-turn='3'] .who") == "Narrator"
    shot(p, "12-card-narration")
    page.act(lambda: page.click_msg_action(1, "delete"))
    assert [m["kind"] for m in page.history(sid)["messages"]] == ["assistant", "assistant", "narration"]
    assert p.locator(".messages .msg").count() == 3
    page.act(lambda: p.click("#btn-reset"))  # confirm() is accepted by the Page helper
    assert [m["text"] for m in page.history(sid)["messages"]] == ["Welcome aboard, User."]
    assert p.locator(".messages .msg").count() == 1
    assert [d.split(":")[0] for d in page.dialogs] == ["confirm"]
    page.dialogs.clear()


def test_stop_keeps_the_partial_reply(page):
    sid = page.open(name="stop", system_prompt="You are verbose.", settings={"max_tokens": 400})
    p = page.p
    p.fill("#input", "Describe the whole history of Rome in detail.")
    n = page.done_count()
    p.press("#input", "Enter")
    p.wait_for_function("document.querySelector('.msg.live .msg-body')?.textContent.trim().length > 0")
    p.click("#btn-stop")
    p.wait_for_function(f"+(document.body.dataset.done || 0) > {n}")
    m = page.history(sid)["messages"][1]
    assert m["alternatives"][m["selected"]]["finish_reason"] == "cancelled"
    assert p.locator(".msg[data-turn='1'] .badge.fin").inner_text() == "cancelled"
    assert p.evaluate("window.__infinichat.lastRun.tokens") < 400


def test_eviction_shows_forgotten_turns(page):
    sid = page.open(
        name="tiny budget",
        system_prompt="Be brief.",
        settings={"max_tokens": 8, "budget": 64, "policy": "turns", "seed": 5},
    )
    p = page.p
    for i in range(6):
        page.send(f"Message number {i}: tell me something.")
        kv = page.server.api("GET", f"/api/sessions/{sid}/kv")
        if kv["evicted_turns"]:
            break
    assert kv["evicted_turns"], "a 64-token budget should have evicted an old turn"
    assert kv["length"] <= 64 and page.kv_used() == kv["length"]
    chips = p.locator("#cm-forgotten .chip.evicted[data-turns]")
    gone = {g["turn"] for g in kv["evicted_turns"]}
    shown = {int(t) for i in range(chips.count()) for t in chips.nth(i).get_attribute("data-turns").split(",")}
    assert shown == gone  # every forgotten turn is on a hatched chip
    assert f"{kv['evicted_tokens']} evicted" in p.inner_text("#cm-stats")
    for t in gone:
        assert "forgotten" in p.get_attribute(f".msg[data-turn='{t}']", "class")
    chips.first.hover()
    p.wait_for_selector("#tooltip:not([hidden]) .tip-seg")
    shot(p, "08-cache-map-evicted")
    p.click("#cm-zoom")
    shot(p, "09-cache-map-zoomed")


def test_phone_width(browser, server):
    pg = Page(browser, server, viewport=PHONE)
    try:
        pg.open(name="phone", system_prompt="You are a helpful assistant.", settings={"max_tokens": 5})
        p = pg.p
        pg.send("Hi there")
        assert p.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        assert p.is_visible("#cm-bar") and p.is_visible("#input") and p.is_visible("#btn-send")
        assert not p.locator("#sidebar").is_visible() or p.evaluate(
            "document.getElementById('sidebar').getBoundingClientRect().right <= 0"
        )
        shot(p, "10-phone")
        p.click("#btn-sidebar")
        p.wait_for_timeout(300)
        assert p.evaluate("document.getElementById('sidebar').getBoundingClientRect().left") >= 0
        shot(p, "11-phone-sessions")
    finally:
        pg.close()


# ---------------------------------------------------------------------------------------- role play (issue 22)
def image_png(w: int = 8, h: int = 8, rgb: tuple[int, int, int] = (200, 90, 60)) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes(rgb) * w for _ in range(h))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


MIRA = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Captain Mira",
        "description": "{{char}} commands a starship.",
        "first_mes": "Welcome aboard, {{user}}.",
    },
}
ENGINE_BOOK = {
    "name": "Ship",
    "scan_depth": 1,  # only the newest message: the model's reply cannot keep the entry in
    "entries": {"0": {"uid": 0, "key": ["engine"], "comment": "Engine", "content": "The engine is old and loud."}},
}


def test_names_avatars_and_lore_coming_and_going(page):
    png = image_png()
    text = b"chara\0" + base64.b64encode(json.dumps(MIRA).encode())
    card = png[:-12] + struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    card += png[-12:]
    sid = page.open(
        card_png=base64.b64encode(card).decode(),
        user_avatar=base64.b64encode(image_png(rgb=(30, 120, 220))).decode(),
        lorebook=ENGINE_BOOK,
        settings={"max_tokens": 4, "seed": 2, "user_name": "Ann", "lore_ttl": 1},
    )
    p = page.p
    assert p.inner_text(".msg[data-turn='0'] .who") == "Captain Mira"
    assert p.inner_text(".msg[data-turn='0'] .msg-body").strip() == "Welcome aboard, Ann."
    assert p.evaluate("document.querySelector(\".msg[data-turn='0'] img.avatar.av-char\").naturalWidth") == 8
    assert p.inner_text("#model-name") == "SmolLM2 135M Instruct"
    page.send("How is the engine?")
    assert p.inner_text(".msg[data-turn='1'] .who") == "Ann"
    assert p.evaluate("document.querySelector(\".msg[data-turn='1'] img.avatar.av-user\").naturalWidth") == 8
    assert p.locator(".msg.k-lore .lore-name").inner_text() == "Engine"
    assert p.locator("#cm-bar .cm-seg[data-kind='lore'][data-label='Engine']").count() == 1
    assert p.inner_text(".msg[data-turn='3'] .who") == "Captain Mira"
    shot(p, "13-names-avatars-lore")
    page.send("Let us talk about the stars.")  # no key for one turn (lore_ttl 1): its tokens leave the cache
    assert p.locator("#cm-bar .cm-seg[data-kind='lore']").count() == 0
    assert "left the model's memory" in p.inner_text(".msg.k-lore")
    kv = page.server.api("GET", f"/api/sessions/{sid}/kv")
    assert [s for s in kv["segments"] if s["kind"] == "lore"] == [] and page.kv_used() == kv["length"]
    page.send("The engine again!")  # it comes back
    assert p.locator("#cm-bar .cm-seg[data-kind='lore'][data-label='Engine']").count() == 1
    shot(p, "14-lore-back")


def test_new_chat_dialog_user_name_budget_and_rename(page, tmp_path):
    p = page.p
    path = tmp_path / "mira.json"
    path.write_text(json.dumps({**MIRA, "data": {**MIRA["data"], "description": "word " * 900}}))
    p.goto(page.server.url + "/")
    p.wait_for_selector("body[data-ready='1']")
    p.click("#btn-new-empty")
    p.fill("#new-form [name=user_name]", "Zed")
    p.set_input_files("#card-file", str(path))
    p.wait_for_function("+(document.getElementById('budget-hint').dataset.tokens || 0) > 900")
    tokens = int(p.get_attribute("#budget-hint", "data-tokens"))
    auto = int(p.get_attribute("#new-form [name=budget]", "placeholder").split(": ")[1])
    assert auto >= 2 * tokens and "adapts" in p.inner_text("#budget-hint")
    shot(p, "15-new-chat-dialog")
    page.act(lambda: p.click("#btn-create"))
    sid = p.evaluate("window.__infinichat.cur.id")
    h = page.history(sid)
    assert h["settings"]["budget"] == auto and h["messages"][0]["text"] == "Welcome aboard, Zed."
    assert p.inner_text("#session-list li.active .s-name") == "Captain Mira"
    # {{user}} follows a new name, and the chat can be renamed
    p.click("#btn-settings")
    p.fill("#settings-form [name=user_name]", "Yara")
    page.act(lambda: p.click("#btn-apply"))
    assert p.inner_text(".msg[data-turn='0'] .msg-body").strip() == "Welcome aboard, Yara."
    p.fill("#chat-form [name=chat_name]", "Bridge duty")
    page.act(lambda: p.click("#btn-chat-save"))
    p.wait_for_function("document.querySelector('#session-list li.active .s-name').textContent === 'Bridge duty'")
    assert page.history(sid)["name"] == "Bridge duty"


def test_default_name_probabilities_after_reload_and_suggestion(page):
    sid = page.open(system_prompt="You are a helpful assistant.", settings={"max_tokens": 5, "seed": 4})
    p = page.p
    assert p.inner_text("#session-title") == "New chat"
    p.check("#toggle-debug")
    page.send("Tell me about whales and dolphins please")
    assert page.history(sid)["name"] == "Tell me about whales and dolphins…"
    live = [p.locator(".msg[data-turn='1'] .tok:not(.plain)").nth(i).inner_text() for i in range(3)]
    p.reload()
    p.wait_for_selector("body[data-ready='1']")
    p.wait_for_selector(".msg[data-turn='1'] .tok:not(.plain)")  # the stored per-token data, after a reload
    toks = p.locator(".msg[data-turn='1'] .tok:not(.plain)")
    assert [toks.nth(i).inner_text() for i in range(3)] == live
    toks.nth(0).hover()
    p.wait_for_selector("#tooltip:not([hidden]) .tip-tok tr")
    shot(p, "16-probabilities-after-reload")
    p.uncheck("#toggle-debug")
    # a suggestion can be discarded (the draft comes back), or accepted
    p.fill("#input", "my draft")
    page.act(lambda: p.click("#btn-suggest"))
    assert p.is_visible("#suggest-bar") and p.input_value("#input") != "my draft"
    p.click("#btn-sug-discard")
    assert p.input_value("#input") == "my draft" and not p.is_visible("#suggest-bar")
    p.fill("#input", "")
    page.act(lambda: p.click("#btn-suggest"))
    suggestion = p.input_value("#input")
    page.act(lambda: p.click("#btn-sug-send"))
    assert page.history(sid)["messages"][2]["text"] == suggestion


def test_export_import_round_trip_and_markdown(page, tmp_path):
    sid = page.open(name="roundtrip", system_prompt="Be brief.", settings={"max_tokens": 4, "temperature": 1.0})
    p = page.p
    page.send("Hi")
    page.act(lambda: p.press("#input", "Control+Enter"))  # a second alternative
    md = "A table:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\nprint('x')\n```\n<script>window.pwned=1</script>"
    page.click_msg_action(1, "edit")
    p.fill(".msg[data-turn='1'] textarea", md)
    page.act(lambda: p.click(".msg[data-turn='1'] .act-save"))
    body = p.locator(".msg[data-turn='1'] .msg-body")
    assert body.locator("table td").count() == 2 and body.locator("pre code span").count() >= 1
    assert body.locator("pre button.copy").count() == 1 and body.locator("script").count() == 0
    assert "<script>window.pwned=1</script>" in body.inner_text() and p.evaluate("window.pwned") is None
    shot(p, "17-markdown")
    p.click("#btn-settings")
    with p.expect_download() as dl:
        p.click("#btn-export-json")
    saved = tmp_path / "chat.json"
    dl.value.save_as(saved)
    with p.expect_download() as dl2:
        p.click("#btn-export-jsonl")
    assert dl2.value.suggested_filename == "roundtrip.jsonl"
    p.click("#btn-settings-close")
    page.act(lambda: p.set_input_files("#import-file", str(saved)))
    new = p.evaluate("window.__infinichat.cur.id")
    assert new != sid
    a, b = page.history(sid), page.history(new)
    assert [(m["text"], len(m["alternatives"]), m["selected"]) for m in a["messages"]] == [
        (m["text"], len(m["alternatives"]), m["selected"]) for m in b["messages"]
    ]
    assert p.inner_text(".msg[data-turn='1'] .alt-pos") == "2/2"


def test_phone_actions_delete_and_settings_without_chat(browser, server):
    pg = Page(browser, server, viewport=PHONE)
    try:
        other = server.api("POST", "/api/sessions", {"name": "another chat", "system_prompt": "x"})["id"]
        pg.open(name="phone actions", system_prompt="You are a helpful assistant.", settings={"max_tokens": 5})
        p = pg.p
        pg.send("Hi there")
        assert p.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        # the action bar sits in its own message, visible without hover, and covers nothing else
        for turn in (0, 1):
            bar = p.locator(f".msg[data-turn='{turn}'] .msg-actions").bounding_box()
            box = p.locator(f".msg[data-turn='{turn}']").bounding_box()
            assert box["y"] <= bar["y"] and bar["y"] + bar["height"] <= box["y"] + box["height"]
            assert (
                float(p.eval_on_selector(f".msg[data-turn='{turn}'] .msg-actions", "e => getComputedStyle(e).opacity"))
                > 0.5
            )
        p.click("#btn-sidebar")
        p.wait_for_timeout(300)
        delete = p.locator(f"#session-list li[data-id='{other}'] .s-del")
        assert delete.is_visible()
        assert float(delete.evaluate("e => getComputedStyle(e).opacity")) > 0.5
        shot(p, "18-phone-sidebar-delete")
        p.goto(server.url + "/")
        p.wait_for_selector("body[data-ready='1']")
        p.click("#btn-settings")
        assert p.is_visible("#settings-empty") and not p.is_visible("#settings-form")
        assert "SmolLM2" in p.inner_text("#server-info")
        shot(p, "19-phone-settings-no-chat")
    finally:
        pg.close()
