"""The two ways the terminal chat reaches sessions, behind one interface: over HTTP (`--server URL`) or
in-process over a local SessionManager. Generating actions yield ("token", text) and then ("done", info).
Every edit returns the session's history; one that fails raises InfinichatError and changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

import httpx

from infinichat.errors import InfinichatError

if TYPE_CHECKING:
    from infinichat.session.datalock import DataDirLock
    from infinichat.session.session import Session

ACTIONS = ("send", "retry", "continue", "narrate", "suggest")


class ChatBackend(Protocol):
    name: str  # the model's name

    def exists(self, sid: str) -> bool: ...
    def open(self, sid: str, settings: dict, system_prompt: str | None) -> dict: ...
    def history(self) -> dict: ...
    def sessions(self) -> list[dict]: ...
    def act(self, action: str, params: dict, text: str | None = None) -> Iterator[tuple[str, object]]: ...
    def revert(self, turn: int) -> dict: ...
    def rag(self, text: str) -> dict: ...
    def select(self, turn: int, index: int) -> dict: ...
    def edit(self, turn: int, text: str) -> dict: ...
    def delete(self, turn: int) -> dict: ...
    def reset(self) -> dict: ...
    def update_settings(self, changes: dict) -> dict: ...
    def export(self, fmt: str) -> str: ...
    def close(self) -> None: ...


class LocalBackend:
    def __init__(self, manager, name: str, lock: DataDirLock | None = None):
        self.m, self.name = manager, name
        self._s: Session | None = None
        self._lock = lock  # this process's hold on the data directory, released by close()

    @property
    def s(self) -> Session:
        """The open session."""
        if self._s is None:
            raise InfinichatError("no session is open")
        return self._s

    def exists(self, sid):
        from infinichat.session.db import check_session_id

        return check_session_id(sid) in self.m.sessions or self.m.db.exists(sid)

    def open(self, sid, settings, system_prompt):
        s = self.m.get(sid) if self.exists(sid) else self.m.create(sid, system_prompt=system_prompt, settings=settings)
        self._s = s  # only once it opened: a failed open leaves the previous session open
        return s.history()

    def _edit(self, action) -> dict:
        with self.m.atomic(self.s) as s:  # a failed edit leaves the session as it was, in memory and on disk
            action(s)
        return self.s.history()

    def history(self):
        return self.s.history()

    def sessions(self):
        return self.m.list()

    def act(self, action, params, text=None):
        from dataclasses import replace

        if action not in ACTIONS:
            raise InfinichatError(f"unknown action {action!r}; accepted: {', '.join(ACTIONS)}")
        p = replace(self.s.settings.sampling(), **params)
        p.validate()
        s = self.s
        self.m.check_room(s)
        fn = {"send": lambda: s.send(text, p), "continue": lambda: s.continue_(p)}.get(
            action, lambda: getattr(s, action)(p)
        )
        gen = self.m.guarded(s, fn())  # a failure before the first token changes nothing
        try:
            for ev in gen:
                if ev.kind == "token":
                    yield "token", ev.text
                else:
                    yield "done", {"turn": ev.turn, "finish_reason": ev.finish_reason, "text": ev.text}
        finally:
            gen.close()  # Ctrl-C: the partial reply is kept, marked cancelled

    def revert(self, turn):
        return self._edit(lambda s: s.revert_to(turn))

    def rag(self, text):
        return self._edit(lambda s: s.inject_rag(text))

    def select(self, turn, index):
        return self._edit(lambda s: s.select(turn, index))

    def edit(self, turn, text):
        return self._edit(lambda s: s.edit(turn, text))

    def delete(self, turn):
        return self._edit(lambda s: s.delete(turn))

    def reset(self):
        return self._edit(lambda s: s.reset())

    def update_settings(self, changes):
        return self._edit(lambda s: s.update_settings(changes))

    def export(self, fmt):
        from infinichat.session.transfer import export_json, export_jsonl

        return json.dumps(export_json(self.s), ensure_ascii=False, indent=1) if fmt == "json" else export_jsonl(self.s)

    def close(self):
        try:
            self.m.close()
        finally:
            if self._lock is not None:
                self._lock.release()


class HttpBackend:
    def __init__(self, url: str, api_key: str | None = None):
        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.c = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30, read=600))
        self.sid: str | None = None
        try:
            info = self.c.get("/api/info").raise_for_status().json()
            self.name = info.get("label") or info["model"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.c.close()
            raise InfinichatError(f"cannot reach an infinichat server at {url}: {e}") from None

    @staticmethod
    def _check(r) -> None:
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:200]
            raise InfinichatError(f"server answered {r.status_code}: {msg}")

    def _request(self, method: str, path: str, body: dict | None = None):
        try:
            return self.c.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise InfinichatError(f"the server at {self.url} did not answer: {e}") from None

    def _json(self, method: str, path: str, body: dict | None = None):
        r = self._request(method, path, body)
        self._check(r)
        return r.json() if r.content else None

    def exists(self, sid):
        r = self._request("GET", f"/api/sessions/{quote(sid, safe='')}")
        if r.status_code == 404:
            return False
        self._check(r)
        return True

    def open(self, sid, settings, system_prompt):
        if self.exists(sid):
            h = self._json("GET", f"/api/sessions/{quote(sid, safe='')}")
        else:
            h = self._json("POST", "/api/sessions", {"id": sid, "system_prompt": system_prompt, "settings": settings})
        self.sid = h["id"]  # only once it opened: a failed open leaves the previous session open
        return h

    @property
    def _base(self) -> str:
        if self.sid is None:
            raise InfinichatError("no session is open")
        return f"/api/sessions/{quote(self.sid, safe='')}"

    def history(self):
        return self._json("GET", self._base)

    def sessions(self):
        return self._json("GET", "/api/sessions")["sessions"]

    def act(self, action, params, text=None):
        path = f"{self._base}/" + ("messages" if action == "send" else action)
        body = {"params": params} | ({"text": text} if action == "send" else {})
        try:
            yield from self._events(path, body)
        except httpx.HTTPError as e:
            raise InfinichatError(f"the server at {self.url} did not answer: {e}") from None

    def _events(self, path: str, body: dict) -> Iterator[tuple[str, object]]:
        with self.c.stream("POST", path, json=body) as r:  # leaving early closes it: the server cancels
            if r.status_code >= 400:
                r.read()
                self._check(r)
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "token":
                        yield "token", data["text"]
                    elif event == "done":
                        yield "done", data
                    elif event == "error":
                        raise InfinichatError(f"server: {data['error']['message']}")

    def revert(self, turn):
        return self._json("POST", f"{self._base}/revert", {"turn": turn})

    def rag(self, text):
        return self._json("POST", f"{self._base}/rag", {"text": text})

    def select(self, turn, index):
        return self._json("POST", f"{self._base}/select", {"turn": turn, "index": index})

    def edit(self, turn, text):
        return self._json("PATCH", f"{self._base}/messages/{turn}", {"text": text})

    def delete(self, turn):
        return self._json("DELETE", f"{self._base}/messages/{turn}")

    def reset(self):
        return self._json("POST", f"{self._base}/reset")

    def update_settings(self, changes):
        return self._json("PATCH", f"{self._base}/settings", changes)

    def export(self, fmt):
        r = self._request("GET", f"{self._base}/export?format={fmt}")
        self._check(r)
        return r.text

    def close(self):
        self.c.close()
