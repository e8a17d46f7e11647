"""Bounds on a request's head (the request line and the header lines), enforced while uvicorn parses it.

A head over `MAX_HEAD_KB` KiB in all, or with one line over `MAX_LINE_KB` KiB, is answered 431 (Request Header
Fields Too Large) with a JSON error in the server's shape, and its connection is closed; the app never sees it,
and the other connections are not touched. A head the parser cannot read gets a JSON 400 the same way (uvicorn's
own was plain text). Either refusal of a request pipelined behind others follows their answers.

The largest heads real clients send (browsers' cookies, OpenAI SDKs' headers, bearer tokens of a few KiB) stay far
below: nginx allows 4 x 8 KiB lines by default, llama.cpp's server 8 KiB a line.

uvicorn has no such bound on its default parser (httptools: a 2 MB header used to get 200, and a client could
stream headers until memory ran out); `HeadBoundedHttpTools` counts the bytes of a head as they arrive, so at most
one read (asyncio's: 256 KiB) past the bound is ever buffered. Where httptools is missing, uvicorn's h11 parser
is used with its own bound (`h11_max_incomplete_event_size`), which answers 400 instead of 431.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)

MAX_HEAD_KB = 64  # serve --max-header-kb: the request line and all header lines together
MAX_LINE_KB = 32  # one line (the request line, or one header's name and value), at most the whole bound
# the bytes of a head the callbacks do not count (its method, HTTP version and line ends, spaces around values): a
# head still arriving is refused past max_head + HEAD_SLACK raw bytes, so that the bound does not depend on how it
# was cut into packets (a head of exactly max_head counted bytes got 200 in one piece, 431 trickled)
HEAD_SLACK = 1024
LINGER_S = 5.0  # after a 431, how long what the client still sends is read and dropped before the connection closes


class HeadTooLarge(Exception):
    """Raised inside a parser callback to stop the parser once the 431 is sent."""


def protocol_options(max_head_kb: int = MAX_HEAD_KB) -> dict[str, Any]:
    """The uvicorn.Config arguments that bound request heads to `max_head_kb` KiB (lines to MAX_LINE_KB)."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return {"http": "h11", "h11_max_incomplete_event_size": max_head_kb << 10}
    limits = {"max_head": max_head_kb << 10, "max_line": min(MAX_LINE_KB, max_head_kb) << 10}
    return {"http": type("HeadBoundedHttpTools", (_bounded_base(),), limits)}


def _bounded_base() -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadBoundedHttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol, its parser callbacks counting the head of each request."""

        max_head = MAX_HEAD_KB << 10
        max_line = MAX_LINE_KB << 10
        _in_head = True  # between a request's first byte (or the last one's end) and its headers' end
        _raw = 0  # bytes received since the head began, while it has not ended
        _counted = 0  # the head's bytes seen by the callbacks (the URL, each header: name: value CRLF)
        _refused = False
        _deferred: bytes | None = None  # a 431 waiting for the answers to the earlier requests of its connection

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._in_head:
                self._raw += len(data)
            super().data_received(data)
            if self._in_head and not self._refused and self._raw > self.max_head + HEAD_SLACK:
                # still inside the head: these bytes all belong to it (a single line no callback has seen yet)
                self._refuse(f"the request's head is over {self.max_head >> 10} KiB and still coming")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._counted = True, 0

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            self._counted += len(url)
            if len(self.url) > self.max_line:
                self._refuse(f"the request's URL is {len(self.url)} bytes; it may have at most {self.max_line}")
                raise HeadTooLarge

        def on_header(self, name: bytes, value: bytes) -> None:
            line = len(name) + len(value) + 4  # name, ": ", value, CRLF
            self._counted += line
            if line > self.max_line:
                shown = name[:64].decode("latin-1")
                self._refuse(f"the header {shown!r} is {line} bytes; one header may have at most {self.max_line}")
                raise HeadTooLarge
            if self._counted > self.max_head:
                self._refuse(f"the request's headers are over {self.max_head} bytes in all")
                raise HeadTooLarge
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head, self._raw = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._raw = True, 0

        def send_400_response(self, msg: str) -> None:
            """A request the parser cannot read: a JSON 400 after the answers to the requests before it (uvicorn's
            own was plain text, written at once in the place of a pipelined request's answer, which was lost)."""
            if self._refused:  # the parser stopped on HeadTooLarge: the 431 is already sent
                return
            self._refused = True
            log.warning("400 to %s: %s", self.client, msg)
            why = (
                "invalid HTTP request: its request line or a header line is malformed (a folded header line, a "
                "control byte or a bare LF in it, a space or a non-ASCII byte in a header name, ...); send a "
                "well-formed HTTP/1.1 request"
            )
            self._reject(self._answer(400, b"Bad Request", why, "bad_http_request"))

        def _refuse(self, why: str) -> None:
            self._refused = True
            msg = f"{why}; send smaller headers (this server accepts {self.max_head >> 10} KiB in all: --max-header-kb)"
            log.warning("431 to %s: %s", self.client, why)
            self._reject(self._answer(431, b"Request Header Fields Too Large", msg, "header_too_large"))

        def _answer(self, status: int, reason: bytes, msg: str, code: str) -> bytes:
            # the server's error shape (server/errors.py, not imported: it pulls in torch, and the loading shell
            # answers before that is loaded)
            err = {"message": msg, "type": "invalid_request_error", "param": None, "code": code}
            body = json.dumps({"error": err}).encode()
            head = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
            return b"".join(head) + body

        def _reject(self, answer: bytes) -> None:
            if self.cycle is not None and not self.cycle.response_complete:
                # pipelined behind requests of this connection still being answered: HTTP answers in order, so the
                # refusal follows their answers (sent at once, it took the place of the first one, whose answer
                # then failed: write() after write_eof())
                self._deferred = answer
                return
            self._send_refusal(answer)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._deferred is not None and self.cycle is not None and self.cycle.response_complete:
                answer, self._deferred = self._deferred, None
                self._send_refusal(answer)

        def _send_refusal(self, answer: bytes) -> None:
            if self.transport.is_closing():  # the client went away, or the last answer closed the connection
                return
            self.transport.write(answer)
            # a lingering close: the answer, then the end of our side; what the client still sends is read and
            # dropped (data_received) until it closes, for at most LINGER_S. Closing at once with its bytes unread
            # would reset the connection, and a client still sending could lose the answer.
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self.loop.call_later(LINGER_S, self.transport.close)
            else:
                self.transport.close()

    return HeadBoundedHttpTools
