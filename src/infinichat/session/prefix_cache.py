"""The evaluated KV of system prompts / character cards, on disk, keyed by (model, dtype, backend, token ids).

A new session (or a reset) with a card seen before restores its KV from a file instead of evaluating it.
Entries are KV snapshots (`KVSequence.snapshot()`), written atomically; the oldest entries are deleted when
the folder passes its size cap. A damaged entry is reported and evaluated again, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class PrefixCache:
    def __init__(self, folder: str | Path, model_id: str, max_bytes: int = 2 << 30):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model_id = model_id  # model file hash + dtype + backend: the KV depends on all three
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    def key(self, ids: list[int]) -> str:
        h = hashlib.sha256(self.model_id.encode())
        h.update(b"\0" + ",".join(map(str, ids)).encode())
        return h.hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.kv"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        os.utime(path)  # least recently used goes first
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError as e:
            log.warning("cannot write the prefix cache entry %s: %s", path, e)
            tmp.unlink(missing_ok=True)
            return
        self._trim()

    def _trim(self) -> None:
        entries = []
        for p in self.folder.glob("*.kv"):
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
