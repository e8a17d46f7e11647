"""Text <-> token ids, over a Hugging Face `tokenizers.Tokenizer`.

Three ways in:
- `from_hf_dir`: a model folder with `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`,
  `generation_config.json`, `config.json` for special tokens, the chat template and end-of-turn ids).
- `from_gguf_fields`: the vocabulary llama.cpp stores in GGUF metadata. Byte-level BPE vocabularies
  (`tokenizer.ggml.model == "gpt2"`) get the pre-tokenizer regexes llama.cpp's `llama-vocab.cpp` uses
  for their `tokenizer.ggml.pre`; SentencePiece vocabularies (`"llama"`) become a byte-fallback BPE
  whose merges are recovered from the piece scores, as transformers builds them, so ids agree with it.
- `from_saved`: a folder written by `save`, which reloads in tens of milliseconds.

`encode` never adds BOS on its own: the caller asks for it (`add_bos=tok.add_bos`), so chat code that
renders a template containing `bos_token` does not get it twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from infinichat.errors import ModelLoadError
from infinichat.model.chat_template import render_chat_template

log = logging.getLogger(__name__)

META_FILE = "infinichat_tokenizer.json"
TOKENIZER_FILE = "tokenizer.json"

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# pieces that end a turn in common chat formats; counted as EOS when the vocab has them as special tokens
END_OF_TURN_PIECES = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<|return|>",
    "</s>",
    "<|END_OF_TURN_TOKEN|>",
)

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer regexes for byte-level BPE vocabularies, keyed by GGUF `tokenizer.ggml.pre`.
# Each entry is applied in order, like llama.cpp's `regex_exprs`: every regex cuts the pieces
# left by the previous one, keeping both its matches and the text between them.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    (
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
)
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How a byte-level BPE vocabulary cuts text before merging."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # look a whole piece up in the vocab before merging (llama 3, tekken)
    add_bos: bool = False  # llama.cpp's default when the file has no `tokenizer.ggml.add_bos_token`


_LLAMA3_SPEC = PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True)
_GPT2_SPEC = PreTokenizerSpec((_GPT2,))
_DIGITS_THEN_GPT2 = PreTokenizerSpec((r"\p{N}", _GPT2))
_QWEN2_SPEC = PreTokenizerSpec((_QWEN2,))
_GPT4O_SPEC = PreTokenizerSpec((_GPT4O,))

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    # llama.cpp's fallback for files without a known pre-tokenizer
    "default": PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(
        (
            "gpt2",
            "gpt-2",
            "phi-2",
            "mpt",
            "olmo",
            "jais",
            "jina-es",
            "jina-de",
            "jina-v2-es",
            "jina-v2-de",
            "gigachat",
            "exaone4",
            "trillion",
            "granite-docling",
            "mellum",
            "a.x-4.0",
            "modern-bert",
        ),
        _GPT2_SPEC,
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"), _LLAMA3_SPEC
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizerSpec((_LLAMA3,))),
    **dict.fromkeys(("chatglm-bpe", "glm4"), PreTokenizerSpec((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo"), _QWEN2_SPEC),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS_THEN_GPT2
    ),
    "falcon": PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "minimax-m2"), _GPT4O_SPEC),
    "tekken": PreTokenizerSpec((_TEKKEN,), ignore_merges=True, add_bos=True),
    "deepseek-coder": PreTokenizerSpec((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")),
    "deepseek-v3": PreTokenizerSpec(_DEEPSEEK3),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), PreTokenizerSpec((_PORO,))),
    "viking": PreTokenizerSpec((_PORO, r"\p{N}")),
}


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 (control chars, space, ...) are
    shifted to U+0100 onwards in byte order, so a space is 'Ġ' (U+0120) and a newline 'Ċ'.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return dict(sorted(table.items()))


@dataclass(frozen=True)
class TokenizerMeta:
    """What `tokenizer.json` does not say: special ids, BOS policy, chat template. Saved as json."""

    bos_id: int | None = None
    eos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    kind: str = "other"  # "byte_level" | "sentencepiece" | "other": how ids map back to bytes
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> TokenizerMeta:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ModelLoadError(f"{source}: unknown keys {sorted(unknown)}; accepted: {sorted(known)}")
        values = dict(data)
        values["eos_ids"] = tuple(values.get("eos_ids", ()))
        return cls(**values)


class Tokenizer:
    """A model's tokenizer: `encode` / `decode`, special ids, and its chat template."""

    def __init__(self, backend: HFTokenizer, meta: TokenizerMeta):
        self._backend = backend
        self._literal: HFTokenizer | None = None  # copy that reads special tokens in text as plain text
        self._bytes: list[bytes] | None = None
        self._containing: dict[tuple[str, ...], np.ndarray] = {}  # tokens_containing, per set of strings
        self._derived: dict[str, Any] = {}  # derived(): built once per key
        self.meta = meta
        added = backend.get_added_tokens_decoder()
        self._special = frozenset(i for i, tok in added.items() if tok.special)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id: int | None = meta.bos_id
        self.eos_id: int | None = meta.eos_id
        self.eos_ids: frozenset[int] = frozenset(meta.eos_ids)
        self.pad_id: int | None = meta.pad_id
        self.unk_id: int | None = meta.unk_id
        self.add_bos: bool = meta.add_bos
        self.chat_template: str | None = meta.chat_template
        for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
            i = getattr(self, name)
            if i is not None and not 0 <= i < self.vocab_size:
                raise ModelLoadError(f"{meta.source}: {name}={i} is outside the vocabulary (0..{self.vocab_size - 1})")

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)}, "
            f"add_bos={self.add_bos}, kind={self.meta.kind!r}, source={self.meta.source!r})"
        )

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer` (read-only use)."""
        return self._backend

    @property
    def bos_token(self) -> str:
        return self.id_to_piece(self.bos_id) if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.id_to_piece(self.eos_id) if self.eos_id is not None else ""

    # ---------------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. With `parse_special`, control tokens written in the text (`<|im_start|>`)
        become their ids; without it they are tokenized as ordinary characters (use that for user text)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        backend = self._backend if parse_special else self._literal_backend()
        ids = backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"{self.meta.source}: add_bos=True, but this tokenizer has no BOS; pass add_bos=False")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry for id `i`, as stored ('Ġhello', '▁hello', '<0x0A>', '<|im_end|>')."""
        piece = self._backend.id_to_token(int(i))
        if piece is None:
            raise IndexError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        return self._backend.token_to_id(piece)

    def is_special(self, i: int) -> bool:
        """Control tokens (`<|im_start|>`, `<s>`): skipped by `decode(skip_special=True)`."""
        return i in self._special

    def token_bytes(self, i: int) -> bytes:
        """The exact bytes token `i` stands for; concatenate these to stream text without ever cutting a
        UTF-8 character (a lone byte token is half a character). Special tokens give their text."""
        if self._bytes is None:
            self._bytes = self._build_byte_table()
        if not 0 <= i < len(self._bytes):
            raise IndexError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._bytes[i]

    def tokens_containing(self, strings: Sequence[str]) -> np.ndarray:
        """(vocab_size,) bool: the tokens whose bytes contain one of `strings` (UTF-8), e.g. DRY's sequence
        breakers. Computed once per set of strings."""
        key = tuple(strings)
        mask = self._containing.get(key)
        if mask is None:
            if self._bytes is None:
                self._bytes = self._build_byte_table()
            needles = [t.encode("utf-8") for t in key]
            mask = np.fromiter((any(n in b for n in needles) for b in self._bytes), dtype=bool, count=len(self._bytes))
            self._containing[key] = mask
        return mask

    def derived(self, key: str, build: Callable[[], Any]) -> Any:
        """A structure built from this tokenizer once and kept with it (e.g. a grammar library's view of the
        vocabulary, engine/grammar.py): `build()` on the first call for `key`, the same object after."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The model's prompt text for `messages` (ChatML when the model has no template)."""
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )

    def _literal_backend(self) -> HFTokenizer:
        if self._literal is None:
            literal = HFTokenizer.from_str(self._backend.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal

    def _build_byte_table(self) -> list[bytes]:
        added = {i: t.content for i, t in self._backend.get_added_tokens_decoder().items()}
        unbyte = {c: b for b, c in byte_to_unicode().items()}
        table = []
        for i in range(self.vocab_size):
            piece = added.get(i) or self._backend.id_to_token(i) or ""
            if i in added:
                table.append(piece.encode("utf-8"))
            elif self.meta.kind == "byte_level" and all(c in unbyte for c in piece):
                table.append(bytes(unbyte[c] for c in piece))
            elif self.meta.kind == "sentencepiece" and len(piece) == 6 and piece[:3] == "<0x" and piece[5] == ">":
                table.append(bytes([int(piece[3:5], 16)]))
            elif self.meta.kind == "sentencepiece":
                table.append(piece.replace("▁", " ").encode("utf-8"))
            else:
                table.append(self._backend.decode([i], skip_special_tokens=False).encode("utf-8"))
        return table

    # ---------------------------------------------------------------------- persistence
    def save(self, folder: Path) -> None:
        """Write `tokenizer.json` and `infinichat_tokenizer.json`; `from_saved(folder)` reads them back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / TOKENIZER_FILE))
        (folder / META_FILE).write_text(json.dumps(self.meta.to_json(), ensure_ascii=False, indent=1), "utf-8")

    @classmethod
    def from_saved(cls, folder: Path) -> Tokenizer:
        folder = Path(folder)
        tok_path, meta_path = folder / TOKENIZER_FILE, folder / META_FILE
        for p in (tok_path, meta_path):
            if not p.is_file():
                raise ModelLoadError(f"{p}: missing; a saved tokenizer folder holds {TOKENIZER_FILE} and {META_FILE}")
        backend = _load_backend(tok_path)
        try:
            data = json.loads(meta_path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{meta_path}: not valid JSON ({e})") from None
        return cls(backend, TokenizerMeta.from_json(data, str(meta_path)))

    # ---------------------------------------------------------------------- Hugging Face folder
    @classmethod
    def from_hf_dir(cls, folder: Path) -> Tokenizer:
        folder = Path(folder)
        tok_path = folder / TOKENIZER_FILE
        if not tok_path.is_file():
            raise ModelLoadError(
                f"{folder}: no {TOKENIZER_FILE}; accepted: a Hugging Face folder with a fast tokenizer "
                "(tokenizer.json), or a GGUF file"
            )
        backend = _load_backend(tok_path)
        cfg = _read_json(folder / "tokenizer_config.json")
        model_cfg = _read_json(folder / "config.json")
        gen_cfg = _read_json(folder / "generation_config.json")

        def token_id(name: str) -> int | None:
            value = cfg.get(name)
            content = value.get("content") if isinstance(value, Mapping) else value
            return backend.token_to_id(content) if isinstance(content, str) else None

        def config_ids(key: str) -> list[int]:
            for c in (gen_cfg, model_cfg):
                value = c.get(key)
                if isinstance(value, int):
                    return [value]
                if isinstance(value, list):
                    return [v for v in value if isinstance(v, int)]
            return []

        bos_id = token_id("bos_token")
        if bos_id is None and config_ids("bos_token_id"):
            bos_id = config_ids("bos_token_id")[0]
        eos_id = token_id("eos_token")
        extra_eos = config_ids("eos_token_id")
        if eos_id is None and extra_eos:
            eos_id = extra_eos[0]
        add_bos = cfg.get("add_bos_token")
        if not isinstance(add_bos, bool):
            probe = backend.encode("", add_special_tokens=True).ids
            add_bos = bos_id is not None and probe[:1] == [bos_id]
        meta = TokenizerMeta(
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=_eos_ids(backend, eos_id, extra_eos),
            pad_id=token_id("pad_token"),
            unk_id=token_id("unk_token"),
            add_bos=add_bos,
            chat_template=_hf_chat_template(folder, cfg),
            kind=_kind_of(backend),
            source=str(folder),
        )
        return cls(backend, meta)

    # ---------------------------------------------------------------------- GGUF metadata
    @classmethod
    def from_gguf(cls, path: Path) -> Tokenizer:
        """Shorthand for `from_gguf_fields(read_gguf_fields(path))`."""
        from infinichat.model.gguf_meta import read_gguf_fields

        return cls.from_gguf_fields(read_gguf_fields(path), source=str(path))

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any], source: str = "GGUF metadata") -> Tokenizer:
        """Build from GGUF metadata already read into python values (see `gguf_meta.read_gguf_fields`)."""
        model = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ModelLoadError(f"{source}: no tokenizer.ggml.tokens; this GGUF file carries no vocabulary")
        types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ModelLoadError(f"{source}: {len(types)} token types for {len(tokens)} tokens; they must match")

        def opt_id(key: str) -> int | None:
            value = fields.get(f"tokenizer.ggml.{key}")
            return int(value) if isinstance(value, int) and 0 <= value < len(tokens) else None

        if model == "gpt2":
            pre = str(fields.get("tokenizer.ggml.pre") or "")
            spec = _pre_spec(pre, source)
            backend = _byte_level_backend(tokens, types, fields.get("tokenizer.ggml.merges") or [], spec, source)
            kind, default_add_bos = "byte_level", spec.add_bos
        elif model == "llama":
            scores = fields.get("tokenizer.ggml.scores")
            if not isinstance(scores, list) or len(scores) != len(tokens):
                raise ModelLoadError(f"{source}: a SentencePiece ('llama') vocabulary needs one score per token")
            add_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
            backend = _sentencepiece_backend(tokens, types, scores, add_prefix, opt_id("unknown_token_id"))
            kind, default_add_bos = "sentencepiece", True
        else:
            raise ModelLoadError(
                f"{source}: tokenizer.ggml.model {model!r} is not supported; accepted: 'gpt2' (byte-level BPE), "
                "'llama' (SentencePiece)"
            )
        _add_gguf_added_tokens(backend, tokens, types)
        eos_id = opt_id("eos_token_id")
        turn_ends = [i for i in (opt_id("eot_token_id"), opt_id("eom_token_id")) if i is not None]
        add_bos = fields.get("tokenizer.ggml.add_bos_token")
        template = fields.get("tokenizer.chat_template")
        meta = TokenizerMeta(
            bos_id=opt_id("bos_token_id"),
            eos_id=eos_id,
            eos_ids=_eos_ids(backend, eos_id, turn_ends),
            pad_id=opt_id("padding_token_id"),
            unk_id=opt_id("unknown_token_id"),
            add_bos=add_bos if isinstance(add_bos, bool) else default_add_bos,
            chat_template=template if isinstance(template, str) and template else None,
            kind=kind,
            source=source,
        )
        log.debug("tokenizer from %s: %d tokens, model=%s", source, len(tokens), model)
        return cls(backend, meta)


# ---------------------------------------------------------------------------------------------
# builders


def _pre_spec(pre: str, source: str) -> PreTokenizerSpec:
    if not pre:
        log.warning("%s: no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer (quality may suffer)", source)
        return PRE_TOKENIZERS["default"]
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise ModelLoadError(
            f"{source}: pre-tokenizer {pre!r} is not supported; accepted: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    return spec


def _unique_vocab(pieces: list[str]) -> dict[str, int]:
    """piece -> id. A repeated piece (some files have them) keeps its first id; later copies get a
    placeholder name no text can produce, so every id stays decodable."""
    vocab: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if piece in vocab:
            log.debug("token %d repeats piece %r of token %d", i, piece, vocab[piece])
            piece = f"<infinichat:duplicate:{i}>"
        vocab[piece] = i
    return vocab


def _byte_level_backend(
    tokens: list[str], types: list[int], merges: list[str], spec: PreTokenizerSpec, source: str
) -> HFTokenizer:
    alphabet = set(byte_to_unicode().values())
    spell = byte_to_unicode()
    pieces = []
    for tok, typ in zip(tokens, types, strict=True):
        if typ in (CONTROL, USER_DEFINED, UNKNOWN) or set(tok) <= alphabet:
            pieces.append(tok)  # added tokens are stored as raw text and matched as such
        else:
            pieces.append("".join(spell[b] for b in tok.encode("utf-8")))
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelLoadError(f"{source}: merge {m!r} is not 'left right'; every merge is two pieces and a space")
        pairs.append((left, right))
    try:
        bpe = models.BPE(vocab=_unique_vocab(pieces), merges=pairs, ignore_merges=spec.ignore_merges)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. "Token `ab` out of vocabulary"
        raise ModelLoadError(f"{source}: the merges do not fit the vocabulary ({e})") from None
    backend = HFTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece scores highest. As a ranked merge
    list: every split of every piece into two vocab pieces, best joined score first."""
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_backend(
    tokens: list[str], types: list[int], scores: list[float], add_prefix: bool, unk_id: int | None
) -> HFTokenizer:
    vocab = _unique_vocab(list(tokens))
    mergeable = {p: i for p, i in vocab.items() if types[i] in (NORMAL, USER_DEFINED, UNUSED)}
    unk = tokens[unk_id] if unk_id is not None else None
    backend = HFTokenizer(
        models.BPE(
            vocab=vocab, merges=_merges_from_scores(mergeable, scores), unk_token=unk, fuse_unk=True, byte_fallback=True
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_gguf_added_tokens(backend: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones plain added tokens:
    both are then cut out of the text whole before the BPE sees it, as llama.cpp does."""
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k in (CONTROL, UNKNOWN)
    ]
    user = [
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _eos_ids(backend: HFTokenizer, eos_id: int | None, extra: Sequence[int]) -> tuple[int, ...]:
    ids = {i for i in (eos_id, *extra) if i is not None}
    special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    for piece in END_OF_TURN_PIECES:
        i = backend.token_to_id(piece)
        if i is not None and i in special:
            ids.add(i)
    return tuple(sorted(ids))


# ---------------------------------------------------------------------------------------------
# Hugging Face folder helpers


def _load_backend(path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad json
        raise ModelLoadError(f"{path}: cannot be read as a tokenizers file ({e})") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _hf_chat_template(folder: Path, cfg: Mapping[str, Any]) -> str | None:
    """transformers 5 writes `chat_template.jinja`; older folders keep it in tokenizer_config.json,
    either as a string or as a list of named templates (we take 'default', else the first)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text("utf-8")
    value = cfg.get("chat_template")
    if value is None:
        value = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default", next(iter(named.values()), None))
    return value if isinstance(value, str) and value else None


def _kind_of(backend: HFTokenizer) -> str:
    """How ids map back to bytes, read off the decoder's repr ('ByteLevel(...)', '...ByteFallback()...')."""
    decoder = repr(backend.decoder)
    if "ByteLevel" in decoder:
        return "byte_level"
    if "ByteFallback" in decoder or "\u2581" in decoder:
        return "sentencepiece"
    return "other"


__all__ = ["PRE_TOKENIZERS", "PreTokenizerSpec", "Tokenizer", "TokenizerMeta", "byte_to_unicode"]
