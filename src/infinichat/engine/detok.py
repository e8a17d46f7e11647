"""Streaming detokenization that never emits half a UTF-8 character, and stop strings.

StreamDecoder turns token ids into text one id at a time. Byte-level BPE decodes a character split
across tokens as '\\ufffd'; SentencePiece decoders drop the leading space of the first token they
see. So each step decodes a short window that starts a few tokens back, at a point where the text
was complete, and emits only what the window adds beyond the text already shown, minus any
trailing '\\ufffd' (it waits for the bytes that complete it). Nothing re-decodes the whole history.

StopMatcher cuts the text stream at the first stop string, holding back a tail that could still
become one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from infinichat.errors import InfinichatError

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4  # tokens of already-shown left context kept in the decode window
MAX_PENDING = 16  # tokens that may wait for a complete character before we look for a cut inside them


class TokenDecoder(Protocol):
    def decode(self, ids: list[int], skip_special: bool = False) -> str: ...


class StreamDecoder:
    """Incremental detokenizer for one generated sequence.

    prefix_ids: ids already shown before the first push (e.g. the prompt's last tokens); they are only
    decoded as left context, never returned.

    State: `_ids` is a window of token ids that starts where the text was complete; `_bounds` are the
    window positions where the decoded text ended on a whole character (the last one is everything
    fully shown); `_shown` counts characters of decode(_ids) already returned.
    """

    def __init__(self, tokenizer: TokenDecoder, skip_special: bool = True, prefix_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = [int(t) for t in prefix_ids[-2 * CONTEXT_TOKENS :]]  # a short tail is enough
        self._bounds: list[int] = [0, len(self._ids)] if self._ids else [0]
        self._shown = len(self._decode(self._ids))

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special=self._skip) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        complete = len(text.rstrip(REPLACEMENT))
        out = text[self._shown : complete] if complete > self._shown else ""
        self._shown = max(self._shown, complete)
        if complete == len(text):
            self._mark_boundary(len(self._ids), text)
        elif len(self._ids) - self._bounds[-1] > MAX_PENDING:
            out += self._recover()
        return out

    def flush(self) -> str:
        """Return whatever is left at the end of the sequence (may hold '\\ufffd' for broken bytes)."""
        text = self._decode(self._ids)
        out = text[self._shown :]
        self._shown = len(text)
        self._mark_boundary(len(self._ids), text)
        return out

    def _mark_boundary(self, k: int, text_to_k: str) -> None:
        """Record that decode(_ids[:k]) == text_to_k ends on a whole character; slide the window."""
        if k != self._bounds[-1]:
            self._bounds.append(k)
        starts = [b for b in self._bounds if k - b >= CONTEXT_TOKENS]
        start = starts[-1] if starts else self._bounds[0]
        if start == 0:
            return
        dropped = len(text_to_k) - len(self._decode(self._ids[start:k]))  # chars before the new start
        self._ids = self._ids[start:]
        self._bounds = [b - start for b in self._bounds if b >= start]
        self._shown -= dropped

    def _recover(self) -> str:
        """Many tokens without a whole character at the end: find the last cut that is whole, or give up
        on these bytes (they are not valid UTF-8) and emit them with replacement characters."""
        for k in range(len(self._ids) - 1, self._bounds[-1], -1):
            text = self._decode(self._ids[:k])
            if not text.endswith(REPLACEMENT):
                self._mark_boundary(k, text)
                return ""
        log.warning("%d tokens decode to invalid UTF-8; emitting replacement characters", MAX_PENDING)
        return self.flush()


class StopMatcher:
    """Cuts a text stream before the first occurrence of any stop string.

    push() returns the text that is safe to show and whether a stop string was hit; a tail that could
    still become a stop string is held back until it is decided. The shown text always equals what a
    search of the whole text would give: everything before the earliest stop string. After a hit,
    everything is dropped.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = (stops,)
        bad = [s for s in stops if not isinstance(s, str) or not s]
        if bad:
            raise InfinichatError(f"stop strings must be non-empty strings, got {bad!r}")
        self.stops: tuple[str, ...] = tuple(stops)
        self.hit: str | None = None  # the stop string that ended the stream, if any
        self._held = ""
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1

    @property
    def stopped(self) -> bool:
        return self.hit is not None

    def push(self, text: str) -> tuple[str, bool]:
        if self.hit is not None:
            return "", True
        out = self._scan(self._held + text, final=False)
        return out, self.hit is not None

    def flush(self) -> str:
        """At the end of the stream: release the held tail, cut at a stop string if it holds one."""
        if self.hit is not None:
            return ""
        return self._scan(self._held, final=True)

    def _scan(self, buf: str, final: bool) -> str:
        first, hit = len(buf), None
        for s in self.stops:
            i = buf.find(s, 0, first + len(s) - 1)  # only matches starting before the best so far
            if i >= 0 and i < first:
                first, hit = i, s
        # a proper prefix of a stop string running to the end of buf, starting before `first`
        partial = first if final else self._partial_start(buf, first)
        if partial < first:
            self._held = buf[partial:]
            return buf[:partial]
        self._held = ""
        self.hit = hit
        return buf[:first]

    def _partial_start(self, buf: str, limit: int) -> int:
        """Earliest j < limit such that buf[j:] could still grow into a stop string; limit if none."""
        for j in range(max(0, len(buf) - self._max_hold), limit):
            tail = buf[j:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return j
        return limit
