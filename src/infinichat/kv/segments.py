"""Segments: named spans of a sequence's cache slots (the "venv" idea of role-play chat, made general).

Plain-Python bookkeeping over slot indices, with no tensors, so the torch KV store and the llama.cpp
backend (which edits its cache through `llama_memory_seq_rm` / `seq_add`) share it. The owner of the
tensor store tells the map what happened (`on_append`, `on_truncate`, `on_remove`); the map answers
which slot spans a segment operation touches.

Invariants: segments are disjoint and in slot order; slots outside every segment are untagged (id -1);
at most one segment is open (it receives appended tokens), it is the last one and ends at the cache
length; every closed segment holds at least one slot (one that loses all its tokens is dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from infinichat.errors import InfinichatError

KINDS = ("system", "user", "assistant", "narration", "rag", "lore", "scratch")
UNTAGGED = -1


@dataclass
class Segment:
    id: int
    kind: str
    name: str
    start: int  # first slot
    end: int  # one past the last slot
    pinned: bool  # never evicted
    closed: bool = False

    def __len__(self) -> int:
        return self.end - self.start


def new_index(i: int, spans: Sequence[tuple[int, int]]) -> int:
    """Where slot boundary `i` lands after the (sorted, disjoint) slot spans are cut out."""
    removed = 0
    for s, e in spans:
        if s >= i:
            break
        removed += min(e, i) - s
    return i - removed


class SegmentMap:
    def __init__(self) -> None:
        self.segments: list[Segment] = []  # in slot order
        self.next_id = 1

    # ------------------------------------------------------------------ queries
    @property
    def open(self) -> Segment | None:
        last = self.segments[-1] if self.segments else None
        return last if last is not None and not last.closed else None

    def get(self, seg_id: int) -> Segment:
        for s in self.segments:
            if s.id == seg_id:
                return s
        have = ", ".join(f"{s.id} ({s.kind})" for s in self.segments) or "none"
        raise InfinichatError(f"no segment {seg_id} in this sequence; segments: {have}")

    def pinned_spans(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.segments if s.pinned and s.end > s.start]

    def boundaries(self) -> list[int]:
        """Slots where a segment starts (good places to cut when evicting)."""
        return [s.start for s in self.segments]

    def tags(self, length: int) -> list[int]:
        """The segment id of every slot in [0, length) (-1 for untagged slots)."""
        out = [UNTAGGED] * length
        for s in self.segments:
            out[s.start : s.end] = [s.id] * len(s)
        return out

    # ------------------------------------------------------------------ segment operations
    def create(self, kind: str, name: str, at: int, pinned: bool | None = None) -> Segment:
        """Open a new segment at slot `at` (the cache length); the open one, if any, is closed first."""
        if kind not in KINDS:
            raise InfinichatError(f"unknown segment kind {kind!r}; accepted: {', '.join(KINDS)}")
        self.close()
        seg = Segment(self.next_id, kind, name or kind, at, at, kind == "system" if pinned is None else pinned)
        self.next_id += 1
        self.segments.append(seg)
        return seg

    def close(self) -> None:
        """Close the open segment; later tokens are untagged until a new one is created."""
        seg = self.open
        if seg is None:
            return
        if len(seg) == 0:
            self.segments.pop()  # an empty segment never outlives being open
        else:
            seg.closed = True

    def reopen(self, seg_id: int, length: int) -> Segment:
        """Make the last segment open again (it must end at the cache `length`), e.g. to continue a reply."""
        seg = self.get(seg_id)
        if seg is not self.segments[-1] or seg.end != length:
            raise InfinichatError(
                f"segment {seg_id} ({seg.kind}) cannot be reopened: only the last segment, ending at the "
                f"cache length {length}, can receive more tokens"
            )
        seg.closed = False
        return seg

    def merge(self, seg_id: int) -> Segment:
        """Fold a closed segment into the pinned segment directly before it (or pin it if it starts at 0).
        Returns the pinned segment that now holds its slots."""
        seg = self.get(seg_id)
        if not seg.closed:
            raise InfinichatError(f"segment {seg_id} ({seg.kind}) is still open: close it before merging it")
        if seg.pinned:
            return seg
        if seg.start == 0:
            seg.pinned = True
            return seg
        i = self.segments.index(seg)
        prev = self.segments[i - 1] if i > 0 else None
        if prev is None or prev.end != seg.start or not prev.pinned:
            what = "untagged tokens" if prev is None or prev.end != seg.start else f"segment {prev.id} ({prev.kind})"
            raise InfinichatError(
                f"segment {seg_id} ({seg.kind}) cannot merge into the pinned base: it must directly follow a "
                f"pinned segment, but slot {seg.start - 1} before it holds {what}; remove or merge those first"
            )
        prev.end = seg.end
        self.segments.pop(i)
        return prev

    def cut(self, seg_id: int) -> tuple[int, int]:
        """`remove`: the slot span to cut out. A closed segment is forgotten; the open one stays, emptied
        (it keeps receiving tokens). Call `on_remove` with the span once the slots are gone."""
        seg = self.get(seg_id)
        span = (seg.start, seg.end)
        if seg.closed:
            self.segments.remove(seg)
        else:
            seg.start = seg.end
        return span

    def drop_from(self, seg_id: int) -> int:
        """`revert_to`: forget the segment and every later one; returns the slot to truncate the cache to."""
        seg = self.get(seg_id)
        i = self.segments.index(seg)
        del self.segments[i:]
        return seg.start

    # ------------------------------------------------------------------ what happened to the slots
    def on_append(self, start: int, n: int) -> None:
        seg = self.open
        if seg is not None:
            assert seg.end == start, "the open segment must end at the cache length"
            seg.end += n

    def on_truncate(self, n: int) -> None:
        """Slots >= n are gone. A segment survives if it keeps a slot, or is empty and starts at n."""
        keep = []
        for s in self.segments:
            if s.start < n or (s.start == n and len(s) == 0):
                s.end = min(s.end, n)
                keep.append(s)
        self.segments = keep

    def on_remove(self, spans: Sequence[tuple[int, int]]) -> None:
        """The (sorted, disjoint) slot spans were cut out and the rest compacted. A closed segment that
        lost all its slots is dropped; the open one stays (empty, at the end) and keeps receiving tokens."""
        keep = []
        for s in self.segments:
            s.start, s.end = new_index(s.start, spans), new_index(s.end, spans)
            if len(s) > 0 or not s.closed:
                keep.append(s)
        self.segments = keep

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        return {"next_id": self.next_id, "segments": [asdict(s) for s in self.segments]}

    @classmethod
    def from_json(cls, data: dict) -> SegmentMap:
        m = cls()
        m.next_id = int(data["next_id"])
        m.segments = [Segment(**s) for s in data["segments"]]
        return m
