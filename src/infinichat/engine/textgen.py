"""Text streaming over the engine's token loop: whole UTF-8 characters only, and stop strings."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from infinichat.engine.base import Engine, Step
from infinichat.engine.detok import StopMatcher, StreamDecoder
from infinichat.engine.grammar import make_constraint
from infinichat.engine.sampling import SamplingParams
from infinichat.kv.sequence import KVSequence


@dataclass
class TextChunk:
    """New text (possibly empty while a character or a possible stop string is incomplete) and the step."""

    text: str
    step: Step | None  # None for the final flush


@dataclass
class Generation:
    """What a finished generation produced."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (EOS or a stop string) | "length" | "cancelled"
    stop_word: str | None = None  # the stop string that ended it, if one did


def stream_text(
    engine: Engine,
    tokenizer,
    cache: KVSequence,
    prompt: Sequence[int],
    params: SamplingParams,
    history: Sequence[int] = (),
    should_stop: Callable[[], bool] | None = None,
    result: Generation | None = None,
) -> Iterator[TextChunk]:
    """Yield text chunks as tokens are generated; fill `result` (tokens, text, finish reason) as it goes."""
    result = result if result is not None else Generation()
    decoder = StreamDecoder(tokenizer, skip_special=True, prefix_ids=list(prompt[-4:]))
    stops = StopMatcher(params.stop)
    n = 0
    breakers = (
        tokenizer.tokens_containing(params.dry_sequence_breakers)
        if params.dry_active and params.dry_sequence_breakers
        else None
    )
    constraint = make_constraint(params.grammar, tokenizer, engine.cfg.vocab_size)
    steps = engine.generate(
        cache, prompt, params, history=history, should_stop=should_stop, dry_breakers=breakers, constraint=constraint
    )
    for step in steps:
        n += 1
        result.tokens.append(step.token)
        text, hit = stops.push(decoder.push(step.token))
        result.text += text
        yield TextChunk(text, step)
        if hit:
            result.finish_reason, result.stop_word = "stop", stops.hit
            return
    tail, hit = stops.push(decoder.flush())
    tail += "" if hit else stops.flush()
    result.text += tail
    if should_stop is not None and should_stop():
        result.finish_reason = "cancelled"
    elif hit or (n < params.max_tokens and not cache.full):
        result.finish_reason, result.stop_word = "stop", stops.hit  # a stop string at the very end, or EOS
    if tail:
        yield TextChunk(tail, None)
