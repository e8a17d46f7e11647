"""Synthetic retrieval prompts: passkey retrieval and RULER-style needle-in-a-haystack, built in token ids.

- passkey (Mohtashami & Jaggi 2023, https://arxiv.org/abs/2305.16300): a 5-digit key hidden in the
  repeated "The grass is green. ..." filler.
- niah (RULER, Hsieh et al. 2024, https://arxiv.org/abs/2404.06654): "One of the special magic numbers for
  {key} is: {value}." in essay-like filler (or `--haystack FILE`). Variants: `single` (one needle, a
  5-digit value), `multikey` (the asked needle plus `n_keys - 1` distractor needles with other keys and
  other values), `value7` (one needle, a 7-digit value).

Layout: instruction, haystack (filler sentences with the needle(s) between sentences), question at the
END (so question-aware compression such as SnapKV sees it), all inside the prompt format (the chat
template's user message, or plain text, which then ends with an answer prefix). `length` counts every
prompt token (template included) and is hit exactly: the filler is cut to the token. `depth` = the
fraction of the haystack before the needle; the needle goes to the sentence boundary nearest to it.
Everything is seeded by (seed, task, variant, length, depth, sample index).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from infinichat.errors import InfinichatError
from infinichat.eval import haystack
from infinichat.eval.prompt import PromptFormat, encode_text
from infinichat.model.tokenizer import Tokenizer

VARIANTS = ("single", "multikey", "value7")
MIN_FILLER = 16  # tokens of filler a prompt must at least hold

PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."
PASSKEY_QUESTION = "What is the pass key? Answer with the number only."
PASSKEY_ANSWER_PREFIX = " The pass key is"  # plain-text prompts only

NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text? Answer with the number only."
)
NIAH_ANSWER_PREFIX = " The special magic number for {key} mentioned in the provided text is"


@dataclass
class NeedleSample:
    """One prompt. Token spans are [start, end) slots of `ids`."""

    task: str
    variant: str
    length: int
    depth: float
    index: int
    ids: list[int]
    answer: str
    key: str
    needle_span: tuple[int, int]
    haystack_span: tuple[int, int]
    distractors: list[str] = field(default_factory=list)  # values of the distractor needles
    n_needle_tokens: int = 0  # all needles
    n_needle_tokens_before: int = 0  # distractor needles placed before the answer needle

    @property
    def needle_depth(self) -> float:
        """Where the needle really sits: haystack tokens before it / haystack tokens (needles excluded)."""
        hay = self.haystack_span[1] - self.haystack_span[0] - self.n_needle_tokens
        before = self.needle_span[0] - self.haystack_span[0] - self.n_needle_tokens_before
        return before / hay if hay else 0.0


def contains_number(text: str, value: str) -> bool:
    """True when `value` appears in `text` as a whole number (not inside a longer digit run)."""
    return re.search(rf"(?<!\d){re.escape(value)}(?!\d)", text) is not None


MAX_LENGTH = 1 << 24  # tokens of one prompt: beyond it, building the prompts alone exhausts the memory
MAX_SAMPLES = 10_000  # per cell: every sample's prompt is built before the first one runs


def check_lengths(lengths: list[int]) -> None:
    bad = [n for n in lengths if n < 1]
    if bad:
        raise InfinichatError(f"--lengths must be positive token counts, got {bad[0]}")
    bad = [n for n in lengths if n > MAX_LENGTH]
    if bad:
        raise InfinichatError(f"--lengths: {bad[0]} tokens is too long; at most {MAX_LENGTH} tokens")


def check_samples(samples: int) -> None:
    if not 1 <= samples <= MAX_SAMPLES:
        raise InfinichatError(f"--samples must be from 1 to {MAX_SAMPLES}, got {samples}")


def check_depths(depths: list[float]) -> None:
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise InfinichatError(f"--depths must be fractions in [0, 1] (0 = start of the haystack), got {bad[0]:g}")


MAX_KEYS = 100  # needles of the multikey variant: their keys are drawn without repeats from 900


def check_n_keys(n_keys: int) -> None:
    if not 2 <= n_keys <= MAX_KEYS:
        raise InfinichatError(
            f"--n-keys must be from 2 to {MAX_KEYS} for the multikey variant (one asked, others distract), got {n_keys}"
        )


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise InfinichatError(f"unknown --variant {variant!r}; accepted: {', '.join(VARIANTS)}")


def _rng(seed: int, task: str, variant: str, length: int, depth: float, index: int) -> random.Random:
    return random.Random(f"{seed}:{task}:{variant}:{length}:{depth:.6f}:{index}")  # str seeds are stable


@dataclass
class _Needle:
    ids: list[int]
    value: str
    answer: bool


def _fill(sentences: Iterator[str], tok: Tokenizer, n: int) -> tuple[list[int], list[int]]:
    """Filler ids of exactly `n` tokens and the sentence starts in them (the last sentence may be cut)."""
    ids: list[int] = []
    starts: list[int] = []
    while len(ids) < n:
        starts.append(len(ids))
        ids.extend(encode_text(tok, " " + next(sentences)))
    return ids[:n], [*starts, n]


def spread_depth(index: int, n_samples: int) -> float:
    """The needle depth of sample `index` of `n_samples`: the middle of its n-th of the context (`eval ruler`'s
    needles, `eval multiturn`'s first fact: a few samples cover the start, the middle and the end)."""
    if not 0 <= index < n_samples:
        raise InfinichatError(f"sample index {index} is outside 0..{n_samples - 1}")
    return (index + 0.5) / n_samples


def build_prompt(
    tok: Tokenizer,
    fmt: PromptFormat,
    *,
    task: str,
    variant: str,
    length: int,
    depth: float,
    index: int,
    instruction: str,
    question: str,
    answer_prefix: str,
    needles: list[tuple[str, str, bool]],  # (text, value, is the answer)
    key: str,
    filler: Iterator[str],
    rng: random.Random,
    ordered: bool = False,
) -> NeedleSample:
    """Instruction + haystack (filler with the needles) + question, exactly `length` tokens. `ordered`: the
    needles go to seeded sentence boundaries in the order given (a chain of statements), not the answer at
    `depth`."""
    head = encode_text(tok, instruction + "\n\n")
    tail = encode_text(tok, "\n\n" + question + ("" if fmt.chat else answer_prefix))
    items = [_Needle(encode_text(tok, " " + text), value, is_answer) for text, value, is_answer in needles]
    fixed = fmt.overhead + len(head) + len(tail) + sum(len(x.ids) for x in items)
    n_fill = length - fixed
    if n_fill < MIN_FILLER:
        raise InfinichatError(
            f"--lengths {length} is too short for the {task} prompt: it needs at least {fixed + MIN_FILLER} tokens "
            f"with this model and prompt format"
        )
    fill, bounds = _fill(filler, tok, n_fill)
    target = depth * n_fill
    answer_at = min(bounds, key=lambda b: (abs(b - target), b))
    # distractors at seeded sentence boundaries (never exactly where the answer goes, when there is a choice)
    others = [b for b in bounds if b != answer_at] or bounds
    if ordered:
        spots = sorted(
            rng.sample(bounds, len(items)) if len(bounds) >= len(items) else rng.choices(bounds, k=len(items))
        )
        placed = [(at, float(i), x) for i, (at, x) in enumerate(zip(spots, items, strict=True))]
    else:
        placed = [(answer_at, 0, x) if x.answer else (rng.choice(others), rng.random(), x) for x in items]
        placed.sort(key=lambda p: (p[0], p[1]))

    content: list[int] = list(head)
    needle_span = (0, 0)
    n_before = 0
    prev = 0
    for at, _, x in placed:
        content += fill[prev:at]
        prev = at
        start = len(fmt.prefix) + len(content)
        content += x.ids
        if x.answer:
            needle_span = (start, start + len(x.ids))
        elif needle_span == (0, 0):
            n_before += len(x.ids)
    content += fill[prev:]
    hay_start = len(fmt.prefix) + len(head)
    hay_end = len(fmt.prefix) + len(content)
    content += tail
    ids = fmt.ids(content)
    assert len(ids) == length, (len(ids), length)
    answer = next(x.value for x in items if x.answer)
    return NeedleSample(
        task=task,
        variant=variant,
        length=length,
        depth=depth,
        index=index,
        ids=ids,
        answer=answer,
        key=key,
        needle_span=needle_span,
        haystack_span=(hay_start, hay_end),
        distractors=[x.value for x in items if not x.answer],
        n_needle_tokens=sum(len(x.ids) for x in items),
        n_needle_tokens_before=n_before,
    )


def passkey_sample(
    tok: Tokenizer, fmt: PromptFormat, length: int, depth: float, index: int, seed: int = 0
) -> NeedleSample:
    rng = _rng(seed, "passkey", "single", length, depth, index)
    value = haystack.random_number(rng, 5)
    return build_prompt(
        tok,
        fmt,
        task="passkey",
        variant="single",
        length=length,
        depth=depth,
        index=index,
        instruction=PASSKEY_INSTRUCTION,
        question=PASSKEY_QUESTION,
        answer_prefix=PASSKEY_ANSWER_PREFIX,
        needles=[(PASSKEY_NEEDLE.format(value=value), value, True)],
        key="",
        filler=haystack.passkey_filler(rng),
        rng=rng,
    )


def niah_sample(
    tok: Tokenizer,
    fmt: PromptFormat,
    length: int,
    depth: float,
    index: int,
    seed: int = 0,
    variant: str = "single",
    n_keys: int = 4,
    sentences: list[str] | None = None,
) -> NeedleSample:
    """`sentences`: the haystack file's sentences (None: generated essay-like filler)."""
    check_variant(variant)
    if variant == "multikey":
        check_n_keys(n_keys)
    rng = _rng(seed, "niah", variant, length, depth, index)
    digits = 7 if variant == "value7" else 5
    n = n_keys if variant == "multikey" else 1
    keys: list[str] = []
    values: list[str] = []
    for _ in range(n):
        keys.append(haystack.random_key(rng, set(keys)))
        values.append(haystack.random_number(rng, digits, set(values)))
    needles = [
        (NIAH_NEEDLE.format(key=k, value=v), v, i == 0) for i, (k, v) in enumerate(zip(keys, values, strict=True))
    ]
    filler = haystack.essay_filler(rng) if sentences is None else haystack.file_filler(sentences, rng)
    return build_prompt(
        tok,
        fmt,
        task="niah",
        variant=variant,
        length=length,
        depth=depth,
        index=index,
        instruction=NIAH_INSTRUCTION,
        question=NIAH_QUESTION.format(key=keys[0]),
        answer_prefix=NIAH_ANSWER_PREFIX.format(key=keys[0]),
        needles=needles,
        key=keys[0],
        filler=filler,
        rng=rng,
    )
