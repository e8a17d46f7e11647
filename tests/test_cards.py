"""Character cards: V1/V2/V3 JSON and PNG reading, rendering, export with unknown fields kept, bad input.

The PNGs are built here with a small chunk writer of the test's own (not the module's), so reading is
checked against an independent encoder; no binary fixtures are committed.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import re
import struct
import zlib
from pathlib import Path

import pytest

from infinichat.errors import InfinichatError
from infinichat.session.cards import MAX_CARD_BYTES, CardError, CharacterCard, load_card, save_card

SIG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------- helpers
def chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def png(*extra: bytes, width: int = 2, height: int = 1) -> bytes:
    """A valid RGB PNG of width x height with the `extra` chunks between IDAT and IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes([10, 20, 30]) * width for _ in range(height))
    return SIG + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + b"".join(extra) + chunk(b"IEND", b"")


def b64(obj: object) -> bytes:
    return base64.b64encode(json.dumps(obj).encode("utf-8"))


def text_chunk(keyword: str, payload: bytes) -> bytes:
    return chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + payload)


def split_chunks(blob: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk bytes) of each chunk, read independently of the module."""
    assert blob[:8] == SIG
    out, pos = [], 8
    while pos < len(blob):
        (n,) = struct.unpack(">I", blob[pos : pos + 4])
        ctype = blob[pos + 4 : pos + 8]
        whole = blob[pos : pos + 12 + n]
        assert struct.unpack(">I", whole[-4:])[0] == zlib.crc32(whole[4:-4])
        out.append((ctype, whole))
        pos += 12 + n
    assert out[-1][0] == b"IEND" and pos == len(blob)
    return out


def text_payloads(blob: bytes) -> dict[str, dict]:
    """keyword -> decoded card JSON, for every tEXt chunk holding a card."""
    found = {}
    for ctype, whole in split_chunks(blob):
        if ctype == b"tEXt":
            kw, _, payload = whole[8:-4].partition(b"\0")
            if kw in (b"chara", b"ccv3"):
                assert kw.decode() not in found
                found[kw.decode()] = json.loads(base64.b64decode(payload))
    return found


V2 = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Seraphina",
        "description": "{{char}} is a forest guardian who watches over {{user}}.",
        "personality": "kind, protective",
        "scenario": "{{user}} wakes up in {{char}}'s glade.",
        "first_mes": "*{{char}} smiles.* Welcome, {{user}}.",
        "mes_example": (
            "<START>\n{{user}}: Who are you?\n{{char}}: I am {{char}}.\n<START>\n\n"
            "<START>\r\n<USER>: Hi\r\n<BOT>: Hello!\n"
        ),
        "creator_notes": "notes",
        "system_prompt": "{{original}}\nNever break character, {{char}}.",
        "post_history_instructions": "{{original}}Reply to {{user}} in one paragraph.",
        "alternate_greetings": ["Oh, {{USER}}! Again?", "   ", "{{ char }} waves."],
        "character_book": {"entries": [{"keys": ["glade"], "content": "A glade."}], "custom_book_field": 1},
        "tags": ["fantasy", "guardian"],
        "creator": "someone",
        "character_version": "1.2",
        "extensions": {"talkativeness": "0.5", "depth_prompt": {"prompt": "x", "depth": 4}},
        "mystery_data_field": {"nested": [1, 2, 3]},
        "another_unknown": None,
    },
    "top_level_unknown": "kept",
    "name": "Seraphina",  # SillyTavern's top-level V1 copies
    "description": "{{char}} is a forest guardian who watches over {{user}}.",
    "create_date": "2024-1-1",
}

V1 = {
    "name": "Bob",
    "description": "A grumpy {{char}}.",
    "personality": "grumpy",
    "scenario": "A bar.",
    "first_mes": "What do you want, <USER>?",
    "mes_example": "<START>\n<USER>: Hi\n<BOT>: Hmph.",
    "avatar": "bob.png",  # unknown top-level fields
    "chat": "Bob - 2024",
    "talkativeness": 0.4,
}


def card_fields(card: CharacterCard) -> dict:
    keys = [
        "name",
        "description",
        "personality",
        "scenario",
        "first_mes",
        "mes_example",
        "alternate_greetings",
        "system_prompt",
        "post_history_instructions",
        "creator_notes",
        "tags",
        "creator",
        "character_version",
        "extensions",
        "character_book",
    ]
    return {k: getattr(card, k) for k in keys}


# ---------------------------------------------------------------------------------------- JSON
def test_v2_fields_and_exact_round_trip(tmp_path: Path) -> None:
    card = load_card(V2)
    assert card.spec == "chara_card_v2" and card.spec_version == "2.0"
    assert card.name == "Seraphina" and card.character_version == "1.2"
    assert card.alternate_greetings == ["Oh, {{USER}}! Again?", "   ", "{{ char }} waves."]
    assert card.tags == ["fantasy", "guardian"]
    assert card.extensions["depth_prompt"]["depth"] == 4
    assert card.character_book == V2["data"]["character_book"]
    assert card.to_json_dict() == V2  # unedited: unknown keys at both levels kept, values exact (null stays null)
    # the same card from a file, from bytes and from JSON text
    path = tmp_path / "card.json"
    path.write_text(json.dumps(V2))
    for src in (path, str(path), path.read_bytes(), json.dumps(V2)):
        again = load_card(src)
        assert card_fields(again) == card_fields(card)
        assert again.to_json_dict() == V2
    # the export is a copy: editing it does not touch the card
    out = card.to_json_dict()
    out["data"]["tags"].append("x")
    assert card.tags == ["fantasy", "guardian"]


def test_v2_edited_fields_export_and_keep_unknowns() -> None:
    card = load_card(V2)
    card.name = "Sera"
    card.tags = ["new"]
    card.character_book = None
    out = card.to_json_dict()
    assert out["data"]["name"] == "Sera" and out["name"] == "Sera"  # the top-level V1 copy follows
    assert out["description"] == V2["description"]  # unchanged copy left alone
    assert out["data"]["tags"] == ["new"]
    assert "character_book" not in out["data"]
    assert out["top_level_unknown"] == "kept" and out["create_date"] == "2024-1-1"
    assert out["data"]["mystery_data_field"] == {"nested": [1, 2, 3]} and out["data"]["another_unknown"] is None
    again = load_card(out)
    assert again.name == "Sera" and again.tags == ["new"] and again.character_book is None
    assert again.to_json_dict() == out


def test_v2_nulls_read_as_empty_and_stay_null_on_export() -> None:
    d = {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {"name": "N", "description": None, "tags": None, "extensions": None, "character_version": 3},
    }
    card = load_card(d)
    assert card.description == "" and card.tags == [] and card.extensions == {} and card.character_version == "3"
    out = card.to_json_dict()
    assert out["data"]["description"] is None and out["data"]["character_version"] == 3
    # fields the V2 spec requires are filled in
    for k in (
        "personality",
        "scenario",
        "first_mes",
        "mes_example",
        "creator_notes",
        "system_prompt",
        "post_history_instructions",
        "alternate_greetings",
        "creator",
    ):
        assert k in out["data"]


def test_v1_round_trip_exports_as_v2() -> None:
    card = load_card(V1)
    assert card.spec == "chara_card_v1" and card.name == "Bob" and card.scenario == "A bar."
    assert card.alternate_greetings == [] and card.system_prompt == ""
    out = card.to_json_dict()
    assert out["spec"] == "chara_card_v2" and out["spec_version"] == "2.0"
    for k in ("name", "description", "personality", "scenario", "first_mes", "mes_example"):
        assert out["data"][k] == V1[k]
        assert k not in out  # moved into data
    assert out["avatar"] == "bob.png" and out["chat"] == "Bob - 2024" and out["talkativeness"] == 0.4
    again = load_card(out)
    assert again.spec == "chara_card_v2"
    assert card_fields(again) == card_fields(card)
    assert again.to_json_dict() == out


def test_v3_read_like_v2_extras_kept_nickname_used() -> None:
    d = {
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {
            **copy.deepcopy(V2["data"]),
            "nickname": "Sera",
            "group_only_greetings": ["Hi all"],
            "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
        },
    }
    card = load_card(d)
    assert card.spec == "chara_card_v3" and card.char_name == "Sera"
    assert card.greetings()[0] == "*Sera smiles.* Welcome, User."
    assert card.to_json_dict() == d
    v2 = card.to_json_dict("chara_card_v2")
    assert v2["spec"] == "chara_card_v2" and v2["spec_version"] == "2.0" and v2["data"]["nickname"] == "Sera"
    with pytest.raises(CardError, match="chara_card_v9"):
        card.to_json_dict("chara_card_v9")


def test_future_spec_read_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    d = {"spec": "chara_card_v4", "spec_version": "4.0", "data": {"name": "Future", "new_thing": 1}}
    with caplog.at_level(logging.WARNING, logger="infinichat.session.cards"):
        card = load_card(d)
    assert card.name == "Future" and "chara_card_v4" in caplog.text
    out = card.to_json_dict()
    assert out["spec"] == "chara_card_v4" and out["spec_version"] == "4.0"
    assert out["data"]["new_thing"] == 1 and out["data"]["name"] == "Future" and out["data"]["first_mes"] == ""


# ---------------------------------------------------------------------------------------- rendering
def test_substitution() -> None:
    card = CharacterCard(name="Alice")
    assert (
        card.substitute("{{char}} {{CHAR}} {{ Char }} {{user}} {{USER}} <BOT> <USER> <user> {{other}}", "Bob")
        == "Alice Alice Alice Bob Bob Alice Bob Bob {{other}}"
    )
    assert card.substitute("hi {{user}}") == "hi User"  # default user name
    assert card.substitute("{{user}} and {{char}}", user="{{char}}") == "{{char}} and Alice"  # one pass only
    assert card.substitute("{{original}}") == "{{original}}"  # only meaningful in system_prompt


def test_example_dialogues_split_on_start() -> None:
    card = load_card(V2)
    assert card.example_dialogues("Ann") == [
        "Ann: Who are you?\nSeraphina: I am Seraphina.",
        "Ann: Hi\nSeraphina: Hello!",
    ]
    assert CharacterCard(name="x", mes_example="  \n<START>\n ").example_dialogues() == []
    assert CharacterCard(name="x", mes_example="a: 1\nb: 2").example_dialogues() == ["a: 1\nb: 2"]
    assert CharacterCard(name="x", mes_example="<start>A<Start>B").example_dialogues() == ["A", "B"]


def test_greetings() -> None:
    card = load_card(V2)
    assert card.greetings("Ann") == ["*Seraphina smiles.* Welcome, Ann.", "Oh, Ann! Again?", "Seraphina waves."]
    assert card.greeting(0, "Ann") == "*Seraphina smiles.* Welcome, Ann."
    assert card.greeting(2, "Ann") == "Seraphina waves."
    with pytest.raises(CardError, match="greeting 3 does not exist; it has 3"):
        card.greeting(3)
    assert CharacterCard(name="x", alternate_greetings=["B"]).greetings() == ["B"]  # blank first_mes left out
    assert CharacterCard(name="x").greeting() == ""


def test_system_prompt_default_and_original() -> None:
    v1 = load_card(V1)
    default = v1.chat_system_prompt("Ann")
    assert default == v1.default_system_prompt("Ann")
    for part in ("A grumpy Bob.", "Bob's personality: grumpy", "Scenario: A bar.", "Ann: Hi\nBob: Hmph."):
        assert part in default
    assert "{{" not in default and "<BOT>" not in default
    assert default.index("A grumpy") < default.index("personality") < default.index("Scenario") < default.index("Hmph")

    card = load_card(V2)
    sp = card.chat_system_prompt("Ann")
    assert sp == card.default_system_prompt("Ann") + "\nNever break character, Seraphina."
    assert "Seraphina is a forest guardian who watches over Ann." in sp
    card.system_prompt = "Only this, {{char}}."
    assert card.chat_system_prompt("Ann") == "Only this, Seraphina."
    assert card.post_history("Ann") == "Reply to Ann in one paragraph."
    assert CharacterCard(name="x").post_history() == ""
    minimal = CharacterCard(name="Zed").chat_system_prompt()
    assert "Zed" in minimal and "User" in minimal and "Scenario" not in minimal


# ---------------------------------------------------------------------------------------- PNG
def test_png_round_trip_generated_image() -> None:
    card = load_card(V2)
    blob = card.to_png()
    types = [t for t, _ in split_chunks(blob)]
    assert types == [b"IHDR", b"IDAT", b"tEXt", b"IEND"]
    assert text_payloads(blob) == {"chara": V2}
    again = load_card(blob)
    assert card_fields(again) == card_fields(card) and again.to_json_dict() == V2


def test_png_round_trip_keeps_other_chunks(tmp_path: Path) -> None:
    old = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Old"}}
    extras = [
        text_chunk("Comment", b"made by a test"),
        chunk(b"tIME", struct.pack(">HBBBBB", 2024, 5, 6, 7, 8, 9)),
        text_chunk("chara", b64(old)),  # replaced
        chunk(b"zTXt", b"ccv3\0\0" + zlib.compress(b64(old))),  # removed: the new card is V2
        chunk(b"prVt", b"\x00\x01private chunk\xff"),
        chunk(b"iTXt", b"Title\0\0\0en\0Titel\0caf\xc3\xa9"),
    ]
    image = png(*extras, width=3, height=2)
    card = load_card(V1)
    blob = card.to_png(image)
    got = split_chunks(blob)
    kept = [whole for t, whole in got if not (t in (b"tEXt", b"zTXt") and whole[8:13] in (b"chara", b"ccv3"))]
    want = [whole for t, whole in split_chunks(image) if whole not in (extras[2], extras[3])]
    assert kept == want  # every other chunk byte for byte, in order
    assert [t for t, _ in got][-2:] == [b"tEXt", b"IEND"]
    assert text_payloads(blob) == {"chara": card.to_json_dict()}
    path = tmp_path / "bob.png"
    save_card(card, path, image)
    assert path.read_bytes() == blob
    again = load_card(path)
    assert again.name == "Bob" and again.to_json_dict() == card.to_json_dict()
    save_card(again, tmp_path / "bob.json")
    assert load_card(tmp_path / "bob.json").to_json_dict() == card.to_json_dict()


def test_png_v3_writes_both_and_ccv3_is_preferred() -> None:
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {"name": "Three", "group_only_greetings": []}}
    v2 = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Two"}}
    # either order in the file: ccv3 wins
    assert load_card(png(text_chunk("chara", b64(v2)), text_chunk("ccv3", b64(v3)))).name == "Three"
    assert load_card(png(text_chunk("ccv3", b64(v3)), text_chunk("chara", b64(v2)))).name == "Three"
    blob = load_card(v3).to_png()
    payloads = text_payloads(blob)
    assert payloads["ccv3"] == load_card(v3).to_json_dict()
    assert payloads["ccv3"]["spec"] == "chara_card_v3" and payloads["ccv3"]["data"]["name"] == "Three"
    assert payloads["chara"]["spec"] == "chara_card_v2" and payloads["chara"]["data"]["name"] == "Three"


def test_png_compressed_and_itxt_chunks() -> None:
    v2 = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Zoë"}}
    ztxt = chunk(b"zTXt", b"chara\0\0" + zlib.compress(b64(v2)))
    itxt = chunk(b"iTXt", b"chara\0\0\0\0\0" + b64(v2))
    itxt_z = chunk(b"iTXt", b"chara\0\1\0en\0\0" + zlib.compress(b64(v2)))
    plain_json = text_chunk("chara", json.dumps(v2).encode())  # some tools store the JSON itself
    for c in (ztxt, itxt, itxt_z, plain_json):
        assert load_card(png(c)).name == "Zoë"


# ---------------------------------------------------------------------------------------- bad input
def v2_with(**data: object) -> dict:
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "X", **data}}


def corrupt_crc() -> bytes:
    blob = bytearray(png(text_chunk("chara", b64(v2_with()))))
    i = blob.index(b"IDAT") + 6
    blob[i] ^= 0xFF  # a flipped byte inside IDAT's data
    return bytes(blob)


BAD: list[tuple[str, object, str]] = [
    ("not json", b"name: Bob", r"not valid JSON .*line 1 column 1"),
    ("not utf8", b"\xff\xfe\x00{", r"not UTF-8"),
    ("json array", b"[1, 2]", r"must be a JSON object, got list"),
    ("json string", "{", r"not valid JSON"),
    ("v1 no name", {"description": "d"}, r": name is missing"),
    ("v1 empty name", {"name": "  "}, r": name is empty"),
    ("v1 name type", {"name": 5}, r": name must be a string, got int"),
    ("v1 field type", {"name": "B", "first_mes": ["a"]}, r": first_mes must be a string, got list"),
    ("v2 no name", {"spec": "chara_card_v2", "data": {}}, r"data\.name is missing"),
    (
        "v2 greetings int",
        v2_with(alternate_greetings=3),
        r"data\.alternate_greetings must be a list of strings, got int",
    ),
    (
        "v2 greetings item",
        v2_with(alternate_greetings=["a", None]),
        r"data\.alternate_greetings must be a list of strings; item 1 is null",
    ),
    ("v2 tags str", v2_with(tags="a,b"), r"data\.tags must be a list of strings, got str"),
    ("v2 extensions", v2_with(extensions=[]), r"data\.extensions must be an object, got list"),
    ("v2 book", v2_with(character_book="x"), r"data\.character_book must be an object or null, got str"),
    ("v2 system_prompt", v2_with(system_prompt=True), r"data\.system_prompt must be a string, got bool"),
    ("v2 version", v2_with(character_version=[1]), r"data\.character_version must be a string, got list"),
    ("v2 data type", {"spec": "chara_card_v2", "data": "x"}, r"data must be an object, got str"),
    ("v2 no data", {"spec": "chara_card_v2", "name": "X"}, r"data is missing"),
    ("spec unknown", {"spec": "tavern", "data": {"name": "X"}}, r"unknown spec 'tavern'; accepted: 'chara_card_v2'"),
    ("spec future no data", {"spec": "chara_card_v4", "name": "X"}, r"unknown spec 'chara_card_v4'"),
    ("spec type", {"spec": 2, "data": {"name": "X"}}, r"spec must be a string .*got int"),
    (
        "spec_version type",
        {"spec": "chara_card_v2", "spec_version": [2], "data": {"name": "X"}},
        r"spec_version must be a string",
    ),
    ("data without spec", {"data": {"name": "X"}}, r"spec is missing but there is a 'data' field"),
    ("png no chara", png(text_chunk("Comment", b"hi")), r"PNG has no character card .*'chara' or 'ccv3'"),
    ("png bad base64", png(text_chunk("chara", b"eyJuYW1lIjo*!!")), r"tEXt chunk 'chara'.*not valid base64"),
    ("png base64 not json", png(text_chunk("chara", base64.b64encode(b"hello"))), r"chunk 'chara'.*not valid JSON"),
    (
        "png card field",
        png(text_chunk("chara", b64(v2_with(tags=1)))),
        r"chunk 'chara'.*data\.tags must be a list of strings, got int",
    ),
    ("png bad ccv3", png(text_chunk("ccv3", b64([1])), text_chunk("chara", b64(v2_with()))), r"chunk 'ccv3'.*got list"),
    ("png bad zlib", png(chunk(b"zTXt", b"chara\0\0not zlib")), r"compressed text is corrupt"),
    (
        "png zlib cut",
        png(chunk(b"zTXt", b"chara\0\0" + zlib.compress(b64(v2_with()))[:-6])),
        r"compressed text is truncated",
    ),
    ("png crc", corrupt_crc(), r"chunk 'IDAT' at byte \d+ fails its CRC check"),
    (
        "png truncated",
        png(text_chunk("chara", b64(v2_with())))[:-20],
        r"PNG is truncated: chunk 'tEXt' at byte \d+ needs",
    ),
    ("png no iend", png()[:-12], r"PNG is truncated: it ends at byte \d+ without an IEND chunk"),
    ("png bad signature", b"\x89PNG\r\n\x00\x00" + png()[8:], r"not a PNG \(bad signature\)"),
    ("png first chunk", SIG + chunk(b"IDAT", b"") + chunk(b"IEND", b""), r"first chunk is 'IDAT', not 'IHDR'"),
    ("oversized bytes", b" " * (MAX_CARD_BYTES + 1), r"is 20\.0 MiB; at most 20 MiB"),
    ("deep json", b'{"name": "x", "e": ' + b"[" * 500 + b"]" * 500 + b"}", r"nested more than 100 levels deep"),
    ("very deep json", b"[" * 100_000 + b"]" * 100_000, r"nested more than 100 levels deep"),
    ("source type", 42, r"cannot read a character card from a int; accepted: a file path"),
]


@pytest.mark.parametrize("case, source, message", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_clear_error(case: str, source: object, message: str) -> None:
    with pytest.raises(CardError) as info:
        load_card(source)  # type: ignore[arg-type]
    assert isinstance(info.value, InfinichatError)
    text = str(info.value)
    assert re.search(message, text), text
    assert "\n" not in text and "Traceback" not in text


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(CardError, match=r"'.*missing\.json': no such file"):
        load_card(tmp_path / "missing.json")
    with pytest.raises(CardError, match=r"is a folder"):
        load_card(tmp_path)
    big = tmp_path / "big.json"
    with big.open("wb") as f:  # sparse: the size is refused before anything is read
        f.truncate(MAX_CARD_BYTES + 1)
    with pytest.raises(CardError, match=r"big\.json'.*at most 20 MiB"):
        load_card(big)
    fake = tmp_path / "card.png"
    fake.write_text(json.dumps(v2_with()))
    with pytest.raises(CardError, match=r"card\.png'.*not a PNG"):
        load_card(fake)
    bad = tmp_path / "bad.json"
    bad.write_text('{"spec": "chara_card_v2", "data": {"name": "X", "alternate_greetings": 1}}')
    with pytest.raises(CardError, match=r"bad\.json'.*data\.alternate_greetings must be a list of strings, got int"):
        load_card(bad)


def test_to_png_rejects_a_bad_image() -> None:
    card = CharacterCard(name="x")
    with pytest.raises(CardError, match=r"image for the card.*not a PNG"):
        card.to_png(b"GIF89a....")
    with pytest.raises(CardError, match=r"image for the card.*CRC"):
        card.to_png(corrupt_crc())
