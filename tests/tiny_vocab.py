"""Test helper: the tiny byte-level BPE vocabulary of the test models (GPT-2 style: the 256 byte pieces, a dozen
merges, three control tokens), without the gguf package, so that what only needs the vocabulary's size (the tiny
transformers models of gguf_archs, the CUDA tests) imports where gguf is not installed (benchmarks/gpu_check.py's
machine). gguf_util writes it into GGUF files."""

from __future__ import annotations

from functools import cache

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, CONTROL = 1, 3

MERGES = [
    ("h", "i"),
    ("Ġ", "t"),
    ("t", "h"),
    ("e", "r"),
    ("i", "n"),
    ("o", "n"),
    ("a", "n"),
    ("Ġ", "a"),
    ("Ġt", "h"),
    ("Ġth", "e"),
    ("e", "n"),
    ("o", "r"),
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@cache
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table, indexed by byte: printable Latin-1 bytes stand for
    themselves, the 68 others map to U+0100, U+0101, ... in byte order (space -> 'Ġ')."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return tuple(chars)


@cache
def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): the 256 byte pieces, a dozen merges, three control tokens."""
    tokens = list(_byte_chars()) + ["".join(pair) for pair in MERGES] + SPECIALS
    types = [NORMAL] * (len(tokens) - len(SPECIALS)) + [CONTROL] * len(SPECIALS)
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


VOCAB_SIZE = len(tiny_vocab()[0])  # 271
EOS_ID = VOCAB_SIZE - len(SPECIALS)  # <|endoftext|>, also BOS as in GPT-2 style vocabularies
