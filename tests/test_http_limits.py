"""Request heads are bounded (server/http_limits.py): a head over the bound, in all or in one line, gets 431 with
a JSON error and its connection closed, at any speed it arrives; the server and its other connections go on."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest

from infinichat.server.http_limits import MAX_HEAD_KB, MAX_LINE_KB, protocol_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exchange(port: int, head: bytes, chunk: int = 1 << 20, pause: float = 0.0) -> tuple[int, dict, bytes]:
    """Send `head` on a fresh connection (in pieces of `chunk` bytes) and read the answer until the server closes
    it: (status, headers, body). A server that stops reading and closes may reset the send: that is an answer
    too, read after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            for i in range(0, len(head), chunk):
                s.sendall(head[i : i + chunk])
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while True:
                got = s.recv(65536)
                if not got:
                    break
                data += got
        except ConnectionResetError:
            pass
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *extra, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_defaults_are_roomy():
    assert MAX_HEAD_KB == 64 and MAX_LINE_KB == 32  # what the README and --help say
    assert "http" in protocol_options()


STILL = "head is over 64 KiB and still coming"  # refused while it arrives, before its line is complete


@pytest.mark.parametrize(
    ("head", "chunk", "what"),
    [
        (get("/health", "X-Big: " + "a" * (2 << 20)), 1 << 20, STILL),  # one 2 MB line
        (get("/health", "X-Big: " + "a" * (40 << 10)), 1 << 20, "header 'X-Big' is"),  # one 40 KiB line, at once
        (get("/health", *[f"X-H{i}: " + "b" * 1000 for i in range(100)]), 1 << 20, "headers are over"),  # 100 KB
        (get("/health?q=" + "c" * (40 << 10)), 1 << 20, "URL is"),  # a 40 KiB request line
        (get("/health", "X-Slow: " + "d" * (300 << 10)), 4096, STILL),  # trickled in small pieces
    ],
    ids=["2MB-line", "40KiB-line", "100-lines", "40KiB-url", "trickled"],
)
def test_large_heads_get_431_and_the_server_goes_on(live, head, chunk, what):
    status, headers, body = exchange(live.port, head, chunk)
    assert status == 431, body[:300]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    err = json.loads(body)["error"]
    assert what in err["message"] and "--max-header-kb" in err["message"] and "64 KiB" in err["message"], err
    status, _, body = exchange(live.port, get("/health"))  # the next connection is served
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_real_sized_heads_pass(live):
    cookies = "Cookie: " + "; ".join(f"c{i}={'x' * 200}" for i in range(60))  # 12 KB of cookies
    status, _, body = exchange(live.port, get("/health", cookies, "Authorization: Bearer " + "t" * 4000))
    assert status == 200, body
    # a keep-alive connection: a request after a large (allowed) one on the same connection is served
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for _ in range(3):
            assert c.get("/health", headers={"X-Pad": "p" * (30 << 10)}).status_code == 200
        r = c.get("/health", headers={"X-Pad": "p" * (40 << 10)})
        assert r.status_code == 431 and "x-pad" in r.json()["error"]["message"].lower()


@pytest.mark.parametrize("size", [70_000, 200_000, 2_000_000])
def test_a_client_still_sending_reads_the_431(live, size):
    """An HTTP client that writes its whole request before it reads gets the answer, not a reset connection (the
    server reads and drops the rest of a refused head before it closes: a lingering close)."""
    with httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"X-Junk": "a" * size})
        assert r.status_code == 431 and r.json()["error"]["code"] == "header_too_large", r.text
        assert c.get("/health").status_code == 200  # a new connection of the same client


def test_other_connections_unaffected(live):
    """A client trickling a huge head does not hold up a request on another connection."""
    stop = threading.Event()

    def slow():
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            while not stop.is_set():
                try:
                    s.sendall(b"e" * 1024)
                except OSError:
                    return  # refused: the server closed it
                time.sleep(0.005)

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    try:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            r = c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2})
            assert r.status_code == 200, r.text
    finally:
        stop.set()
        t.join(30)


def test_max_header_kb_is_configurable(tiny_chat_model, tmp_path):
    from server_util import LiveServer

    with LiveServer(tiny_chat_model, tmp_path, max_header_kb=8) as srv:
        status, _, body = exchange(srv.port, get("/health", "X-A: " + "a" * 5000, "X-B: " + "b" * 5000))
        assert status == 431 and "8 KiB" in json.loads(body)["error"]["message"]
        status, _, _ = exchange(srv.port, get("/health", "X-A: " + "a" * 5000))
        assert status == 200


