"""Bad-input sweep of the real server: every class of bad input sent to every endpoint (the session API, the
OpenAI API and the llama-server endpoints: /completion, /tokenize, /detokenize, /apply-template, /slots, /props).

Starts `infinichat serve` in a subprocess on 127.0.0.1 (a fresh data dir; by default a tiny random Llama GGUF
written for the run, so no download is needed), creates a session with two turns and a witness session, then
sends, for each endpoint, its valid body mutated field by field: lone surrogates, 5 MB strings, 1000-item lists,
NaN / inf / 1e-300 / 1e300 / -1 / 2**70 / wrong types / null, missing and unknown fields; and for every endpoint
malformed or non-object JSON, invalid UTF-8, 60-level nesting, non-JSON content types, a cross-site Origin, a
foreign Host, an oversized body (declared and chunked), a wrong method, headers over 64 KB, unknown or invalid
session ids, slot ids and actions out of range or of the wrong type. Then raw request heads around the
--max-header-kb bound (exactly at it, one byte over, in 1-byte packets, 8000 tiny headers, obs-fold, non-ASCII and
NUL bytes, a 431 pipelined behind a request: each must get the expected answers, in order), and 16 generating
requests at once (anonymous /v1, /completion n_predict -1, /suggest) cut by their clients halfway, after which
/metrics' infinichat_kv_reserved_bytes must be back to 0. After each refused request (4xx / 5xx),
the target session's history is compared with its state before; at the end, the witness session's too. Prints
tried / 2xx / 4xx / 5xx, the 5xx, and the sessions changed by a failed request (the target is 0 and 0).

    python benchmarks/bad_input_sweep.py [--model PATH] [--max 0] [--timeout 120] [--only /completion,/slots]
                                         [--verbose]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SID = "s1"
P = {"max_tokens": 2, "temperature": 0.0}
TINY_PNG = (  # a 1x1 PNG, base64
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
)
ENDPOINTS: list[tuple[str, str, Any]] = [  # (method, path, a valid body): bodies are mutated field by field
    ("POST", "/api/sessions", {"id": "new", "name": "n", "system_prompt": "Be brief.", "settings": {"budget": 256}}),
    ("POST", "/api/sessions", {"card": {"spec": "chara_card_v2", "data": {"name": "C", "description": "d"}}}),
    ("GET", f"/api/sessions/{SID}", None),
    ("GET", f"/api/sessions/{SID}/kv", None),
    ("POST", f"/api/sessions/{SID}/messages", {"text": "hello", "params": {**P, "stop": ["x"], "top_k": 5}}),
    ("POST", f"/api/sessions/{SID}/retry", {"params": P}),
    ("POST", f"/api/sessions/{SID}/continue", {"params": P}),
    ("POST", f"/api/sessions/{SID}/narrate", {"params": P}),
    ("POST", f"/api/sessions/{SID}/suggest", {"params": P}),
    ("POST", f"/api/sessions/{SID}/stop", None),
    ("POST", f"/api/sessions/{SID}/revert", {"turn": 4}),
    ("POST", f"/api/sessions/{SID}/select", {"turn": 1, "index": 0}),
    ("POST", f"/api/sessions/{SID}/rag", {"text": "facts"}),
    ("PATCH", f"/api/sessions/{SID}/messages/0", {"text": "edited"}),
    ("PATCH", f"/api/sessions/{SID}/settings", {"temperature": 0.0, "user_name": "U", "budget": 512, "max_tokens": 2}),
    ("PATCH", f"/api/sessions/{SID}", {"name": "renamed", "system_prompt": "Be brief."}),
    ("PUT", f"/api/sessions/{SID}/lorebook", {"lorebook": {"entries": {"0": {"key": ["a"], "content": "b"}}}}),
    ("PUT", f"/api/sessions/{SID}/avatar/user", {"image": TINY_PNG}),
    ("GET", f"/api/sessions/{SID}/messages/1/tokens", None),
    ("GET", f"/api/sessions/{SID}/export?format=jsonl", None),
    ("POST", "/api/sessions/import", {"data": [{"user_name": "U"}, {"is_user": True, "mes": "hi"}], "name": "imp"}),
    ("POST", "/api/cards/inspect", {"card": {"name": "C", "description": "d"}, "user_name": "U"}),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, "stop": ["q"]},
    ),
    ("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 2, "temperature": 0}),
    ("GET", "/v1/models", None),
    ("GET", "/api/info", None),
    ("GET", "/api/sessions", None),
    # llama-server's endpoints (server/routes_llama.py, routes_tokenize.py)
    (
        "POST",
        "/completion",
        {
            "prompt": "Once",
            "n_predict": 2,
            "temperature": 0.0,
            "top_k": 5,
            "stop": ["x"],
            "n_probs": 1,
            "seed": 1,
            "logit_bias": [[5, 1.0]],
            "dry_sequence_breakers": ["\n"],
        },
    ),
    ("POST", "/completion", {"prompt": [1, 2, 3], "n_predict": 2, "stream": True, "grammar": 'root ::= "a"'}),
    ("POST", "/completion", {"prompt": "Once", "n_predict": 2, "json_schema": {"type": "integer"}}),
    ("POST", "/completion", {"prompt": "Once", "n_predict": 2, "logit_bias": {"5": -1.0}}),
    ("POST", "/tokenize", {"content": "hello <|im_start|>", "add_special": True, "with_pieces": True}),
    ("POST", "/detokenize", {"tokens": [1, 2, 3]}),
    ("POST", "/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/slots/0?action=save", {"filename": "f1"}),
    ("POST", "/slots/0?action=restore", {"filename": "f1"}),
    ("POST", "/slots/1?action=erase", None),
    ("GET", "/props", None),
    ("GET", "/slots", None),
    ("GET", "/tokenizer_info", None),
]
QUERIES: list[tuple[str, str]] = [  # (class, path) with a bad path or query value, for the llama-server endpoints
    ("slot id huge", "/slots/99999999999999999999999?action=save"),
    ("slot id negative", "/slots/-1?action=save"),
    ("slot id text", "/slots/abc?action=save"),
    ("slot id float", "/slots/1.5?action=save"),
    ("slot id surrogate", "/slots/%ED%A0%80?action=save"),
    ("slot action unknown", "/slots/0?action=delete"),
    ("slot action surrogate", "/slots/0?action=%ED%A0%80"),
    ("slot action huge", "/slots/0?action=" + "a" * 60_000),
    ("slot action missing", "/slots/0"),
]
NUMBERS: list[Any] = [
    *(float("nan"), float("inf"), -float("inf"), 1e-300, 1e300, 1e308, -1, -2, 0, 10**18, 2**70, 0.5, True, "7"),
]
BIG = 5_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(d: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_util import tiny_llama, write_gguf  # the tests' random tiny Llama writer

    path = d / "tiny.gguf"
    write_gguf(path, tiny_llama(seed=3, max_position_embeddings=4096))
    return path


def paths(v: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every (path, value) in a JSON value, containers included."""
    yield prefix, v
    if isinstance(v, dict):
        for k, x in v.items():
            yield from paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from paths(x, (*prefix, i))


