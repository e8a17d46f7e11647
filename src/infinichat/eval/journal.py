"""Results written as they come: `<stem>.jsonl` in the output folder, one line per finished record.

A long evaluation (`eval ruler`, `eval multiturn`, `eval passkey` / `niah`) runs for hours; its reports are
rebuilt from the records, so a run cut at any point keeps every record it finished. The file's first line holds
the run's settings (those that change a record: model, seed, lengths, samples, ...); each later line is one
record, appended and flushed (fsync) as soon as it is scored. `--resume` reopens the file: the settings must be
those of the command (else one clear error, and nothing changes), the records already there are skipped, and a
last line cut in the middle of its writing is dropped. Each record read back must hold the fields the reports
read, of their types (else one clear error naming the line). One run at a time writes into a folder: a lock
(`.<stem>.lock`, released by the kernel when the process ends, however it ends) refuses a second one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from infinichat.errors import InfinichatError

log = logging.getLogger(__name__)

VERSION = 1

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked against each other
    fcntl = None  # type: ignore[assignment]

NUMBER = (int, float)
# the fields every record of a generation holds (runner.Generation.to_json) and the reports read
GENERATION: dict[str, type | tuple[type, ...]] = {
    "output": str,
    "generated": int,
    "prompt_tokens": int,
    "kept": int,
    "n_evictions": int,
    "prefill_s": NUMBER,
    "decode_s": NUMBER,
}


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
        self,
        path: Path,
        key_fields: Sequence[str],
        records: list[dict[str, Any]],
        head: dict[str, Any] | None = None,
        cut: int | None = None,
    ) -> None:
        self.path = path
        self.key_fields = tuple(key_fields)
        self.records = records  # every record in the file, in file order
        self._keys = {self.key(r) for r in records}
        self._head = head  # a new run's settings line, written by `begin` (once the model has loaded)
        self._cut = cut  # a resumed file's length without its cut last line, cut by `begin`
        self._lock: Any = None  # the open lock file while this run holds the folder

    # ------------------------------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        out_dir: Path,
        stem: str,
        settings: dict[str, Any],
        key_fields: Sequence[str],
        resume: bool,
        fields: Mapping[str, type | tuple[type, ...]] | None = None,
    ) -> Journal:
        """The journal of `out_dir`: new (refused if the folder already holds results of a run, unless `resume`),
        or, with `resume`, the one there, whose settings must equal `settings` and whose records must hold
        `fields` (name -> accepted types) besides `key_fields`. Nothing is written before `begin`; a folder another
        run writes into, one that cannot be written, or an --out that is a file are refused here, before the model
        loads."""
        path = out_dir / f"{stem}.jsonl"
        _check_writable(out_dir)
        settings = _normal(settings)
        journal = cls(path, key_fields, [])
        journal._take_lock()  # a folder that exists: locked now (else by `begin`, which creates it)
        try:
            head: dict[str, Any] | None = None
            records: list[dict[str, Any]] = []
            cut = None
            if path.is_file():
                head, records, cut = cls._read(path, stem, key_fields, fields or {})
            if head is not None and not resume and records:
                raise InfinichatError(
                    f"{path} already holds {len(records)} record(s) of an earlier run: add --resume to complete "
                    "it, or give another --out"
                )
            if head is not None and resume:
                cls._check(path, head["settings"], settings)
                log.info("resuming %s: %d record(s) already there", path, len(records))
                journal.records = records
                journal._keys = {journal.key(r) for r in records}
                journal._cut = cut
                return journal
            if resume:
                log.warning("--resume: %s holds no earlier run; starting one", path)
            journal._head = {"journal": VERSION, "task": stem, "settings": settings}
            return journal
        except BaseException:
            journal.close()
            raise

    def _take_lock(self) -> None:
        """Hold `.<stem>.lock` in the folder (if it exists) for as long as this process runs; another process
        holding it is refused. POSIX record locks are the process's: the same process opening again is not
        refused (a library caller, the tests)."""
        if fcntl is None or self._lock is not None or not self.path.parent.is_dir():
            return
        lock_path = self.path.parent / f".{self.path.stem}.lock"
        try:
            f = lock_path.open("a+")
        except OSError as e:
            raise InfinichatError(f"cannot write the results into {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise InfinichatError(
                f"another run is writing into {self.path.parent} now (it holds {lock_path}); wait for it to end, "
                "or give another --out"
            ) from None
        self._lock = f

    def close(self) -> None:
        """Let the folder go (a run's process ending does it too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def begin(self) -> None:
        """Start writing: the folder is made and locked; a new run's settings line starts the file, a resumed one
        loses its cut last line."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InfinichatError(f"cannot write the results into {self.path.parent}: {e.strerror or e}") from None
        self._take_lock()
        if self._cut is not None:
            log.warning("%s: dropping its last line, cut in the middle of its writing", self.path)
            try:
                with self.path.open("r+b") as f:
                    f.truncate(self._cut)
            except OSError as e:
                raise InfinichatError(f"cannot repair {self.path}: {e.strerror or e}") from None
            self._cut = None
        if self._head is None:
            return
        if self.path.is_file():  # a run that began there while this one was loading its model
            _, records, _ = self._read(self.path, self._head["task"], self.key_fields, {})
            if records:
                raise InfinichatError(
                    f"{self.path} now holds {len(records)} record(s) of another run, started there while this one "
                    "loaded: give another --out"
                )
        try:
            write_text_atomic(self.path, json.dumps(self._head) + "\n")
        except OSError as e:
            raise InfinichatError(f"cannot write the results into {self.path.parent}: {e.strerror or e}") from None
        self._head = None

    @staticmethod
    def _read(
        path: Path, stem: str, key_fields: Sequence[str], fields: Mapping[str, type | tuple[type, ...]]
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int | None]:
        """(the settings line, the records, the length without a last line cut mid-write, if it has one) of
        `path`. Nothing is changed: the cut line goes when the run begins."""
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
            if i > 0:
                _check_record(path, i + 1, row, key_fields, fields)
            rows.append(row)
        cut = len(raw) - len(lines[-1]) if lines[-1].strip() else None  # a record cut mid-write: it runs again
        if not rows:
            return None, [], cut
        head = rows[0]
        if "journal" not in head or not isinstance(head.get("settings"), dict):
            raise InfinichatError(f"{path}, line 1: not the settings line of an infinichat results file")
        if head["journal"] != VERSION or head.get("task") != stem:
            raise InfinichatError(
                f"{path}, line 1: the results of {json.dumps(head.get('task'))} (file version "
                f"{json.dumps(head['journal'])}), not of {stem} (version {VERSION}); give another --out"
            )
        return head, rows[1:], cut

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
        self._cut = None  # rewritten whole: a cut last line is gone with the rest

    def ordered(self, keys: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """The records whose key is in `keys`, in the order of `keys` (then file order): the report of a resumed
        run lists them as an uncut run would."""
        rank = {tuple(_normal(list(k))): i for i, k in enumerate(keys)}
        mine = [r for r in self.records if self.key(r) in rank]
        return sorted(mine, key=lambda r: rank[self.key(r)])


def _check_writable(out_dir: Path) -> None:
    """--out must be a folder this process can write into, or one it can make."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InfinichatError(f"--out {out_dir} is a file; give a folder (made if missing)")
    up = out_dir
    while not up.exists() and up.parent != up:
        up = up.parent
    if not up.is_dir():
        raise InfinichatError(f"--out {out_dir}: {up} is a file, not a folder; give a folder (made if missing)")
    if not os.access(up, os.W_OK | os.X_OK):
        raise InfinichatError(f"--out {out_dir}: cannot write into {up} (permission denied); give another folder")


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _check_record(
    path: Path, line: int, row: dict[str, Any], key_fields: Sequence[str], fields: Mapping[str, type | tuple[type, ...]]
) -> None:
    """A record read back holds its key and the fields the reports read, of the types they read."""
    for name in key_fields:
        if name not in row:
            raise InfinichatError(f"{path}, line {line}: a record without its {name!r}; the file is damaged")
    for name, types in fields.items():
        value = row.get(name)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _tuple(types))
        if not ok or (isinstance(value, float) and value != value):
            got = "missing" if name not in row else f"{json.dumps(value)[:40]}"
            raise InfinichatError(
                f"{path}, line {line}: {name!r} is {got}, a record holds {_type_names(types)} there; the file is "
                "damaged"
            )


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)
