"""The two ways the terminal chat reaches sessions, behind one interface: over HTTP (`--server URL`) or
in-process over a local SessionManager. Generating actions yield ("token", text) and then ("done", info)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from infinichat.errors import InfinichatError

if TYPE_CHECKING:
    from infinichat.session.datalock import DataDirLock
    from infinichat.session.session import Session

ACTIONS = ("send", "retry", "continue", "narrate", "suggest")


class ChatBackend(Protocol):
    name: str  # the model's name

    def open(self, sid: str, settings: dict, system_prompt: str | None) -> dict: ...
    def history(self) -> dict: ...
    def sessions(self) -> list[dict]: ...
    def act(self, action: str, params: dict, text: str | None = None) -> Iterator[tuple[str, object]]: ...
    def revert(self, turn: int) -> dict: ...
    def rag(self, text: str) -> dict: ...
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

    def open(self, sid, settings, system_prompt):
        exists = sid in self.m.sessions or self.m.db.exists(sid)
        self._s = self.m.get(sid) if exists else self.m.create(sid, system_prompt=system_prompt, settings=settings)
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
        fn = {"send": lambda: self.s.send(text, p), "continue": lambda: self.s.continue_(p)}.get(
            action, lambda: getattr(self.s, action)(p)
        )
        gen = fn()
        try:
            for ev in gen:
                if ev.kind == "token":
                    yield "token", ev.text
                else:
                    yield "done", {"turn": ev.turn, "finish_reason": ev.finish_reason, "text": ev.text}
        finally:
            gen.close()  # Ctrl-C: the partial reply is kept, marked cancelled

    def revert(self, turn):
        self.s.revert_to(turn)
        return self.s.history()

    def rag(self, text):
        self.s.inject_rag(text)
        return self.s.history()

    def close(self):
        try:
            self.m.close()
        finally:
            if self._lock is not None:
                self._lock.release()


class HttpBackend:
    def __init__(self, url: str, api_key: str | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.c = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30, read=600))
        self.sid = None
        try:
            self.name = self._json("GET", "/api/info")["model"]
        except httpx.HTTPError as e:
            raise InfinichatError(f"cannot reach the server at {url}: {e}") from None

    @staticmethod
    def _check(r) -> None:
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:200]
            raise InfinichatError(f"server answered {r.status_code}: {msg}")

    def _json(self, method: str, path: str, body: dict | None = None):
        r = self.c.request(method, path, json=body)
        self._check(r)
        return r.json() if r.content else None

    def open(self, sid, settings, system_prompt):
        self.sid = sid
        r = self.c.get(f"/api/sessions/{sid}")
        if r.status_code == 404:
            return self._json(
                "POST", "/api/sessions", {"id": sid, "system_prompt": system_prompt, "settings": settings}
            )
        self._check(r)
        return r.json()

    def history(self):
        return self._json("GET", f"/api/sessions/{self.sid}")

    def sessions(self):
        return self._json("GET", "/api/sessions")["sessions"]

    def act(self, action, params, text=None):
        path = f"/api/sessions/{self.sid}/" + ("messages" if action == "send" else action)
        body = {"params": params} | ({"text": text} if action == "send" else {})
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
        return self._json("POST", f"/api/sessions/{self.sid}/revert", {"turn": turn})

    def rag(self, text):
        return self._json("POST", f"/api/sessions/{self.sid}/rag", {"text": text})

    def close(self):
        self.c.close()