def put(body: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    b = copy.deepcopy(body)
    if not path:
        return value
    t = b
    for k in path[:-1]:
        t = t[k]
    if delete:
        del t[path[-1]]
    else:
        t[path[-1]] = value
    return b


def mutations(body: Any) -> Iterator[tuple[str, Any]]:
    """(class, mutated body) for one valid body."""
    for path, v in paths(body):
        if not path:
            continue
        where = ".".join(map(str, path))
        if isinstance(v, str):
            yield f"surrogate {where}", put(body, path, v + "\ud800")
            yield f"lone low surrogate {where}", put(body, path, "\udfff")
            yield f"5MB string {where}", put(body, path, "x" * BIG)
            yield f"NUL {where}", put(body, path, "a\x00b")
            yield f"empty string {where}", put(body, path, "")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            for n in NUMBERS:
                yield f"number {n!r} {where}", put(body, path, n)
        if isinstance(v, list):
            yield f"1000 items {where}", put(body, path, ["s"] * 1000)
        yield f"null {where}", put(body, path, None)
        yield f"list {where}", put(body, path, [1, 2])
        yield f"object {where}", put(body, path, {"a": 1})
        if isinstance(path[-1], str):
            yield f"missing {where}", put(body, path, None, delete=True)
    if isinstance(body, dict):
        yield "unknown field", {**body, "zzz\ud800": 1}
        if "settings" in body:
            yield "budget 2**20", {**body, "settings": {"budget": 1048576}}
        if "params" in body:
            yield "max_tokens 1e9", put(body, ("params",), {"max_tokens": 10**9})
        if "max_tokens" in body:
            yield "max_tokens 1e9", {**body, "max_tokens": 10**9}
        if "stop" in body:
            yield "1000 stop strings", {**body, "stop": ["s"] * 1000}
    yield "not an object", [1, 2, 3]
    yield "string body", "hello"


def raw_answers(port: int, data: bytes, chunk: int = 1 << 20) -> list[int]:
    """Send `data` on a fresh connection (in pieces of `chunk` bytes) and read until the server closes it: the
    status of each answer, in order ([] when none came)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sk:
        try:
            for i in range(0, len(data), chunk):
                sk.sendall(data[i : i + chunk])
        except OSError:
            pass
        try:
            while piece := sk.recv(65536):
                got += piece
        except OSError:
            pass
    return [int(a[:3]) for a in got.split(b"HTTP/1.1 ")[1:] if a[:3].isdigit()]


def head(*lines: str, close: bool = True) -> bytes:
    """A GET /health request with these header lines."""
    return (
        "\r\n".join(["GET /health HTTP/1.1", "Host: 127.0.0.1", *lines, *(["Connection: close"] if close else [])])
        + "\r\n\r\n"
    ).encode("latin-1")


def head_cases(max_head: int = 64 << 10) -> list[tuple[str, bytes, int, list[int]]]:
    """(class, bytes, chunk, the statuses expected) of request heads around serve's --max-header-kb bound (the URL
    and each header line, "name: value" + CRLF, counted; one line at most 32 KiB)."""
    fixed = len("/health") + (4 + 4 + 9) + (10 + 5 + 4)  # URL, Host, Connection
    n = 24  # lines of "X-Pad-NN: " + value, each under the 32 KiB bound of one line
    per = (max_head - fixed) // n
    pads = [f"X-Pad-{i:02d}: " + "p" * (per - 12 - 4) for i in range(n)]
    short = max_head - fixed - sum(len(x) - 2 + 4 for x in pads)  # counted: name + value + 4
    at = [*pads, "X-Last: " + "q" * (short - 6 - 4)]
    over = [*pads, "X-Last: " + "q" * (short - 6 - 4 + 1)]
    return [
        ("head exactly at the bound", head(*at), 1 << 20, [200]),
        ("head one byte over the bound", head(*over), 1 << 20, [431]),
        ("head at the bound, 1-byte packets", head(*at), 1, [200]),
        ("head over the bound, 7-byte packets", head(*over), 7 << 10, [431]),
        ("one line split across packets", head("X-Split: " + "s" * 40_000), 1000, [431]),
        ("8000 tiny headers", head(*[f"a{i}: b" for i in range(8000)]), 1 << 20, [431]),
        ("non-ASCII header value (UTF-8)", head("X-U: caf\u00c3\u00a9"), 1 << 20, [200]),
        ("latin-1 byte in a header value", head("X-U: \u00ff\u00fe"), 1 << 20, [200]),
        ("obs-fold header line", head("X-A: a", "  folded"), 1 << 20, [400]),
        ("NUL in a header value", head("X-A: a\x00b"), 1 << 20, [400]),
        (
            "pipelined: a request, then a head over",
            head(close=False) + head("X-Big: " + "a" * 40_000),
            1 << 20,
            [200, 431],
        ),
    ]


class Sweep:
    def __init__(self, url: str, verbose: bool, timeout: float = 120.0, only: tuple[str, ...] = ()):
        self.only = only  # path prefixes: only the endpoints whose path starts with one (empty: all)
        self.c = httpx.Client(base_url=url, timeout=timeout)
        self.url, self.verbose = url, verbose
        self.counts: Counter = Counter()
        self.five: list[str] = []
        self.changed: list[str] = []
        self.by_class: Counter = Counter()
        self.cut: tuple[int, int] | None = None  # (requests cut halfway, KV bytes still reserved after them)

    def state(self, sid: str) -> Any:
        try:
            r = self.c.get(f"/api/sessions/{sid}")
        except httpx.HTTPError as e:
            return f"unreachable: {type(e).__name__}"
        if r.status_code != 200:
            return r.status_code
        h = r.json()
        return (h["name"], h["system_prompt"], h["settings"], [(m["kind"], m["alternatives"]) for m in h["messages"]])

    def send(self, what: str, method: str, path: str, content: bytes | Any = b"", headers: dict | None = None) -> None:
        hdr = {"Content-Type": "application/json", **(headers or {})}
        before = self.state(SID)
        try:
            r = self.c.request(method, path, content=content, headers=hdr)
            status, text = r.status_code, r.text
        except httpx.HTTPError as e:  # a reset connection or a timeout counts as a failure of the server
            status, text = 599, f"{type(e).__name__}: {e}"
        stream = status != 599 and "text/event-stream" in r.headers.get("content-type", "")
        if status < 400 and stream and '"server_error"' in text:
            status = 500  # an error event inside a stream, from the server
        if status == 201 and path in ("/api/sessions", "/api/sessions/import"):  # removed: the next one can be made
            self.c.delete(f"/api/sessions/{r.json()['id']}")
        self.counts["tried"] += 1
        self.counts[f"{status // 100}xx"] += 1
        self.by_class[(what.split(" ")[0], status)] += 1
        if status >= 500:
            self.five.append(f"{status} {method} {path} [{what}]: {text[:200]}")
        after = self.state(SID) if status >= 400 else before
        if after != before:
            self.changed.append(f"{SID} changed by {method} {path} [{what}] -> {status}: {str(after)[:300]}")
        if self.verbose:
            print(status, method, path, what[:80], text[:120].replace("\n", " "), flush=True)
        try:
            healthy = self.c.get("/health").status_code == 200
        except httpx.HTTPError:
            healthy = False
        if not healthy:
            self.five.append(f"/health failed after {method} {path} [{what}]")

    def run(self, limit: int) -> None:
        c = self.c
        assert c.post("/api/sessions", json={"id": SID, "settings": {"max_tokens": 2, "temperature": 0}}).is_success
        assert c.post("/api/sessions", json={"id": "witness"}).is_success
        for t in ("one", "two"):
            c.post(f"/api/sessions/{SID}/messages", json={"text": t}).read()
        c.post("/api/sessions/witness/messages", json={"text": "I stay", "params": P}).read()
        witness = self.state("witness")
        n = 0
        for method, path, body in ENDPOINTS:
            if self.only and not path.startswith(self.only):
                continue
            sent: list[tuple[str, bytes]] = []
            if body is not None:
                sent += [(w, json.dumps(b).encode()) for w, b in mutations(body)]  # ensure_ascii: \ud800 escapes
            if method == "GET" or body is None:  # bodies are ignored there: only the header classes below
                sent = []
            else:
                sent += [
                    ("malformed JSON", b"{not json"),
                    ("invalid UTF-8", b'{"text": "\xff\xfe"}'),
                    ("deep nesting", b"[" * 60 + b"]" * 60),
                    ("very deep nesting", b"[" * 100_000 + b"]" * 100_000),
                    ("empty", b""),
                ]
            for what, content in sent:
                if limit and n >= limit:
                    return
                self.send(what, method, path, content)
                n += 1
            valid = json.dumps(body).encode() if body is not None else b""
            self.send("text/plain", method, path, valid, {"Content-Type": "text/plain"})
            self.send("form", method, path, valid, {"Content-Type": "application/x-www-form-urlencoded"})
            self.send("cross-site origin", method, path, valid, {"Origin": "http://evil.example"})
            self.send("foreign host", method, path, valid, {"Host": "evil.example"})
            for size in (70_000, 200_000, 2_000_000):
                self.send(f"header of {size} bytes", method, path, valid, {"X-Junk": "a" * size})
            self.send("wrong method", "PUT", path, valid)
            for bad in ("nope", "a.b", "x" * 65, "%00"):
                if SID in path:
                    self.send(f"session id {bad[:8]}", method, path.replace(SID, bad), valid)
            if method == "POST" and path.startswith("/v1/chat"):
                for bad in ("a.b", "x" * 65, "new-one\\"):
                    self.send(f"X-Session-Id {bad[:8]}", method, path, valid, {"X-Session-Id": bad})
        for what, path in QUERIES:
            if not self.only or path.startswith(self.only):
                self.send(what, "POST", path, json.dumps({"filename": "f2"}).encode())
        self.send("17 MB with Content-Length", "POST", "/api/sessions", b" " * (17 << 20))
        self.send("17 MB chunked", "POST", "/api/sessions", (b" " * (1 << 20) for _ in range(17)))
        if not self.only:
            self.heads()
            self.cut_requests()
        if self.state("witness") != witness:
            self.changed.append("witness changed")

    def heads(self) -> None:
        """Raw request heads around the --max-header-kb bound (a wrong answer counts as a 5xx)."""
        port = int(self.url.rsplit(":", 1)[1])
        for what, data, chunk, want in head_cases():
            before = self.state(SID)
            got = raw_answers(port, data, chunk)
            status = got[-1] if got else 599
            self.counts["tried"] += 1
            self.counts[f"{status // 100}xx"] += 1
            self.by_class[(what.split(" ")[0], status)] += 1
            if got != want:
                self.five.append(f"raw head [{what}]: answers {got}, expected {want}")
            if self.state(SID) != before:
                self.changed.append(f"{SID} changed by a raw head [{what}]")
            if self.verbose:
                print(got, "raw head", what, flush=True)

    def cut_requests(self, n: int = 16) -> None:
        """n generating requests at once (anonymous /v1 and /completion, /suggest on the target), most cut by their
        client halfway; afterwards /metrics' infinichat_kv_reserved_bytes must be 0 and the target unchanged."""
        import threading

        before = self.state(SID)
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
        kinds = [
            ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 100, "stream": True}),
            ("/v1/chat/completions", {**chat, "stream": True}),
            ("/completion", {"prompt": "Once", "n_predict": -1, "stream": True}),
            (f"/api/sessions/{SID}/suggest", {"params": {"max_tokens": 40}}),
        ]

        def one(i: int) -> None:
            path, body = kinds[i % len(kinds)]
            try:
                if i % 3 == 2:  # not waiting for the answer
                    httpx.post(self.url + path, json={**body, "stream": False}, timeout=0.05)
                    return
                with httpx.Client(base_url=self.url, timeout=60) as c, c.stream("POST", path, json=body) as r:
                    for _ in r.iter_lines():
                        break  # cut after the first line
            except httpx.HTTPError:
                pass

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        left = -1
        for _ in range(100):  # the gauge is a snapshot taken between the worker's rounds
            self.c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            lines = self.c.get("/metrics").text.splitlines()
            gauge = next((x for x in lines if x.startswith("infinichat_kv_reserved_bytes")), None)
            if gauge is None:  # a server from before the gauge
                self.five.append("/metrics has no infinichat_kv_reserved_bytes")
                break
            left = int(gauge.split()[1])
            if left == 0:
                break
            time.sleep(0.1)
        self.counts["tried"] += n
        self.cut = (n, left)
        if left:
            self.five.append(f"{left} KV bytes still reserved after {n} requests cut halfway")
        if self.state(SID) != before:
            self.changed.append(f"{SID} changed by a /suggest cut halfway")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: a tiny random Llama written for the run)")
    ap.add_argument("--max", type=int, default=0, help="stop after this many mutated bodies (0 = all)")
    ap.add_argument("--verbose", action="store_true", help="print each request's status, class and answer")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request; a timeout counts as 5xx")
    ap.add_argument("--only", default="", help="comma-separated path prefixes: sweep only those endpoints")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model = args.model or str(tiny_model(Path(d)))
        port = free_port()
        cmd = [sys.executable, "-m", "infinichat", "serve", "--model", model, "--port", str(port)]
        cmd += ["--data-dir", f"{d}/data", "--budget", "256", "--threads", "1", "--kv-cap-mb", "64"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    print(proc.stdout.read() if proc.stdout else "", file=sys.stderr)
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            t0 = time.monotonic()
            sweep = Sweep(url, args.verbose, args.timeout, tuple(o for o in args.only.split(",") if o))
            sweep.run(args.max)
            alive = proc.poll() is None and httpx.get(f"{url}/health", timeout=10).status_code == 200
        finally:
            proc.terminate()
            proc.wait(30)
    c = sweep.counts
    print(f"bad-input sweep: {len(ENDPOINTS)} endpoints, {time.monotonic() - t0:.0f} s")
    resets = sum(n for (_, s), n in sweep.by_class.items() if s == 599)
    print(
        f"tried {c['tried']}: 2xx {c['2xx']}, 4xx {c['4xx']}, 5xx {c['5xx']} "
        f"(of which connection reset or timeout: {resets})"
    )
    print(f"sessions changed by a failed request: {len(sweep.changed)}; server alive at the end: {alive}")
    if sweep.cut is not None:
        print(f"requests cut halfway: {sweep.cut[0]}; KV bytes still reserved after them: {sweep.cut[1]}")
    statuses: Counter = Counter()
    for (_, s), n in sweep.by_class.items():
        statuses[s] += n
    print("statuses:", ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    for line in sweep.five + sweep.changed:
        print("  ", line)
    return 0 if not sweep.five and not sweep.changed and alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
