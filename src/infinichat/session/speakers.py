"""Where a drafted suggestion or a narration should end: at a paragraph end, or where another speaker
starts a line ("Sylvia: ..."), as small models run on and write everybody's lines."""

from __future__ import annotations

import re

# a line that starts with a short name and a colon: "Sylvia:", "Captain Mira:", "*Bob*:"
_SPEAKER = re.compile(r"\n[ \t*_]*([A-Z][\w'.-]*(?: [A-Z][\w'.-]*){0,3})[*_]*[ \t]*:")


def speaker_cut(text: str, own: tuple[str, ...] = ()) -> int | None:
    """The index at which `text` should end (a paragraph end after some text, or a new line started by a
    speaker not in `own`), or None while it may go on. Leading blank lines are no paragraph end."""
    body = len(text) - len(text.lstrip())
    para = text.find("\n\n", body)
    cut = para if para > body else None
    for m in _SPEAKER.finditer(text):
        if m.start() < body:
            continue
        if m.group(1).lower() not in {o.lower() for o in own}:
            cut = m.start() if cut is None else min(cut, m.start())
            break
    return cut
