"""Filler text for the long-context retrieval tasks: sentence streams, all seeded, none downloaded.

- `passkey_filler`: the classic repeated "The grass is green. The sky is blue. ..." of the passkey test
  (Mohtashami & Jaggi 2023, https://arxiv.org/abs/2305.16300).
- `essay_filler`: varied essay-like prose generated from sentence templates and word lists written here
  (RULER, https://arxiv.org/abs/2404.06654, uses Paul Graham's essays; we generate instead). It holds no
  digits, so a number in the model's answer can only come from a needle.
- `file_filler`: the sentences of a user's text file (`--haystack FILE`), cycled, from a seeded start.

Every filler is an endless iterator of sentences; `random_key` makes the "adjective-noun" keys of the
needle-in-a-haystack questions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Set
from itertools import cycle
from pathlib import Path

from infinichat.errors import InfinichatError

PASSKEY_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_ADJ = (
    "quiet",
    "ancient",
    "bright",
    "hollow",
    "gentle",
    "restless",
    "narrow",
    "golden",
    "silver",
    "distant",
    "humble",
    "curious",
    "patient",
    "crooked",
    "sturdy",
    "fragile",
    "hidden",
    "open",
    "early",
    "weathered",
    "crowded",
    "lonely",
    "careful",
    "stubborn",
    "simple",
    "tangled",
    "steady",
    "modest",
    "clever",
    "wooden",
)
_NOUN = (
    "harbor",
    "village",
    "river",
    "library",
    "garden",
    "engine",
    "market",
    "lantern",
    "orchard",
    "bridge",
    "workshop",
    "mountain",
    "archive",
    "kitchen",
    "meadow",
    "tower",
    "valley",
    "school",
    "theater",
    "forest",
    "factory",
    "island",
    "letter",
    "painter",
    "farmer",
    "sailor",
    "teacher",
    "merchant",
    "student",
    "baker",
)
_PLURAL = (
    "people",
    "founders",
    "writers",
    "engineers",
    "investors",
    "students",
    "painters",
    "farmers",
    "builders",
    "teachers",
    "programmers",
    "critics",
    "neighbors",
    "travelers",
    "startups",
    "companies",
    "schools",
    "cities",
)
_VERB = (
    "admire",
    "ignore",
    "study",
    "rebuild",
    "question",
    "protect",
    "imitate",
    "describe",
    "explore",
    "remember",
    "measure",
    "improve",
    "trust",
    "notice",
    "sell",
    "design",
)
_ABSTRACT = (
    "ambition",
    "curiosity",
    "patience",
    "taste",
    "judgment",
    "habit",
    "luck",
    "effort",
    "doubt",
    "attention",
    "wealth",
    "fashion",
    "discipline",
    "ignorance",
    "originality",
    "honesty",
    "momentum",
    "leverage",
)
_TEMPLATES = (
    "Most {pl} {v} the {a} {n} without asking why.",
    "A {a} {n} can teach more than a {a2} {n2} ever could.",
    "What surprised me was how much {ab} mattered to the {pl}.",
    "If you want to understand {ab}, look at how {pl} {v} a {a} {n}.",
    "The {n} near the {n2} was {a}, and nobody seemed to mind.",
    "It is easy to confuse {ab} with {ab2}, but they are not the same thing.",
    "Over time the {pl} learned to {v} their own {ab}.",
    "There is a {a} kind of {ab} that only comes from working on a {n}.",
    "When the {n} became {a}, the {pl} started to {v} it.",
    "I used to think {ab} was rare; now I think it is merely {a}.",
    "The best {pl} I know {v} {ab} the way others {v2} {ab2}.",
    "Nobody plans to build a {a} {n}; it happens one small step at a time.",
    "In a {a} {n}, {ab} spreads faster than {ab2}.",
    "Some {pl} never {v} anything, and they are often the most {a}.",
    "The {a} answer is usually the one the {pl} overlook.",
    "Every {n} has a {a} corner where {ab} grows unnoticed.",
    "You can tell a lot about {pl} from how they treat {ab}.",
    "The lesson of the {n} is that {ab} compounds.",
)


WORD_LISTS = (_ADJ, _NOUN, _PLURAL, _VERB, _ABSTRACT)  # the filler's vocabulary (RULER's common-words task)


def passkey_filler(rng: random.Random) -> Iterator[str]:
    """The classic filler, starting at a seeded sentence of its five-sentence block."""
    start = rng.randrange(len(PASSKEY_SENTENCES))
    block = PASSKEY_SENTENCES[start:] + PASSKEY_SENTENCES[:start]
    return cycle(block)


def essay_filler(rng: random.Random) -> Iterator[str]:
    """Endless varied essay-like sentences (no digits)."""
    while True:
        template = rng.choice(_TEMPLATES)
        yield template.format(
            a=rng.choice(_ADJ),
            a2=rng.choice(_ADJ),
            n=rng.choice(_NOUN),
            n2=rng.choice(_NOUN),
            pl=rng.choice(_PLURAL),
            v=rng.choice(_VERB),
            v2=rng.choice(_VERB),
            ab=rng.choice(_ABSTRACT),
            ab2=rng.choice(_ABSTRACT),
        )


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def read_sentences(path: str | Path) -> list[str]:
    """The sentences of a UTF-8 text file (cut after . ! ? followed by white space), white space folded."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise InfinichatError(f"cannot read --haystack {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InfinichatError(f"--haystack {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    sentences = [" ".join(s.split()) for s in _SENTENCE_END.split(text)]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise InfinichatError(f"--haystack {path} holds no text; give a file of prose (UTF-8)")
    return sentences


def file_filler(sentences: list[str], rng: random.Random) -> Iterator[str]:
    """The file's sentences, cycled, from a seeded starting sentence."""
    start = rng.randrange(len(sentences))
    return cycle(sentences[start:] + sentences[:start])


def random_key(rng: random.Random, taken: Set[str] = frozenset()) -> str:
    """An 'adjective-noun' key not in `taken`."""
    if len(taken) >= len(_ADJ) * len(_NOUN):
        raise ValueError(f"all {len(_ADJ) * len(_NOUN)} keys are taken")
    while True:
        key = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
        if key not in taken:
            return key


def random_number(rng: random.Random, digits: int, taken: Set[str] = frozenset()) -> str:
    """A `digits`-digit number (no leading zero) not in `taken`."""
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in taken:
            return value
