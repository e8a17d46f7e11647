"""Tavern / SillyTavern character cards: read from JSON or PNG, rendered for a chat, written back.

Formats read
- **V1**: a flat JSON object: name, description, personality, scenario, first_mes, mes_example. No
  `spec` field; such a card gets the label `spec = "chara_card_v1"` here and exports as V2.
- **V2** (`{"spec": "chara_card_v2", "spec_version": "2.0", "data": {...}}`) and **V3**
  (`"spec": "chara_card_v3"`, the same `data` fields plus extras such as `nickname`, `assets`,
  `group_only_greetings`): read the same way; V3 extras stay in `raw` and are exported unchanged.
  V3's `nickname`, when set, is what `{{char}}` becomes.
- An unknown spec of the form `chara_card_v<N>` that has a `data` object (a future version) is read
  like V2 with a logged warning; any other spec string is an error.
- Sources: a file path, bytes, JSON text (a `str` starting with `{`), or an already parsed dict.
  A PNG carries the card base64-encoded JSON in a `tEXt` (or `zTXt` / `iTXt`) chunk with keyword
  `ccv3` (V3, preferred when present) or `chara`. PNG chunks are parsed here with `struct` + `zlib`;
  the signature and every chunk CRC are checked. Inputs over `MAX_CARD_BYTES` are refused.

Where each part goes in a chat (the session layer does the placing; `user` is the user's name)
- `chat_system_prompt(user)`: the system prompt, kept in a pinned segment at the start of the cache.
  It is the card's `system_prompt` with `{{original}}` replaced by `default_system_prompt(user)`,
  or, when the card has none, that default (description, personality, scenario, example dialogues).
- `greetings(user)`: `[first_mes] + alternate_greetings` (blank ones left out); the chosen one is the
  first assistant message. `greeting(i, user)` picks one.
- `post_history(user)`: `post_history_instructions`, inserted right before the assistant's reply on
  every turn (after the last user message), not stored as a turn. Its `{{original}}` becomes "",
  as there is no default post-history prompt.
- `example_dialogues(user)`: `mes_example` split on `<START>`; already inside the default prompt.
`{{char}}` / `{{user}}` (any case, inner spaces allowed) and the V1 `<BOT>` / `<USER>` are replaced
at render time, in one pass (a name that itself contains `{{user}}` is not substituted again).

Export: `to_json_dict()` gives the V2 shape (V3 for a V3 card) with every unknown key kept, at the top
level and inside `data`; a field left unchanged keeps its original value exactly (a `null` stays
`null`), and a field the V2 spec requires but the input lacked is written with its empty value, so an
unedited V2/V3 card that had every field exports equal to its input. When an edited V2 card also carries
the V1 fields at the top level (as SillyTavern writes them), those copies are updated too.
`to_png(image)` writes the card into a PNG (a generated 1x1 one when no image is given).
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infinichat.errors import InfinichatError

log = logging.getLogger(__name__)

MAX_CARD_BYTES = 20 * 1024 * 1024  # a card file (JSON or PNG), or one decompressed PNG text chunk
MAX_DEPTH = 100  # JSON nesting (real cards nest < 10 levels; deep nesting would overflow the recursion)
DEFAULT_USER = "User"
SPEC_V1 = "chara_card_v1"  # our label: V1 cards have no spec field
SPEC_V2 = "chara_card_v2"
SPEC_V3 = "chara_card_v3"
SPEC_VERSIONS = {SPEC_V2: "2.0", SPEC_V3: "3.0"}
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
STR_FIELDS = (*V1_FIELDS, "system_prompt", "post_history_instructions", "creator_notes", "creator", "character_version")
LIST_FIELDS = ("alternate_greetings", "tags")
DICT_FIELDS = ("extensions", "character_book")
KNOWN_FIELDS = (*STR_FIELDS, *LIST_FIELDS, *DICT_FIELDS)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_KEYWORDS = ("ccv3", "chara")  # PNG text keywords, in order of preference
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
ACCEPTED = "accepted: a JSON card (V1, chara_card_v2, chara_card_v3) or a PNG with a 'chara' or 'ccv3' text chunk"


class CardError(InfinichatError):
    """A character card that cannot be read or written; names the source and the field."""


def _err(where: str, msg: str) -> CardError:
    return CardError(f"character card {where}: {msg}")


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


# ---------------------------------------------------------------------------------------- the card
@dataclass
class CharacterCard:
    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    alternate_greetings: list[str] = field(default_factory=list)
    system_prompt: str = ""
    post_history_instructions: str = ""
    creator_notes: str = ""
    tags: list[str] = field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    extensions: dict[str, Any] = field(default_factory=dict)
    character_book: dict[str, Any] | None = None  # kept raw (a lorebook), not interpreted here
    spec: str = SPEC_V2
    spec_version: str = "2.0"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the card as read, for export

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: Any, where: str = "(dict)") -> CharacterCard:
        return _card_from_dict(d, where)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "(JSON text)") -> CharacterCard:
        blob = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        _check_size(len(blob), where)
        return _card_from_dict(_parse_json(blob, where), where)

    @classmethod
    def from_png(cls, blob: bytes, where: str = "(PNG bytes)") -> CharacterCard:
        return _card_from_png(bytes(blob), where)

    # ------------------------------------------------------------------ rendering
    @property
    def char_name(self) -> str:
        """What `{{char}}` becomes: the V3 `nickname` when set, else `name`."""
        data = self.raw.get("data") if self.spec == SPEC_V3 and isinstance(self.raw, dict) else None
        nick = data.get("nickname") if isinstance(data, dict) else None
        return nick if isinstance(nick, str) and nick.strip() else self.name

    def substitute(self, text: str, user: str = DEFAULT_USER) -> str:
        return _substitute(text, self.char_name, user)

    def example_dialogues(self, user: str = DEFAULT_USER) -> list[str]:
        """`mes_example` split on `<START>`: one string per example (its lines kept), blanks dropped."""
        parts = re.split(r"<START>", self.mes_example.replace("\r\n", "\n"), flags=re.IGNORECASE)
        return [self.substitute(p.strip(), user) for p in parts if p.strip()]

    def default_system_prompt(self, user: str = DEFAULT_USER) -> str:
        char = self.char_name
        parts = [f"Write {char}'s next reply in a fictional chat between {char} and {user}. Stay in character."]
        if self.description.strip():
            parts.append(self.substitute(self.description.strip(), user))
        if self.personality.strip():
            parts.append(f"{char}'s personality: {self.substitute(self.personality.strip(), user)}")
        if self.scenario.strip():
            parts.append(f"Scenario: {self.substitute(self.scenario.strip(), user)}")
        examples = self.example_dialogues(user)
        if examples:
            blocks = [f"Example dialogue {i}:\n{e}" for i, e in enumerate(examples, 1)]
            parts.append(f"How {char} speaks:\n\n" + "\n\n".join(blocks))
        return "\n\n".join(parts)

    def chat_system_prompt(self, user: str = DEFAULT_USER) -> str:
        """The pinned system prompt: the card's own (its `{{original}}` = the default), else the default."""
        if not self.system_prompt.strip():
            return self.default_system_prompt(user)
        return _substitute(self.system_prompt, self.char_name, user, original=self.default_system_prompt(user))

    def greetings(self, user: str = DEFAULT_USER) -> list[str]:
        """`[first_mes] + alternate_greetings`, substituted; blank greetings are left out."""
        return [self.substitute(g, user) for g in [self.first_mes, *self.alternate_greetings] if g.strip()]

    def greeting(self, index: int = 0, user: str = DEFAULT_USER) -> str:
        """Greeting `index` of `greetings(user)`; "" when the card has none and index is 0."""
        all_ = self.greetings(user)
        if index == 0 and not all_:
            return ""
        if not 0 <= index < len(all_):
            n = len(all_)
            raise CardError(f"card {self.name!r}: greeting {index} does not exist; it has {n} (0..{n - 1})")
        return all_[index]

    def post_history(self, user: str = DEFAULT_USER) -> str:
        """`post_history_instructions` for right before the reply ("" when the card has none)."""
        return _substitute(self.post_history_instructions, self.char_name, user, original="").strip()

    # ------------------------------------------------------------------ export
    def to_json_dict(self, spec: str | None = None) -> dict[str, Any]:
        """The card as a V2 (or V3) JSON object, every unknown key of the original kept."""
        if spec is None:
            spec = SPEC_V2 if self.spec == SPEC_V1 else self.spec
        elif spec not in SPEC_VERSIONS:
            raise CardError(f"cannot export a card as spec {spec!r}; accepted: {', '.join(SPEC_VERSIONS)}")
        raw = self.raw if isinstance(self.raw, dict) else {}
        from_v1 = self.spec == SPEC_V1
        if from_v1:
            unknown = {k: copy.deepcopy(v) for k, v in raw.items() if k not in V1_FIELDS}
            top: dict[str, Any] = {"spec": None, "spec_version": None, "data": None, **unknown}
            raw_data: dict[str, Any] = {}
        else:
            top = copy.deepcopy(raw)
            given = raw.get("data")
            raw_data = given if isinstance(given, dict) else {}
        data = copy.deepcopy(raw_data)
        for k in KNOWN_FIELDS:
            cur = getattr(self, k)
            if k in raw_data and _same(k, raw_data[k], cur):
                continue  # unchanged: keep the original value exactly
            if k == "character_book" and cur is None:
                data.pop(k, None)
                continue
            data[k] = copy.deepcopy(cur)
            if not from_v1 and k in V1_FIELDS and isinstance(top.get(k), str):
                top[k] = cur  # keep SillyTavern's top-level V1 copy in sync
        if spec == SPEC_V3:
            data.setdefault("group_only_greetings", [])
        top["spec"] = spec
        top["spec_version"] = self.spec_version if spec == self.spec else SPEC_VERSIONS[spec]
        top["data"] = data
        return top

    def to_png(self, image_bytes: bytes | None = None) -> bytes:
        """A PNG holding the card: a `chara` tEXt chunk (V2 JSON) and, for a V3 card, a `ccv3` one.

        With `image_bytes` (a PNG), its old card chunks are replaced and every other chunk is kept
        byte for byte, in order; without, a 1x1 transparent PNG is generated."""
        base = _tiny_png() if image_bytes is None else bytes(image_bytes)
        _check_size(len(base), "image for the card")
        chunks = [c for c in _png_chunks(base, "image for the card") if _card_keyword(c) is None]
        new = []
        if self.spec == SPEC_V3:
            new.append(_text_chunk("ccv3", self.to_json_dict(SPEC_V3)))
        new.append(_text_chunk("chara", self.to_json_dict(SPEC_V2)))
        body = b"".join(c.raw for c in chunks[:-1]) + b"".join(new) + chunks[-1].raw  # before IEND
        return PNG_SIGNATURE + body


