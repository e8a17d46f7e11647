"""Read a GGUF file's metadata (key -> python value) without touching its tensors.

`gguf.GGUFReader` builds a numpy view for every element of every array, which takes seconds for a
49k-entry vocabulary plus its merges. Here the key/value section is walked once with `struct` over a
memory map: strings become `str`, numeric arrays go through one `numpy.frombuffer` each, and the
tensor table and data are never read. Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import logging
import mmap
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import GGUFValueType

from infinichat.errors import ModelLoadError

log = logging.getLogger(__name__)

_SUPPORTED_VERSIONS = (2, 3)

# scalar value type -> (struct code, numpy dtype) without the byte-order prefix
_SCALARS: dict[int, tuple[str, str]] = {
    GGUFValueType.UINT8: ("B", "u1"),
    GGUFValueType.INT8: ("b", "i1"),
    GGUFValueType.UINT16: ("H", "u2"),
    GGUFValueType.INT16: ("h", "i2"),
    GGUFValueType.UINT32: ("I", "u4"),
    GGUFValueType.INT32: ("i", "i4"),
    GGUFValueType.FLOAT32: ("f", "f4"),
    GGUFValueType.BOOL: ("?", "?"),
    GGUFValueType.UINT64: ("Q", "u8"),
    GGUFValueType.INT64: ("q", "i8"),
    GGUFValueType.FLOAT64: ("d", "f8"),
}


class _Cursor:
    """A read position over the mapped file, in the file's byte order."""

    def __init__(self, buf: mmap.mmap, order: Literal["<", ">"], source: str):
        self.buf, self.order, self.source, self.pos = buf, order, source, 0

    def unpack(self, code: str) -> Any:
        fmt = self.order + code
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ModelLoadError(
                f"{self.source}: GGUF metadata ends early at byte {self.pos}; the file is truncated"
            ) from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self, key: str) -> str:
        n = self.unpack("Q")
        raw = self.buf[self.pos : self.pos + n]
        if len(raw) != n:
            raise ModelLoadError(f"{self.source}: GGUF string for {key!r} runs past the end of the file; truncated")
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            log.warning("%s: %r holds a string that is not valid UTF-8; bad bytes replaced", self.source, key)
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0])
        if vtype == GGUFValueType.STRING:
            return self.string(key)
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        raise ModelLoadError(
            f"{self.source}: metadata {key!r} has value type {vtype}; accepted types are 0-12 (GGUF v2/v3)"
        )

    def array(self, key: str) -> list[Any]:
        etype = self.unpack("I")
        count = self.unpack("Q")
        if etype in _SCALARS:
            dtype = np.dtype(_SCALARS[etype][1]).newbyteorder(self.order)
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise ModelLoadError(f"{self.source}: array {key!r} runs past the end of the file; truncated")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
            self.pos = end
            return values
        if etype == GGUFValueType.STRING:
            return [self.string(key) for _ in range(count)]
        return [self.value(etype, key) for _ in range(count)]


def read_gguf_fields(path: Path | str) -> dict[str, Any]:
    """All metadata of a GGUF file as python values: str, int, float, bool, or lists of those.

    Keys are llama.cpp's (`general.architecture`, `tokenizer.ggml.tokens`, `llama.block_count`...).
    Raises `ModelLoadError` for a missing, non-GGUF, truncated or unsupported-version file.
    """
    path = Path(path)
    source = str(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read_fields(buf, source)
    except FileNotFoundError:
        raise ModelLoadError(f"{source}: no such GGUF file") from None
    except ValueError as e:  # mmap of an empty file
        raise ModelLoadError(f"{source}: cannot map the file ({e}); expected a non-empty GGUF file") from None


def _read_fields(buf: mmap.mmap, source: str) -> dict[str, Any]:
    if buf[:4] != b"GGUF":
        raise ModelLoadError(f"{source}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    order: Literal["<", ">"] = "<"
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0 and version not in _SUPPORTED_VERSIONS:  # written on a big-endian machine
        order = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in _SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{source}: GGUF version {version} is not supported; accepted versions: 2, 3")
    cur = _Cursor(buf, order, source)
    cur.pos = 8
    _n_tensors = cur.unpack("Q")
    n_kv = cur.unpack("Q")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("<key>")
        vtype = cur.unpack("I")
        fields[key] = cur.value(vtype, key)
    return fields