def test_serve_checks_max_header_kb():
    from infinichat.cli.main import build_parser
    from infinichat.errors import InfinichatError
    from infinichat.server.app import check_serve_options

    args = build_parser().parse_args(["serve", "--max-header-kb", "0"])
    with pytest.raises(InfinichatError, match=r"--max-header-kb must be in \[1, 1024\]"):
        check_serve_options(args)
    assert build_parser().parse_args(["serve"]).max_header_kb == MAX_HEAD_KB


def test_without_httptools_h11_bounds_the_head(tiny_chat_model, tmp_path, monkeypatch):
    """Where httptools is missing, uvicorn's h11 parser bounds the head (it answers 400, not 431)."""
    import sys

    from server_util import LiveServer

    monkeypatch.setitem(sys.modules, "httptools", None)  # `import httptools` raises ImportError
    assert protocol_options(64) == {"http": "h11", "h11_max_incomplete_event_size": 64 << 10}
    with LiveServer(tiny_chat_model, tmp_path) as srv:
        status, _, _ = exchange(srv.port, get("/health", "X-Big: " + "a" * (2 << 20)))
        assert status == 400
        status, _, body = exchange(srv.port, get("/health"))
        assert status == 200, body


def test_a_431_pipelined_behind_a_request_follows_its_answer(live):
    """A keep-alive client that pipelines a request and then one with a head over the bound (one TCP write) gets the
    first request's answer, then the 431: answers in order. (The 431 used to be written at once, in the first
    request's place, and that request's answer then failed in the server: write() after write_eof().)"""
    first = get("/health").replace(b"Connection: close\r\n", b"")
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
        s.sendall(first + get("/health", "X-Big: " + "a" * (40 << 10)))
        data = b""
        while got := s.recv(65536):
            data += got
    answers = data.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"431"], data[:500]
    assert b'"status":"ok"' in answers[0] and b"header_too_large" in answers[1]
    status, _, _ = exchange(live.port, get("/health"))
    assert status == 200


def test_the_bound_does_not_depend_on_the_packets(live):
    """A head of exactly the bound's counted bytes (the URL and each header line) is served, one byte more is
    refused, whether it arrives at once or with a pause inside it (it used to be refused when the bytes already
    received, request line and line ends included, passed the bound before its end arrived)."""
    fixed = len("/health") + (4 + 9 + 4) + (10 + 5 + 4)  # URL, Host, Connection (name + value + ": " + CRLF)
    value = (MAX_HEAD_KB * 1024 - fixed) // 3 - 3 - 4  # three "X-N: value" lines fill the bound exactly
    assert fixed + 3 * (3 + value + 4) == MAX_HEAD_KB * 1024
    at = get("/health", *[f"X-{i}: " + "v" * value for i in range(3)])
    over = get("/health", *[f"X-{i}: " + "v" * (value + (i == 2)) for i in range(3)])
    for head, want in ((at, 200), (over, 431)):
        assert exchange(live.port, head)[0] == want
        assert exchange(live.port, head, chunk=len(head) - 8, pause=0.3)[0] == want  # the end arrives later


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\r\n  folded\r\n\r\n",  # obs-fold
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n",  # NUL
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-\xc3\x9c: v\r\n\r\n",  # a non-ASCII header name
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS sent to the plain-HTTP port
    ],
    ids=["obs-fold", "NUL", "non-ASCII-name", "TLS"],
)
def test_a_malformed_head_gets_a_json_400_after_the_answers_before_it(live, head):
    """A head the parser refuses gets the server's JSON error (uvicorn's own was plain text), and pipelined behind
    a request, after that request's answer (which used to be lost: the 400 was written in its place)."""
    status, headers, body = exchange(live.port, head)
    assert status == 400 and headers["content-type"] == "application/json"
    err = json.loads(body)["error"]
    assert err["code"] == "bad_http_request" and "well-formed HTTP/1.1" in err["message"]
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
        s.sendall(get("/health").replace(b"Connection: close\r\n", b"") + head)
        data = b""
        while got := s.recv(65536):
            data += got
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", data) == [b"200", b"400"], data[:300]