def load_card(source: str | os.PathLike[str] | bytes | bytearray | dict[str, Any]) -> CharacterCard:
    """Read a card from a file path (.json or .png, told apart by content), bytes, JSON text or a dict."""
    if isinstance(source, dict):
        return _card_from_dict(source, "(dict)")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _card_from_bytes(bytes(source), "(bytes)")
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return CharacterCard.from_json(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = repr(str(path))
        try:
            size = path.stat().st_size
            if path.is_dir():
                raise _err(where, f"is a folder; {ACCEPTED}")
            _check_size(size, where)
            blob = path.read_bytes()
        except FileNotFoundError:
            raise _err(where, f"no such file; {ACCEPTED}") from None
        except OSError as e:
            raise _err(where, f"cannot be read ({e.strerror or e})") from None
        return _card_from_bytes(blob, where, png_expected=path.suffix.lower() == ".png")
    raise CardError(
        f"cannot read a character card from a {_type_name(source)}; accepted: a file path, bytes, JSON text or a dict"
    )


def save_card(card: CharacterCard, path: str | os.PathLike[str], image_bytes: bytes | None = None) -> None:
    """Write `card` to `path`: a PNG when the name ends in .png, else V2 JSON (UTF-8)."""
    p = Path(path)
    if p.suffix.lower() == ".png":
        blob = card.to_png(image_bytes)
    else:
        blob = json.dumps(card.to_json_dict(), ensure_ascii=False, indent=2).encode("utf-8")
    try:
        p.write_bytes(blob)
    except OSError as e:
        raise CardError(f"cannot write character card {str(p)!r}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------- substitution
_MACRO = re.compile(r"\{\{\s*(char|user|original)\s*\}\}|<(bot|user)>", re.IGNORECASE)


def substitute(text: str, char: str, user: str) -> str:
    """`{{char}}` / `{{user}}` (and V1 `<BOT>` / `<USER>`) replaced, in one pass."""
    return _substitute(text, char, user)


def _substitute(text: str, char: str, user: str, original: str | None = None) -> str:
    """Replace the macros in one pass; `{{original}}` only when `original` is given."""

    def repl(m: re.Match[str]) -> str:
        word = (m.group(1) or m.group(2)).lower()
        if word in ("char", "bot"):
            return char
        if word == "user":
            return user
        return m.group(0) if original is None else original

    return _MACRO.sub(repl, text)


# ---------------------------------------------------------------------------------------- dict -> card
def _norm_field(k: str, v: Any, where: str, path: str) -> Any:
    """The validated value of known field `k` (null -> its empty value); raises CardError naming `path`."""
    if k in STR_FIELDS:
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        if k == "character_version" and isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)  # some tools write a number here
        raise _err(where, f"{path} must be a string, got {_type_name(v)}")
    if k in LIST_FIELDS:
        if v is None:
            return []
        if not isinstance(v, list):
            raise _err(where, f"{path} must be a list of strings, got {_type_name(v)}")
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise _err(where, f"{path} must be a list of strings; item {i} is {_type_name(item)}")
        return list(v)
    if k == "extensions":
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise _err(where, f"{path} must be an object, got {_type_name(v)}")
        return copy.deepcopy(v)
    if v is not None and not isinstance(v, dict):  # character_book
        raise _err(where, f"{path} must be an object or null, got {_type_name(v)}")
    return copy.deepcopy(v)


def _same(k: str, raw_value: Any, cur: Any) -> bool:
    try:
        return _norm_field(k, raw_value, "", k) == cur
    except CardError:
        return False


def _depth(obj: Any) -> int:
    """How deeply lists / dicts nest in `obj` (iterative, so a deep input cannot overflow the stack)."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        o, d = todo.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                break
            todo.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _card_from_dict(d: Any, where: str) -> CharacterCard:
    if not isinstance(d, dict):
        raise _err(where, f"must be a JSON object, got {_type_name(d)}; {ACCEPTED}")
    if _depth(d) > MAX_DEPTH:
        raise _err(where, f"JSON is nested more than {MAX_DEPTH} levels deep")
    spec = d.get("spec")
    if "spec" not in d:
        if "data" in d:
            raise _err(
                where,
                f"spec is missing but there is a 'data' field; a V2/V3 card needs "
                f"spec '{SPEC_V2}' or '{SPEC_V3}', a V1 card has its fields at the top level",
            )
        names: tuple[str, ...]
        obj, prefix, names = d, "", V1_FIELDS
        spec, version = SPEC_V1, "1.0"
    else:
        if not isinstance(spec, str):
            raise _err(where, f"spec must be a string ('{SPEC_V2}' or '{SPEC_V3}'), got {_type_name(spec)}")
        if spec not in SPEC_VERSIONS:
            if not (re.fullmatch(r"chara_card_v\d+", spec) and isinstance(d.get("data"), dict)):
                raise _err(
                    where,
                    f"unknown spec {spec!r}; accepted: '{SPEC_V2}', '{SPEC_V3}', "
                    "or a V1 card (no spec, fields at the top level)",
                )
            log.warning(
                "character card %s: spec %r is newer than this reader knows; reading it as %s", where, spec, SPEC_V2
            )
        version = d.get("spec_version", SPEC_VERSIONS.get(spec, ""))
        if isinstance(version, (int, float)) and not isinstance(version, bool):
            version = str(version)
        if not isinstance(version, str):
            raise _err(where, f"spec_version must be a string such as '2.0', got {_type_name(version)}")
        if "data" not in d:
            raise _err(where, f"data is missing; a '{spec}' card keeps its fields in a 'data' object")
        obj, prefix, names = d["data"], "data.", KNOWN_FIELDS
        if not isinstance(obj, dict):
            raise _err(where, f"data must be an object, got {_type_name(obj)}")
    name = obj.get("name")
    if name is None:
        raise _err(where, f"{prefix}name is missing; every card needs a name")
    values = {k: _norm_field(k, obj.get(k), where, prefix + k) for k in names}
    if not values["name"].strip():
        raise _err(where, f"{prefix}name is empty; every card needs a name")
    return CharacterCard(**values, spec=spec, spec_version=version, raw=copy.deepcopy(d))


# ---------------------------------------------------------------------------------------- bytes, JSON
def _check_size(n: int, where: str) -> None:
    if n > MAX_CARD_BYTES:
        raise _err(where, f"is {n / 2**20:.1f} MiB; at most {MAX_CARD_BYTES // 2**20} MiB is accepted")


def _parse_json(blob: bytes, where: str) -> Any:
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _err(where, f"is not UTF-8 text (bad byte at offset {e.start}); {ACCEPTED}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _err(where, f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {ACCEPTED}") from None
    except RecursionError:
        raise _err(where, f"JSON is nested more than {MAX_DEPTH} levels deep") from None


def _card_from_bytes(blob: bytes, where: str, png_expected: bool = False) -> CharacterCard:
    _check_size(len(blob), where)
    if blob.startswith((PNG_SIGNATURE, b"\x89PNG")):
        return _card_from_png(blob, where)
    if png_expected:
        raise _err(where, f"is not a PNG (bad signature); {ACCEPTED}")
    return _card_from_dict(_parse_json(blob, where), where)


# ---------------------------------------------------------------------------------------- PNG
@dataclass
class _Chunk:
    type: bytes
    data: bytes
    raw: bytes  # the whole chunk as stored: length, type, data, CRC


def _png_chunks(blob: bytes, where: str) -> list[_Chunk]:
    """Every chunk up to IEND, with the signature, chunk framing and CRCs checked."""
    if not blob.startswith(PNG_SIGNATURE):
        raise _err(where, "is not a PNG (bad signature)")
    pos, chunks = len(PNG_SIGNATURE), list[_Chunk]()
    while True:
        if pos + 12 > len(blob):
            raise _err(where, f"PNG is truncated: it ends at byte {len(blob)} without an IEND chunk")
        length, ctype = struct.unpack(">I4s", blob[pos : pos + 8])
        name = ctype.decode("latin-1")
        if not ctype.isalpha() or not ctype.isascii():
            raise _err(where, f"PNG is corrupt: invalid chunk type {name!r} at byte {pos}")
        end = pos + 12 + length
        if end > len(blob):
            raise _err(
                where,
                f"PNG is truncated: chunk {name!r} at byte {pos} needs {length + 12} "
                f"bytes, only {len(blob) - pos} are left",
            )
        if not chunks and ctype != b"IHDR":
            raise _err(where, f"PNG is corrupt: the first chunk is {name!r}, not 'IHDR'")
        data = blob[pos + 8 : end - 4]
        (stored,) = struct.unpack(">I", blob[end - 4 : end])
        computed = zlib.crc32(ctype + data)
        if stored != computed:
            raise _err(
                where,
                f"PNG is corrupt: chunk {name!r} at byte {pos} fails its CRC check "
                f"(stored {stored:08x}, computed {computed:08x})",
            )
        chunks.append(_Chunk(ctype, data, blob[pos:end]))
        pos = end
        if ctype == b"IEND":
            return chunks


def _card_keyword(c: _Chunk) -> str | None:
    """The card keyword ('ccv3' / 'chara') of a text chunk that holds a card, else None."""
    if c.type not in TEXT_CHUNKS:
        return None
    kw = c.data.partition(b"\0")[0].decode("latin-1").lower()
    return kw if kw in CARD_KEYWORDS else None


def _inflate(data: bytes, where: str) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_CARD_BYTES + 1)
    except zlib.error as e:
        raise _err(where, f"compressed text is corrupt ({e})") from None
    if len(out) > MAX_CARD_BYTES:
        raise _err(where, f"decompressed text is over {MAX_CARD_BYTES // 2**20} MiB")
    if not d.eof:
        raise _err(where, "compressed text is truncated")
    return out


def _chunk_text(c: _Chunk, where: str) -> str:
    """The text of a tEXt / zTXt / iTXt chunk."""
    rest = c.data.partition(b"\0")[2]
    if c.type == b"tEXt":
        return rest.decode("latin-1")
    if c.type == b"zTXt":
        if rest[:1] != b"\0":
            raise _err(where, "unknown compression method (only 0, zlib, exists)")
        return _inflate(rest[1:], where).decode("latin-1")
    if len(rest) < 2:  # iTXt: flag, method, language\0, translated keyword\0, text
        raise _err(where, "iTXt chunk is cut short")
    compressed, method = rest[0], rest[1]
    text = rest[2:].split(b"\0", 2)
    if len(text) < 3:
        raise _err(where, "iTXt chunk is missing its language or translated keyword field")
    body = text[2]
    if compressed:
        if method != 0:
            raise _err(where, f"unknown compression method {method} (only 0, zlib, exists)")
        body = _inflate(body, where)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(where, f"iTXt text is not UTF-8 (bad byte at offset {e.start})") from None


def _decode_payload(text: str, where: str) -> Any:
    s = text.strip()
    if s.startswith("{"):
        payload = s.encode("utf-8")  # some tools store the JSON itself
    else:
        compact = "".join(s.split())
        compact += "=" * (-len(compact) % 4)
        try:
            payload = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _err(where, f"is not valid base64 ({e}); the chunk must hold base64-encoded JSON") from None
    return _parse_json(payload, where)


def _card_from_png(blob: bytes, where: str) -> CharacterCard:
    _check_size(len(blob), where)
    found: dict[str, _Chunk] = {}
    for c in _png_chunks(blob, where):
        kw = _card_keyword(c)
        if kw is not None:
            if kw in found:
                log.warning("character card %s: more than one %r chunk; using the first", where, kw)
            found.setdefault(kw, c)
    for kw in CARD_KEYWORDS:
        if kw in found:
            c = found[kw]
            label = f"{where} (PNG {c.type.decode()} chunk {kw!r})"
            return _card_from_dict(_decode_payload(_chunk_text(c, label), label), label)
    raise _err(
        where,
        "PNG has no character card (no tEXt/zTXt/iTXt chunk with keyword 'chara' or 'ccv3'); it is a plain image",
    )


def _chunk_bytes(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def _text_chunk(keyword: str, card: dict[str, Any]) -> bytes:
    payload = base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8"))
    return _chunk_bytes(b"tEXt", keyword.encode("latin-1") + b"\0" + payload)


def _tiny_png() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # 1x1, 8-bit RGBA, deflate, no filter/interlace
    idat = zlib.compress(b"\x00" + b"\x00\x00\x00\x00")  # filter byte + one transparent pixel
    return PNG_SIGNATURE + _chunk_bytes(b"IHDR", ihdr) + _chunk_bytes(b"IDAT", idat) + _chunk_bytes(b"IEND", b"")
