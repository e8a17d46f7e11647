"""Where the benchmarks find their text: the developers' copy of Moby Dick, `shared/data/moby_dick.txt` in a
folder above this checkout (so one copy serves the main checkout and every worktree beside it)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXCERPT = REPO / "tests" / "data" / "moby_dick_loomings.txt"  # ~800 tokens, in every checkout


def shared_moby() -> Path:
    """The first `shared/data/moby_dick.txt` in a folder above the checkout; where none is, the path beside the
    checkout (absent: each benchmark says what it falls back to)."""
    for folder in REPO.parents:
        if (folder / "shared" / "data" / "moby_dick.txt").is_file():
            return folder / "shared" / "data" / "moby_dick.txt"
    return REPO.parent / "shared" / "data" / "moby_dick.txt"
