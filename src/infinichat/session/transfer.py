"""Chat export and import: our own JSON (everything: alternatives, the card, the lorebook, settings, what each
token's top-n choices were) and SillyTavern's chat JSONL (a header line, then one line per message with its
swipes). Importing builds message lists only; the manager turns them into a session, all or nothing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from infinichat.errors import InfinichatError
from infinichat.session.limits import MAX_MESSAGE_CHARS, MAX_NAME_CHARS, check_text
from infinichat.session.session import Alternative, Message, Session

FORMAT = "infinichat-chat"
VERSION = 1
KINDS = {"user": "user", "assistant": "assistant", "narration": "system", "rag": "system", "lore": "system"}
MAX_MESSAGES = 20_000
MAX_ALTERNATIVES = 256
NARRATOR = "Narrator"


@dataclass
class Imported:
    name: str = ""
    system_prompt: str | None = None
    card: dict | None = None
    lorebook: dict | None = None
    settings: dict = field(default_factory=dict)
    messages: list[Message] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- export
def export_json(s: Session) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": s.name,
        "created": s.created,
        "system_prompt": s.system_prompt,
        "card": s.card.to_json_dict() if s.card is not None else None,
        "lorebook": s.lorebook.to_json() if s.lorebook is not None else None,
        "settings": s.settings.to_json(),
        "messages": [
            {
                "kind": m.kind,
                "selected": m.selected,
                "in_context": m.in_context,
                "created": m.created,
                "meta": m.meta,
                "alternatives": [
                    {
                        "text": a.text,
                        "tokens": a.tokens,  # reused on import when they decode to the text (the same tokenizer)
                        "finish_reason": a.finish_reason,
                        "logprobs": a.logprobs,
                        "steps": a.steps,
                    }
                    for a in m.alternatives
                ],
            }
            for m in s.messages
        ],
    }


def export_jsonl(s: Session) -> str:
    """SillyTavern's chat file: lore and RAG messages are left out (they are not chat lines)."""
    user = s.settings.user_name
    char = s.card.char_name if s.card is not None else (s.name or "Assistant")
    lines: list[dict[str, Any]] = [
        {"user_name": user, "character_name": char, "create_date": _date(s.created), "chat_metadata": {}}
    ]
    for m in s.messages:
        if m.kind not in ("user", "assistant", "narration"):
            continue
        when = _date(m.created)
        line: dict[str, Any] = {
            "name": user if m.kind == "user" else NARRATOR if m.kind == "narration" else char,
            "is_user": m.kind == "user",
            "is_system": m.kind == "narration",
            "send_date": when,
            "mes": m.text,
            "extra": {},
        }
        if len(m.alternatives) > 1:
            line["swipes"] = [a.text for a in m.alternatives]
            line["swipe_id"] = m.selected
        lines.append(line)
    return "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n"


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t or 0))


# ---------------------------------------------------------------------------------------- import
def _err(msg: str) -> InfinichatError:
    return InfinichatError(f"chat import: {msg}")


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise _err(f"{what} must be a string, got {type(v).__name__}")
    return check_text(v, f"imported {what}", MAX_MESSAGE_CHARS)


