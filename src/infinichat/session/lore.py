"""Lorebooks (SillyTavern "World Info" and a character card's `character_book`): which entries are in play.

Formats read
- **World info file** (SillyTavern's export): `{"entries": {"0": {"uid", "key": [...], "keysecondary": [...],
  "comment", "content", "constant", "selective", "selectiveLogic", "order", "disable", "scanDepth",
  "caseSensitive", "matchWholeWords", ...}, ...}}` (`entries` may also be a list).
- **Character book** (card spec V2/V3, `data.character_book`): `{"name", "scan_depth", "entries": [{"keys",
  "secondary_keys", "content", "enabled", "insertion_order", "case_sensitive", "name", "comment", "selective",
  "constant", "id", "extensions": {"selectiveLogic", "scan_depth", "match_whole_words"}}]}`.
Unknown fields are ignored; a field of the wrong type is an error that names the entry and the field.

What "in play" means (the session does the cache work, see `Session._update_lore`)
- An entry *matches* when one of its keys occurs in the last `scan_depth` messages (the entry's own
  scan depth, else the book's). Keys match case-insensitively unless `case_sensitive`, and as whole words
  unless `match_whole_words` is false (a key that is not a word, e.g. "C++", always matches as a substring).
  A `selective` entry with secondary keys also needs them, by its logic: AND_ANY (one of them), NOT_ALL
  (not all of them), NOT_ANY (none of them), AND_ALL (all of them). A `constant` entry always matches.
  A disabled entry never does.
- Entries that start matching enter the cache, in `insertion_order` (lower first: a higher order sits
  nearer the reply, as in SillyTavern). An entry that has not matched for `lore_ttl` user turns leaves it.
Regex keys (`/.../`), probability, groups, recursion and the book's token budget are not implemented.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from infinichat.errors import InfinichatError
from infinichat.session.limits import MAX_MESSAGE_CHARS
from infinichat.session.limits import check_text as _check_text

LOGICS = ("AND_ANY", "NOT_ALL", "NOT_ANY", "AND_ALL")  # SillyTavern's selectiveLogic 0..3
DEFAULT_SCAN_DEPTH = 2
MAX_ENTRIES = 1000
MAX_KEYS = 100
MAX_KEY_CHARS = 200
MAX_SCAN_DEPTH = 100


class LoreError(InfinichatError):
    """A lorebook that cannot be read; names the entry and the field."""


@dataclass
class LoreEntry:
    id: str
    name: str
    keys: list[str]
    content: str
    secondary_keys: list[str] = field(default_factory=list)
    selective: bool = False
    logic: str = "AND_ANY"
    constant: bool = False
    enabled: bool = True
    insertion_order: int = 100
    case_sensitive: bool = False
    match_whole_words: bool = True
    scan_depth: int | None = None  # None: the book's

    def _found(self, key: str, text: str) -> bool:
        if not key:
            return False
        flags = 0 if self.case_sensitive else re.IGNORECASE
        if self.match_whole_words and re.fullmatch(r"[\w' -]+", key):
            return re.search(rf"(?<!\w){re.escape(key)}(?!\w)", text, flags) is not None
        return (key in text) if self.case_sensitive else (key.lower() in text.lower())

    def matches(self, text: str) -> bool:
        """Whether this entry is triggered by `text` (the scanned messages joined)."""
        if not self.enabled:
            return False
        if self.constant:
            return True
        if not any(self._found(k, text) for k in self.keys):
            return False
        if not self.selective or not self.secondary_keys:
            return True
        hits = [self._found(k, text) for k in self.secondary_keys]
        return {
            "AND_ANY": any(hits),
            "NOT_ALL": not all(hits),
            "NOT_ANY": not any(hits),
            "AND_ALL": all(hits),
        }[self.logic]


@dataclass
class Lorebook:
    name: str = ""
    entries: list[LoreEntry] = field(default_factory=list)
    scan_depth: int = DEFAULT_SCAN_DEPTH

    def matching(self, recent: list[str]) -> list[LoreEntry]:
        """Entries triggered by the newest messages (`recent`, oldest first), in insertion order."""
        hit = []
        for e in self.entries:
            depth = self.scan_depth if e.scan_depth is None else e.scan_depth
            text = "\n".join(recent[-depth:]) if depth > 0 else ""
            if e.matches(text):
                hit.append(e)
        return sorted(hit, key=lambda e: e.insertion_order)

    def get(self, entry_id: str) -> LoreEntry | None:
        return next((e for e in self.entries if e.id == entry_id), None)

    def to_json(self) -> dict:
        """Our own form (read back by `load_lorebook`)."""
        return {"name": self.name, "scan_depth": self.scan_depth, "entries": [asdict(e) for e in self.entries]}

    def merged(self, other: Lorebook) -> Lorebook:
        """This book and `other`'s entries (ids prefixed so they stay distinct)."""
        extra = [LoreEntry(**{**asdict(e), "id": f"{other.name or 'book'}:{e.id}"}) for e in other.entries]
        return Lorebook(self.name or other.name, [*self.entries, *extra], self.scan_depth)


