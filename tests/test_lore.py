"""Lorebooks: reading SillyTavern world info and a card's character_book; entries entering the cache when their
keys appear and leaving it (token-level removal with re-rotation) when they have not appeared for `lore_ttl`
user turns. The reference for the cache is a fresh evaluation of what remains (logits within fp32 tolerance)."""

from __future__ import annotations

import pytest
import torch
from gguf_util import tiny_llama, write_gguf

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.errors import InfinichatError
from infinichat.model.loader import load_model
from infinichat.session.lore import LoreError, load_lorebook
from infinichat.session.manager import SessionManager
from infinichat.session.session import Session
from infinichat.session.speakers import speaker_cut

GREEDY = {"temperature": 0.0, "max_tokens": 4, "lore_ttl": 2}
WORLD_INFO = {
    "entries": {
        "0": {
            "uid": 0,
            "key": ["dragon", "wyrm"],
            "keysecondary": [],
            "comment": "The dragon",
            "content": "The dragon Vermax sleeps under the mountain of {{user}}.",
            "constant": False,
            "selective": True,
            "selectiveLogic": 0,
            "order": 100,
            "disable": False,
        },
        "1": {
            "uid": 1,
            "key": ["castle"],
            "keysecondary": ["night"],
            "comment": "Castle at night",
            "content": "At night the castle gates are shut.",
            "selective": True,
            "selectiveLogic": 3,
            "order": 50,
        },
        "2": {"uid": 2, "key": [], "comment": "Always", "content": "Magic is rare.", "constant": True, "order": 1},
        "3": {"uid": 3, "key": ["ghost"], "comment": "Off", "content": "x", "disable": True},
    }
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_gguf(d / "tiny.gguf", tiny_llama(seed=5, max_position_embeddings=4096))
    return load_model(d / "tiny.gguf", "float32", cache_dir=d / "cache")


@pytest.fixture
def mgr(model, tmp_path):
    m = SessionManager(TorchEngine(model.model, model.tokenizer.eos_ids), model.tokenizer, "tiny", tmp_path / "d")
    yield m
    m.db.close()


def fresh(s: Session) -> Session:
    r = Session("ref", s.engine, s.tok, system_prompt=s.system_prompt, settings=s.settings, chat_format=s.fmt)
    r.messages = s.messages
    r.rebuild()
    return r


def assert_equals_fresh(s: Session) -> None:
    r = fresh(s)
    assert s.seq.token_ids() == r.seq.token_ids()
    assert s.seq.positions() == list(range(s.seq.length))  # re-rotated: positions stay contiguous
    assert [(g.kind, g.name, len(g)) for g in s.seq.segments.segments] == [
        (g.kind, g.name, len(g)) for g in r.seq.segments.segments
    ]
    torch.testing.assert_close(s.next_logits(), r.next_logits(), atol=1e-4, rtol=0)


def lore_names(s: Session) -> list[str]:
    return [g["label"] for g in s.kv_map()["segments"] if g["kind"] == "lore"]


def test_read_world_info_and_character_book():
    book = load_lorebook(WORLD_INFO)
    assert [e.name for e in book.entries] == ["The dragon", "Castle at night", "Always", "Off"]
    assert book.entries[1].logic == "AND_ALL" and book.entries[2].constant and not book.entries[3].enabled
    assert [e.name for e in book.matching(["a wyrm flies", "hello"])] == ["Always", "The dragon"]
    assert [e.name for e in book.matching(["the castle"])] == ["Always"]  # AND_ALL: needs "night" too
    assert [e.name for e in book.matching(["the castle at night"])] == ["Always", "Castle at night"]
    assert "The dragon" not in [e.name for e in book.matching(["dragonfly"])]  # whole words
    # scan depth: only the newest messages count
    assert "The dragon" not in [e.name for e in book.matching(["dragon", "a", "b"])]
    card_book = {
        "name": "Mira's world",
        "scan_depth": 3,
        "entries": [
            {"keys": ["bridge"], "content": "The bridge is red.", "insertion_order": 5, "enabled": True, "id": 7},
            {
                "keys": ["ship"],
                "secondary_keys": ["engine"],
                "selective": True,
                "content": "The ship's engine hums.",
                "extensions": {"selectiveLogic": 2},
                "insertion_order": 1,
                "enabled": True,
            },
        ],
    }
    b = load_lorebook(card_book)
    assert b.scan_depth == 3 and b.entries[0].id == "7" and b.entries[1].logic == "NOT_ANY"
    assert [e.content for e in b.matching(["the ship and the bridge", "x", "y"])] == [
        "The ship's engine hums.",
        "The bridge is red.",
    ]
    assert [e.id for e in b.matching(["ship engine"])] == []  # NOT_ANY


@pytest.mark.parametrize(
    "bad, msg",
    [
        ([], "JSON object"),
        ({"entries": 3}, "needs 'entries'"),
        ({"entries": [{"keys": "a", "content": 5}]}, "content must be str"),
        ({"entries": [{"keys": [1], "content": "x"}]}, "every key must be a string"),
        ({"entries": [{"keys": ["a"], "content": "\ud800"}]}, "lone surrogate"),
        ({"entries": [{"keys": ["a"], "content": "x", "extensions": {"selectiveLogic": 9}}]}, "selectiveLogic"),
        ({"entries": [{"keys": ["a"], "content": "x", "scanDepth": -1}]}, "scan depth"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_lorebooks_are_refused_clearly(bad, msg):
    with pytest.raises(LoreError, match=msg):
        load_lorebook(bad)


def test_lore_enters_and_leaves_the_cache_equal_to_fresh(mgr):
    s = mgr.create("a", system_prompt="You tell stories.", settings=GREEDY, lorebook=WORLD_INFO)
    assert lore_names(s) == ["Always"]  # the constant entry, right after the system prompt
    gen = list(s.send("Tell me about the dragon."))
    assert gen[-1].kind == "done"
    assert lore_names(s) == ["Always", "The dragon"]
    dragon = next(m for m in s.messages if m.meta.get("name") == "The dragon")
    assert dragon.text == "The dragon Vermax sleeps under the mountain of User."
    seg = next(g for g in s.seq.segments.segments if g.kind == "lore" and g.name == dragon.segment_name)
    lore_tokens = s.seq.token_ids()[seg.start : seg.end]
    assert_equals_fresh(s)
    kinds_before = [m.kind for m in s.messages]
    list(s.send("And the weather?"))  # 1 turn without the key: still in (lore_ttl 2)
    assert "The dragon" in lore_names(s)
    list(s.send("What about lunch?"))  # 2 turns without it: its tokens leave the cache
    assert "The dragon" not in lore_names(s) and lore_names(s) == ["Always"]
    assert not dragon.in_context and dragon in s.messages  # kept in the transcript, out of the model's context
    ids = s.seq.token_ids()
    assert not any(ids[i : i + len(lore_tokens)] == lore_tokens for i in range(len(ids)))
    assert kinds_before == [m.kind for m in s.messages][: len(kinds_before)]
    assert_equals_fresh(s)
    # it comes back when its key does, as a new lore message
    list(s.send("The wyrm returns!"))
    assert lore_names(s) == ["Always", "The dragon"]
    assert_equals_fresh(s)
    # stored and loaded back: same transcript, lorebook and cache map
    sid, names = s.id, lore_names(s)
    mgr.sessions.pop(sid)
    t = mgr.get(sid)
    assert t.lorebook is not None and len(t.lorebook.entries) == 4 and lore_names(t) == names


def test_card_character_book_user_name_and_detach(mgr):
    card = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": "Mira",
            "description": "{{char}} captains a ship.",
            "first_mes": "Hello {{user}}.",
            "character_book": {"entries": [{"keys": ["engine"], "content": "{{user}} fixed the engine.", "id": 1}]},
        },
    }
    s = mgr.create("c", card=card, settings=GREEDY)
    assert s.lorebook is not None and s.name == "Mira"
    list(s.send("How is the engine?"))
    lore = next(m for m in s.messages if m.kind == "lore")
    assert lore.text == "User fixed the engine."
    # {{user}} follows the user's name everywhere: system prompt, greeting, lore; the cache equals a fresh one
    s.update_settings({"user_name": "Ann"})
    assert s.messages[0].text == "Hello Ann." and lore.text == "Ann fixed the engine."
    assert "Ann" in s.system_prompt
    assert_equals_fresh(s)
    s.set_lorebook(None)
    assert lore_names(s) == [] and not lore.in_context
    assert_equals_fresh(s)


def test_system_prompt_edit_cuts_at_the_first_changed_token(mgr):
    s = mgr.create("e", system_prompt="You are a calm pirate captain.", settings=GREEDY)
    list(s.send("Ahoy"))
    s.set_system_prompt("You are a calm pirate cook.")
    assert s.system_prompt == "You are a calm pirate cook."
    assert_equals_fresh(s)
    with pytest.raises(InfinichatError, match="lone surrogate"):
        s.set_system_prompt("\udc00")


def test_speaker_cut():
    assert speaker_cut("Hello there.\nSylvia: hi") == len("Hello there.")
    assert speaker_cut("Hello there.\n\nMore") == len("Hello there.")
    assert speaker_cut("\n\nHello") is None
    assert speaker_cut("I say:\nUser: more", own=("User",)) is None
    assert speaker_cut("The wind: cold") is None  # not at a line start


def test_suggest_and_narrate_are_bounded(mgr):
    s = mgr.create("n", system_prompt="Narrate.", settings={**GREEDY, "max_tokens": 200})
    s.update_settings({"suggest_max_tokens": 5, "narrate_max_tokens": 7})
    ev = list(s.suggest(SamplingParams(temperature=1.0, seed=3, max_tokens=200)))
    assert sum(e.token is not None for e in ev if e.kind == "token") <= 5
    ev = list(s.narrate(SamplingParams(temperature=1.0, seed=3, max_tokens=200)))
    assert sum(e.token is not None for e in ev if e.kind == "token") <= 7
    narration = s.messages[-1]
    assert speaker_cut(narration.text) is None
    steps = narration.alternatives[0].steps  # what is kept for the debug view spells the kept text
    assert s.tok.decode([st[0] for st in steps], skip_special=True) == narration.text
    assert_equals_fresh(s)


def test_failed_create_leaves_nothing(mgr):
    with pytest.raises(InfinichatError, match="more than half the budget"):
        mgr.create("big", system_prompt="word " * 400, settings={"budget": 128})
    assert "big" not in mgr.sessions and not mgr.db.exists("big") and mgr.list() == []
    with pytest.raises(LoreError):
        mgr.create("lb", system_prompt="x", lorebook={"entries": 1})
    assert mgr.list() == []


def test_without_recompute_the_tokens_after_keep_what_they_saw(mgr):
    """The reason for `lore_recompute`: re-rotation alone gives the right tokens and positions, but the keys after
    the cut were computed with the entry in view, so the logits differ from a fresh evaluation."""
    s = mgr.create("r", system_prompt="You tell stories.", settings={**GREEDY, "lore_recompute": False})
    s.set_lorebook(load_lorebook(WORLD_INFO))
    list(s.send("Tell me about the dragon."))
    list(s.send("And the weather?"))
    list(s.send("What about lunch?"))
    assert "The dragon" not in lore_names(s)
    r = fresh(s)
    assert s.seq.token_ids() == r.seq.token_ids() and s.seq.positions() == list(range(s.seq.length))
    assert (s.next_logits() - r.next_logits()).abs().max() > 1e-3


def test_an_old_database_is_migrated(tmp_path):
    import sqlite3

    from infinichat.session.db import SCHEMA, SessionDB

    path = tmp_path / "sessions.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)  # the schema before lorebooks, with one session in it
    conn.execute(
        "INSERT INTO sessions (id, name, created, updated, version, settings, next_uid) VALUES ('old', 'x', 1, 1, 1, "
        "'{}', 1)"
    )
    conn.commit()
    conn.close()
    db = SessionDB(tmp_path)
    assert db.conn.execute("PRAGMA user_version").fetchone() == (1,)
    row, msgs = db.load("old")
    assert row["lorebook"] is None and msgs == []
    db.close()
    db = SessionDB(tmp_path)  # a second open changes nothing
    assert db.conn.execute("PRAGMA user_version").fetchone() == (1,)
    db.close()


def test_an_entry_evicted_by_the_budget_can_enter_again(mgr):
    s = mgr.create("v", system_prompt="Tales.", settings={**GREEDY, "budget": 160, "lore_ttl": 50})
    s.set_lorebook(load_lorebook(WORLD_INFO))
    list(s.send("The dragon wakes."))
    for i in range(8):  # the turns policy evicts old turns, the lore segment among them
        list(s.send(f"Small talk number {i}."))
        if "The dragon" not in lore_names(s):
            break
    assert "The dragon" not in lore_names(s)
    list(s.send("The dragon again."))
    assert "The dragon" in lore_names(s)
    assert s.seq.length <= 160


def test_lore_on_llamacpp_leaves_no_trace(llamacpp_default_engine, default_tokenizer, tmp_path):
    """The same on the llama.cpp backend (the cut goes through llama_memory_seq_rm / seq_add, the recompute
    through its stale slots): after the entry leaves, the cache holds exactly the tokens of a fresh evaluation,
    and the logits agree as closely as llama.cpp's batch shapes allow (see tests/test_session.py)."""
    m = SessionManager(llamacpp_default_engine, default_tokenizer, "default-gguf", tmp_path / "d")
    try:
        book = {**WORLD_INFO, "scan_depth": 1}  # the user's message only: the model's reply cannot keep it in
        s = m.create("l", system_prompt="You tell stories.", settings={**GREEDY, "lore_ttl": 1}, lorebook=book)
        list(s.send("Tell me about the dragon."))
        assert "The dragon" in lore_names(s)
        list(s.send("What about lunch?"))
        assert "The dragon" not in lore_names(s)
        r = fresh(s)
        assert s.seq.token_ids() == r.seq.token_ids() and s.seq.positions() == list(range(s.seq.length))
        a, b = s.next_logits(), r.next_logits()
        assert a.argmax() == b.argmax()
        torch.testing.assert_close(a, b, atol=1.5, rtol=0)
        r.seq = None
    finally:
        m.db.close()


def test_retry_continue_and_narrate_scan_the_current_text(mgr):
    """Lore is scanned before every generation, on the transcript as it is now: a retry after the user's message
    was edited sees the new text (and not the reply it replaces), a continue sees the reply's own text, a narration
    sees the reply before it. New entries sit before the message being generated; the cache equals a fresh one."""
    s = mgr.create("rc", system_prompt="You tell stories.", settings=GREEDY, lorebook=WORLD_INFO)
    list(s.send("Hello there."))
    assert lore_names(s) == ["Always"]
    user_turn = next(i for i, m in enumerate(s.messages) if m.kind == "user")
    s.edit(user_turn, "Tell me about the dragon.")
    assert lore_names(s) == ["Always"]  # an edit generates nothing: the scan waits for the next generation
    list(s.retry())
    assert lore_names(s) == ["Always", "The dragon"]
    assert [m.kind for m in s.messages][-3:] == ["user", "lore", "assistant"]
    reply = s.messages[-1]
    assert len(reply.alternatives) == 2  # the earlier reply stays an alternative of the same message
    assert_equals_fresh(s)
    # the text a retry replaces does not trigger: the reply says "castle at night", the retry does not bring it in
    s.edit(len(s.messages) - 1, "The castle at night is quiet.")
    list(s.retry())
    assert lore_names(s) == ["Always", "The dragon"]
    assert_equals_fresh(s)
    # a continue extends the reply's text, which counts: the entry enters before the reply, the reply follows
    s.edit(len(s.messages) - 1, "The castle at night is quiet.")
    list(s.continue_())
    assert lore_names(s) == ["Always", "The dragon", "Castle at night"]
    assert [m.kind for m in s.messages][-2:] == ["lore", "assistant"]
    assert s.messages[-1].text.startswith("The castle at night is quiet.")
    assert_equals_fresh(s)
    # a narration sees the reply before it
    t = mgr.create("rn", system_prompt="You tell stories.", settings=GREEDY, lorebook=WORLD_INFO)
    list(t.send("Hello there."))
    t.edit(len(t.messages) - 1, "A wyrm circles above.")
    list(t.narrate())
    assert lore_names(t) == ["Always", "The dragon"]
    assert [m.kind for m in t.messages][-2:] == ["lore", "narration"]
    assert_equals_fresh(t)


def test_an_entry_whose_key_was_edited_away_leaves_at_the_retry(mgr):
    """The text that triggers must be the current one: an entry that entered for a message edited since leaves the
    cache at the retry; one that had matched at an earlier turn too stays for that turn's lore_ttl."""
    s = mgr.create("ea", system_prompt="You tell stories.", settings=GREEDY, lorebook=WORLD_INFO)
    list(s.send("Tell me about the dragon."))
    assert lore_names(s) == ["Always", "The dragon"]
    user_turn = max(i for i, m in enumerate(s.messages) if m.kind == "user")
    s.edit(user_turn, "Tell me about lunch.")
    list(s.retry())
    assert lore_names(s) == ["Always"]  # entered for the dragon, which is no longer asked about
    assert_equals_fresh(s)
    t = mgr.create("eb", system_prompt="You tell stories.", settings=GREEDY, lorebook=WORLD_INFO)
    list(t.send("Tell me about the dragon."))
    list(t.send("And the wyrm's hoard?"))  # matched again at turn 2
    user_turn = max(i for i, m in enumerate(t.messages) if m.kind == "user")
    t.edit(user_turn, "And lunch?")
    list(t.retry())
    assert lore_names(t) == ["Always", "The dragon"]  # seen at turn 1 still, within lore_ttl 2
    list(t.send("And the weather?"))  # turn 3: 2 turns since turn 1, it leaves
    assert lore_names(t) == ["Always"]
    assert_equals_fresh(t)
