"""Results written as they come: `<stem>.jsonl` in the output folder, one line per finished record.

A long evaluation (`eval ruler`, `eval multiturn`, `eval passkey` / `niah`) runs for hours; its reports are
rebuilt from the records, so a run cut at any point keeps every record it finished. The file's first line holds
the run's settings (those that change a record: model, seed, lengths, samples, ...); each later line is one
record, appended and flushed (fsync) as soon as it is scored. `--resume` reopens the file: the settings must be
those of the command (else one clear error, and nothing changes), the records already there are skipped, and a
last line cut in the middle of its writing is dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from infinichat.errors import InfinichatError

log = logging.getLogger(__name__)

VERSION = 1


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file and a rename: readers see the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _normal(value: Any) -> Any:
    """How a value reads back from JSON (tuples become lists), so settings compare as recorded."""
    return json.loads(json.dumps(value))


class Journal:
    """The records of one run in `<stem>.jsonl`, keyed by `key_fields` (e.g. policy, task, length, sample)."""

    def __init__(
        self, path: Path, key_fields: Sequence[str], records: list[dict[str, Any]], head: dict[str, Any] | None = None
    ) -> None:
        self.path = path
        self.key_fields = tuple(key_fields)
        self.records = records  # every record in the file, in file order
        self._keys = {self.key(r) for r in records}
        self._head = head  # a new run's settings line, written by `begin` (once the model has loaded)

    # ------------------------------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, out_dir: Path, stem: str, settings: dict[str, Any], key_fields: Sequence[str], resume: bool
    ) -> Journal:
        """The journal of `out_dir`: new (refused if the folder already holds results of a run, unless `resume`),
        or, with `resume`, the one there, whose settings must equal `settings`. Nothing is written before `begin`."""
        path = out_dir / f"{stem}.jsonl"
        settings = _normal(settings)
        head: dict[str, Any] | None = None
        records: list[dict[str, Any]] = []
        if path.is_file():
            head, records = cls._read(path)
        if head is not None and not resume and records:
            raise InfinichatError(
                f"{path} already holds {len(records)} record(s) of an earlier run: add --resume to complete it, "
                "or give another --out"
            )
        if head is not None and resume:
            cls._check(path, head.get("settings", {}), settings)
            log.info("resuming %s: %d record(s) already there", path, len(records))
            return cls(path, key_fields, records)
        if resume:
            log.warning("--resume: %s holds no earlier run; starting one", path)
        return cls(path, key_fields, [], {"journal": VERSION, "task": stem, "settings": settings})

    def begin(self) -> None:
        """A new run: its settings line starts the file (a resumed one: nothing to do)."""
        if self._head is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self._head) + "\n")
        except OSError as e:
            raise InfinichatError(f"cannot write the results into {self.path.parent}: {e.strerror or e}") from None
        self._head = None

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """(the settings line, the records) of `path`; a last line cut mid-write is dropped from the file."""
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise InfinichatError(f"cannot read {path}: {e.strerror or e}") from None
        lines = raw.split(b"\n")
        whole = len(lines) - 1  # the lines that end with a newline
        rows: list[dict[str, Any]] = []
        for i, line in enumerate(lines[:whole]):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise InfinichatError(f"{path}, line {i + 1}: not a JSON record; the file is damaged")
            rows.append(row)
        if lines[-1].strip():  # a record cut in the middle of its writing: it is run again
            log.warning("%s: dropping its last line, cut in the middle of its writing", path)
            try:
                with path.open("r+b") as f:
                    f.truncate(len(raw) - len(lines[-1]))
            except OSError as e:
                raise InfinichatError(f"cannot repair {path}: {e.strerror or e}") from None
        if not rows:
            return None, []
        if "journal" not in rows[0] or "settings" not in rows[0]:
            raise InfinichatError(f"{path}, line 1: not the settings line of an infinichat results file")
        return rows[0], rows[1:]

    @staticmethod
    def _check(path: Path, recorded: dict[str, Any], settings: dict[str, Any]) -> None:
        diff = [k for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k)]
        if diff:

            def show(d: dict[str, Any]) -> str:
                return ", ".join(f"{k}={json.dumps(d.get(k))}" for k in diff)

            raise InfinichatError(
                f"--resume: {path} was run with {show(recorded)}, this command has {show(settings)}; give the same "
                "settings, or another --out"
            )

    # ------------------------------------------------------------------------------------------ records

    def key(self, record: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(record.get(f) for f in self.key_fields)

    def has(self, *key: Any) -> bool:
        """Whether a record with this key (values of `key_fields`, in order) is in the file."""
        return tuple(_normal(list(key))) in self._keys

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append `records` (one write, flushed to the disk)."""
        self.begin()
        text = "".join(json.dumps(r) + "\n" for r in records)
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise InfinichatError(f"cannot append to {self.path}: {e.strerror or e}") from None
        loaded = [_normal(r) for r in records]
        self.records += loaded
        self._keys.update(self.key(r) for r in loaded)

    def discard(self, keys: Iterable[tuple[Any, ...]]) -> None:
        """Rewrite the file without the records of `keys` (a group left incomplete by a cut run)."""
        gone = {tuple(_normal(list(k))) for k in keys}
        if not gone:
            return
        head = self.path.read_text(encoding="utf-8").split("\n", 1)[0]
        self.records = [r for r in self.records if self.key(r) not in gone]
        self._keys -= gone
        try:
            write_text_atomic(self.path, head + "\n" + "".join(json.dumps(r) + "\n" for r in self.records))
        except OSError as e:
            raise InfinichatError(f"cannot rewrite {self.path}: {e.strerror or e}") from None

    def ordered(self, keys: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """The records whose key is in `keys`, in the order of `keys` (then file order): the report of a resumed
        run lists them as an uncut run would."""
        rank = {tuple(_normal(list(k))): i for i, k in enumerate(keys)}
        mine = [r for r in self.records if self.key(r) in rank]
        return sorted(mine, key=lambda r: rank[self.key(r)])