# ---------------------------------------------------------------------------------------- reading
def check_text(text: Any, what: str, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    try:
        return _check_text(text, what, max_chars)
    except InfinichatError as e:
        raise LoreError(str(e)) from None


def _get(d: dict, where: str, names: tuple[str, ...], kind: type | tuple[type, ...], default: Any) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            v = d[n]
            ok = isinstance(v, kind) and not (isinstance(v, bool) and kind in (int, (int, float)))
            if not ok:
                want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
                raise LoreError(f"lorebook {where}: {n} must be {want}, got {type(v).__name__}")
            return v
    return default


def _keys(d: dict, where: str, names: tuple[str, ...]) -> list[str]:
    v = _get(d, where, names, (list, str), [])
    if isinstance(v, str):  # some tools write "a, b"
        v = [k.strip() for k in v.split(",")]
    if len(v) > MAX_KEYS:
        raise LoreError(f"lorebook {where}: at most {MAX_KEYS} keys, got {len(v)}")
    out = []
    for k in v:
        if not isinstance(k, str):
            raise LoreError(f"lorebook {where}: every key must be a string, got {type(k).__name__}")
        check_text(k, f"lorebook {where} key", MAX_KEY_CHARS)
        if k.strip():
            out.append(k.strip())
    return out


def _logic(d: dict, ext: dict, where: str) -> str:
    v = d.get("selectiveLogic", ext.get("selectiveLogic", 0))
    if isinstance(v, str) and v.upper() in LOGICS:
        return v.upper()
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(LOGICS):
        return LOGICS[v]
    raise LoreError(f"lorebook {where}: selectiveLogic must be 0..3 or one of {', '.join(LOGICS)}, got {v!r}")


def _depth(v: Any, where: str) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SCAN_DEPTH:
        raise LoreError(f"lorebook {where}: scan depth must be an integer in [0, {MAX_SCAN_DEPTH}], got {v!r}")
    return v


def _entry(d: Any, index: int | str) -> LoreEntry:
    where = f"entry {index}"
    if not isinstance(d, dict):
        raise LoreError(f"lorebook {where}: must be an object, got {type(d).__name__}")
    given = d.get("extensions")
    ext: dict = given if isinstance(given, dict) else {}
    eid = d.get("uid", d.get("id", index))
    content = _get(d, where, ("content",), str, "")
    check_text(content, f"lorebook {where} content", MAX_MESSAGE_CHARS)
    name = _get(d, where, ("comment", "name"), str, "") or ""
    keys = _keys(d, where, ("key", "keys"))
    enabled = _get(d, where, ("enabled",), bool, True) and not _get(d, where, ("disable",), bool, False)
    order = _get(d, where, ("order", "insertion_order"), (int, float), 100)
    whole = d.get("matchWholeWords", ext.get("match_whole_words"))
    return LoreEntry(
        id=str(eid),
        name=check_text(name, f"lorebook {where} name", 256) or (keys[0] if keys else f"entry {index}"),
        keys=keys,
        content=content,
        secondary_keys=_keys(d, where, ("keysecondary", "secondary_keys")),
        selective=_get(d, where, ("selective",), bool, False),
        logic=_logic(d, ext, where),
        constant=_get(d, where, ("constant",), bool, False),
        enabled=enabled,
        insertion_order=int(order),
        case_sensitive=bool(_get(d, where, ("caseSensitive", "case_sensitive"), bool, False)),
        match_whole_words=True if whole is None else bool(whole),
        scan_depth=_depth(d.get("scanDepth", ext.get("scan_depth")), where),
    )


def load_lorebook(source: Any, name: str = "") -> Lorebook:
    """A lorebook from a parsed JSON object (world info file, character book or our form) or JSON text."""
    if isinstance(source, (str, bytes)):
        try:
            source = json.loads(source)
        except (ValueError, RecursionError) as e:
            raise LoreError(f"lorebook is not valid JSON ({e})") from None
    if not isinstance(source, dict):
        raise LoreError(f"a lorebook must be a JSON object with 'entries', got {type(source).__name__}")
    raw = source.get("entries")
    if isinstance(raw, dict):
        items: list[tuple[int | str, Any]] = list(raw.items())
    elif isinstance(raw, list):
        items = list(enumerate(raw))
    else:
        raise LoreError("a lorebook needs 'entries': an object (SillyTavern world info) or a list (character book)")
    if len(items) > MAX_ENTRIES:
        raise LoreError(f"a lorebook has at most {MAX_ENTRIES} entries, got {len(items)}")
    entries = [_entry(d, i) for i, d in items]
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        entries = [LoreEntry(**{**asdict(e), "id": str(i)}) for i, e in enumerate(entries)]
    book_name = source.get("name") if isinstance(source.get("name"), str) else name
    depth = _depth(source.get("scan_depth", source.get("scanDepth")), "scan_depth")
    return Lorebook(
        check_text(book_name or name, "lorebook name", 256),
        entries,
        DEFAULT_SCAN_DEPTH if depth is None else depth,
    )
