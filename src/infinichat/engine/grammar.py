"""Constrained decoding: a grammar decides which tokens may come next, and the sampler masks the others.

A `Grammar` names what the output must match: a JSON schema (`json_object` is the schema `{"type": "object"}`),
a Lark grammar, a GBNF grammar (llama.cpp's `grammar` field, converted to Lark) or a regular expression. It is
compiled by llguidance (https://github.com/guidance-ai/llguidance: the grammar engine llama.cpp builds with
LLAMA_LLGUIDANCE; picked over xgrammar and outlines-core by benchmarks/constrained_decoding.py: the cheapest
compile per request, a per-token mask within a fraction of a millisecond, and no dependencies) against the model's
vocabulary, given as the exact bytes of every token (`Tokenizer.token_bytes`), so it works for any tokenizer
the model layer reads, on every backend: the mask is applied inside `Sampler.sample`.

`GrammarConstraint` is the sampler's `TokenConstraint`: `allowed()` the (V,) bool mask of the next token (the
EOS tokens are in it once the grammar accepts), `accept(token)` advances it, `done` says the grammar can take
nothing more (the generation stops there, finish reason "stop").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from infinichat.errors import InfinichatError

GrammarKind = Literal["json_schema", "lark", "gbnf", "regex"]
KINDS: tuple[str, ...] = ("json_schema", "lark", "gbnf", "regex")
MAX_GRAMMAR_CHARS = 1 << 20
_LL_TOKENIZER_KEY = "llguidance"
# JSON is written as `{"a": 1, "b": [2, 3]}`: whitespace the grammar left free would let a weak model pad for ever
# (a schema's own "x-guidance" options override this)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(InfinichatError):
    """A grammar or schema that cannot be compiled (the message says why)."""


@dataclass(frozen=True)
class Grammar:
    """What the generated text must match. `source`: the JSON schema as JSON text, or the grammar's text."""

    kind: GrammarKind
    source: str

    @classmethod
    def json_schema(cls, schema: Any) -> Grammar:
        """From a schema given as a dict (or bool) or as JSON text."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> Grammar:
        return cls("json_schema", '{"type": "object"}')

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind {self.kind!r} is not supported; accepted: {', '.join(KINDS)}")
        if not isinstance(self.source, str) or not self.source.strip():
            raise GrammarError(f"the {self.kind} grammar is empty")
        if len(self.source) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the {self.kind} grammar is {len(self.source)} characters; at most {MAX_GRAMMAR_CHARS}")


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - llguidance is a runtime dependency
        raise InfinichatError(
            "constrained decoding (response_format, grammar, json_schema) needs the llguidance package: "
            "pip install llguidance==1.9.1"
        ) from None
    return llguidance


class _TokenSource:
    """What llguidance's TokenizerWrapper reads from a tokenizer: its tokens' bytes, EOS, specials, encode."""

    def __init__(self, tok) -> None:
        self.tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        eos = sorted(tok.eos_ids) or ([tok.eos_id] if tok.eos_id is not None else [])
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else (eos[0] if eos else 0)
        self.bos_token_id = tok.bos_id
        self.special_token_ids = [i for i in range(tok.vocab_size) if tok.is_special(i)]
        self._tok = tok

    def __call__(self, s: str | bytes) -> list[int]:
        text = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
        return self._tok.encode(text, parse_special=False)


def ll_tokenizer(tok):
    """The llguidance view of `tok` (built once per tokenizer: ~0.3 s for a 49k vocabulary)."""

    def build():
        llg = _llg()
        src = _TokenSource(tok)
        eos = sorted(tok.eos_ids) or [src.eos_token_id]
        return llg.LLTokenizer(llg.TokenizerWrapper(src), eos_token=eos)

    return tok.derived(_LL_TOKENIZER_KEY, build)


def grammar_text(g: Grammar) -> str:
    """The grammar in llguidance's input form (raises GrammarError for a schema that is not JSON)."""
    g.validate()
    llg = _llg()
    if g.kind == "json_schema":
        try:
            schema = json.loads(g.source)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema is an object (or true/false), got {type(schema).__name__}")
        try:
            return str(llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT))
        except ValueError as e:
            raise GrammarError(f"the JSON schema cannot be compiled: {e}") from None
    if g.kind == "gbnf":
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            return str(llg.LLMatcher.grammar_from_lark(gbnf_to_lark(g.source)))
        except Exception as e:  # the converter raises plain exceptions on syntax errors
            raise GrammarError(f"the GBNF grammar cannot be read: {e}") from None
    if g.kind == "lark":
        return str(llg.LLMatcher.grammar_from_lark(g.source))
    return str(llg.LLMatcher.grammar_from_regex(g.source))


def check_grammar(g: Grammar, tok) -> None:
    """Raise GrammarError (what is wrong) unless `g` compiles against `tok`'s vocabulary."""
    llg = _llg()
    err, msgs = llg.LLMatcher.validate_grammar_with_warnings(grammar_text(g), ll_tokenizer(tok))
    if err:
        raise GrammarError(f"the {g.kind} grammar cannot be compiled: {msgs[0] if msgs else 'unknown error'}")


class GrammarConstraint:
    """One generation's grammar state: the sampler's `TokenConstraint` (see engine/sampling.py)."""

    def __init__(self, g: Grammar, tok, vocab_size: int) -> None:
        llg = _llg()
        lt = ll_tokenizer(tok)
        self._m = llg.LLMatcher(lt, grammar_text(g), log_level=0)
        if self._m.is_error():
            raise GrammarError(f"the {g.kind} grammar cannot be compiled: {self._m.get_error()}")
        self.vocab_size = vocab_size
        self._n_words = (lt.vocab_size + 31) // 32
        self._bits = np.zeros(self._n_words, dtype=np.int32)  # (W,) one bit per token of the tokenizer
        self._allowed = torch.zeros(vocab_size, dtype=torch.bool)  # (V,) ids past the tokenizer stay false

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar accepts next (valid until the next `accept`)."""
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._m.is_error():
            raise GrammarError(f"constrained decoding failed: {self._m.get_error()}")
        flags = np.unpackbits(self._bits.view(np.uint8), bitorder="little")  # (32 W,) 0/1
        n = min(self.vocab_size, flags.shape[0])
        self._allowed[:n] = torch.from_numpy(flags[:n].view(np.bool_))
        return self._allowed

    def accept(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise GrammarError(f"constrained decoding failed at token {token}: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and takes nothing more (only EOS could follow)."""
        return bool(self._m.is_stopped())


def make_constraint(g: Grammar | None, tok, vocab_size: int) -> GrammarConstraint | None:
    return None if g is None else GrammarConstraint(g, tok, vocab_size)