def parse_chat(data: Any) -> Imported:
    """Our JSON (a dict with format "infinichat-chat"), or SillyTavern JSONL (text, or a list of its lines)."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):  # JSONL: one object per line
            data = [_json(line, f"line {i + 1}") for i, line in enumerate(data.splitlines()) if line.strip()]
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return _ours(data)
    if isinstance(data, dict) and ("mes" in data or "user_name" in data):
        data = [data]
    if isinstance(data, list):
        return _tavern(data)
    raise _err('accepted: our JSON export (format "infinichat-chat") or a SillyTavern chat (.jsonl text or its lines)')


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _err(f"{where} is not valid JSON ({e})") from None


def _ours(d: dict) -> Imported:
    if d.get("version") != VERSION:
        raise _err(f"version {d.get('version')!r} is not supported; accepted: {VERSION}")
    msgs = d.get("messages")
    if not isinstance(msgs, list) or len(msgs) > MAX_MESSAGES:
        raise _err(f"messages must be a list of at most {MAX_MESSAGES}")
    out = []
    for i, x in enumerate(msgs):
        where = f"message {i}"
        if not isinstance(x, dict) or x.get("kind") not in KINDS:
            raise _err(f"{where} must be an object with kind one of {', '.join(KINDS)}")
        alts_in = x.get("alternatives")
        if not isinstance(alts_in, list) or not 1 <= len(alts_in) <= MAX_ALTERNATIVES:
            raise _err(f"{where}: alternatives must be a list of 1 to {MAX_ALTERNATIVES}")
        alts = []
        for j, a in enumerate(alts_in):
            if not isinstance(a, dict):
                raise _err(f"{where} alternative {j} must be an object")
            steps = a.get("steps") or []
            if not isinstance(steps, list) or not all(_step_ok(s) for s in steps):
                raise _err(f"{where} alternative {j}: steps must be [token, logprob, [[token, logprob], ...]] lists")
            logprobs = a.get("logprobs") or []
            if not isinstance(logprobs, list) or not all(_num(v) for v in logprobs):
                raise _err(f"{where} alternative {j}: logprobs must be a list of numbers")
            reason = a.get("finish_reason", "stop")
            toks = a.get("tokens")
            ok = isinstance(toks, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in toks)
            alts.append(
                Alternative(
                    _text(a.get("text"), f"{where} text"),
                    toks if ok else None,
                    reason if isinstance(reason, str) and reason != "incomplete" else "stop",
                    logprobs,
                    steps,
                )
            )
        sel = x.get("selected", 0)
        if not isinstance(sel, int) or isinstance(sel, bool) or not 0 <= sel < len(alts):
            raise _err(f"{where}: selected must be an index into its alternatives")
        meta = x.get("meta") or {}
        if not isinstance(meta, dict):
            raise _err(f"{where}: meta must be an object")
        m = Message(0, x["kind"], KINDS[x["kind"]], alts, sel, bool(x.get("in_context", True)))
        m.meta = {str(k): v for k, v in meta.items() if isinstance(v, (str, int, float))}
        m.created = float(x["created"]) if _num(x.get("created")) else time.time()
        out.append(m)
    name = d.get("name") or ""
    prompt = d.get("system_prompt")
    for what, v in (("card", d.get("card")), ("lorebook", d.get("lorebook")), ("settings", d.get("settings"))):
        if v is not None and not isinstance(v, dict):
            raise _err(f"{what} must be an object or null")
    return Imported(
        check_text(name, "imported name", MAX_NAME_CHARS) if isinstance(name, str) else "",
        _text(prompt, "system prompt") if prompt is not None else None,
        d.get("card"),
        d.get("lorebook"),
        dict(d.get("settings") or {}),
        out,
    )


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _step_ok(s: Any) -> bool:
    return (
        isinstance(s, list)
        and len(s) == 3
        and isinstance(s[0], int)
        and _num(s[1])
        and isinstance(s[2], list)
        and all(isinstance(t, list) and len(t) == 2 and isinstance(t[0], int) and _num(t[1]) for t in s[2])
    )


def _tavern(lines: list) -> Imported:
    if len(lines) > MAX_MESSAGES + 1:
        raise _err(f"at most {MAX_MESSAGES} messages are accepted")
    out: list[Message] = []
    name: str = ""
    user: str | None = None
    for i, x in enumerate(lines):
        where = f"line {i + 1}"
        if not isinstance(x, dict):
            raise _err(f"{where} must be a JSON object")
        if "mes" not in x:
            if i == 0:  # the header: names and metadata
                cn, un = x.get("character_name"), x.get("user_name")
                name = cn if isinstance(cn, str) else ""
                user = un if isinstance(un, str) else None
                continue
            raise _err(f"{where} has no 'mes' (the message text)")
        text = _text(x["mes"], f"{where} mes")
        swipes = x.get("swipes")
        if isinstance(swipes, list) and swipes and len(swipes) <= MAX_ALTERNATIVES:
            alts = [Alternative(_text(t, f"{where} swipe")) for t in swipes]
            sel = x.get("swipe_id", 0)
            sel = sel if isinstance(sel, int) and not isinstance(sel, bool) and 0 <= sel < len(alts) else 0
            alts[sel] = Alternative(text)
        else:
            alts, sel = [Alternative(text)], 0
        kind = "user" if x.get("is_user") is True else "narration" if x.get("is_system") is True else "assistant"
        if kind == "narration" and text.startswith(f"{NARRATOR}: "):
            alts[sel].text = text[len(NARRATOR) + 2 :]
        out.append(Message(0, kind, KINDS[kind], alts, sel))
    settings = {"user_name": user.strip()} if user and user.strip() else {}
    return Imported(check_text(name or "", "imported name", MAX_NAME_CHARS), None, None, None, settings, out)
