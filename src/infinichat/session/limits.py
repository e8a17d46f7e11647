"""Bounds on what a client may send (lengths, counts), and the check that text is valid Unicode.

JSON can carry a lone UTF-16 surrogate (`"\\ud800"`), which Python decodes into a `str` that cannot be
encoded as UTF-8: the tokenizer and SQLite reject it. Every text field is checked with `check_text` before
it reaches a session, so such input is a 400 naming the field, never a half-applied change. `check_text` also
refuses the NUL character: PostgreSQL's text columns cannot hold it, and a session must fit either store.
"""

from __future__ import annotations

from infinichat.errors import InfinichatError

MAX_MESSAGE_CHARS = 200_000  # a message, a system prompt, RAG text
MAX_NAME_CHARS = 256  # a session's display name
MAX_USER_NAME_CHARS = 64
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64  # each stop string
MAX_NEW_TOKENS = 16384  # tokens one request may generate (and never more than the session's budget)


def bad_code_point(text: str) -> int | None:
    """The index of the first character that is not a Unicode scalar value (a lone surrogate), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_text(text: object, what: str, max_chars: int = MAX_MESSAGE_CHARS, allow_empty: bool = True) -> str:
    """`text` if it is a string of valid Unicode of at most `max_chars` characters; else InfinichatError
    naming `what`."""
    if not isinstance(text, str):
        raise InfinichatError(f"the {what} must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise InfinichatError(f"the {what} is {len(text)} characters; at most {max_chars} are accepted")
    if not allow_empty and not text:
        raise InfinichatError(f"the {what} must not be empty")
    i = bad_code_point(text)
    if i is not None:
        raise InfinichatError(
            f"the {what} holds an invalid character at index {i} (U+{ord(text[i]):04X}, a lone surrogate); "
            "send valid Unicode text"
        )
    if "\x00" in text:
        raise InfinichatError(f"the {what} holds a NUL character (U+0000) at index {text.index(chr(0))}; remove it")
    return text


MAX_IMAGE_BYTES = 8 << 20  # an avatar image
IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif"}


def image_type(data: bytes) -> str | None:
    """The MIME type of a PNG, JPEG, GIF or WebP image by its first bytes, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((t for sig, t in IMAGE_TYPES.items() if data.startswith(sig)), None)


def check_image(data: object, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray)):
        raise InfinichatError(f"the {what} must be image bytes, got {type(data).__name__}")
    if len(data) > MAX_IMAGE_BYTES:
        raise InfinichatError(f"the {what} is {len(data)} bytes; at most {MAX_IMAGE_BYTES >> 20} MiB is accepted")
    if image_type(bytes(data)) is None:
        raise InfinichatError(f"the {what} is not an image; accepted: PNG, JPEG, GIF or WebP")
    return bytes(data)
