"""`serve --replicas 2` on a real local Ray cluster (one per module: 2 engine replicas of 1 CPU each, a tiny
random model) over a real PostgreSQL store (pg_util.py) and a shared KV directory.

- Without --replicas, nothing of Ray is imported.
- 10 sessions x 5 turns through HTTP, concurrently: every request of a session is served by one replica (the
  X-Infinichat-Replica header), the sessions are spread over both, no turn is lost or mixed; OpenAI requests
  with the same prompt prefix go to one replica; /metrics holds each replica's series and the cluster sums.
- SIGKILL one replica's process between turns and in the middle of a reply: its sessions continue on the
  other replica with every completed turn intact (the interrupted reply is absent, as after a crash).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from gguf_util import tiny_llama, write_gguf
from pg_util import postgres  # noqa: F401  (fixture)
from server_util import events, free_port

ray = pytest.importorskip("ray", reason="Ray Serve is not installed: pip install 'infinichat[cluster]'")
HEADER = "x-infinichat-replica"
GREEDY = {"temperature": 0.0, "max_tokens": 4}


def test_single_process_serve_imports_no_ray():
    code = (
        "import sys\n"
        "from infinichat.cli.main import build_parser\n"
        "from infinichat.server import app\n"
        "args = build_parser().parse_args(['serve'])\n"
        "assert args.replicas is None and args.ray_address is None\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_replicas_get_the_worker_options(tmp_path):
    """`serve --replicas N` hands every replica the worker's options (each replica builds its app from them)."""
    from infinichat.cli.main import build_parser
    from infinichat.server.cluster import replica_options

    argv = ["serve", "--replicas", "2", "--max-batch", "3", "--prefill-chunk", "64", "--prefill-group", "5"]
    opts = replica_options(build_parser().parse_args([*argv, "--data-dir", str(tmp_path)]), {})
    assert (opts["max_batch"], opts["prefill_chunk"], opts["prefill_group"]) == (3, 64, 5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres):  # noqa: F811
    from infinichat.cli.main import build_parser
    from infinichat.server import cluster as cl
    from infinichat.session.settings import SessionSettings

    d = tmp_path_factory.mktemp("cluster")
    write_gguf(d / "tiny.gguf", tiny_llama(seed=3, max_position_embeddings=4096))
    port = free_port()
    argv = ["serve", "--replicas", "2", "--threads", "1", "--model", str(d / "tiny.gguf"), "--dtype", "float32"]
    argv += ["--cache-dir", str(d / "cache"), "--data-dir", str(d / "data"), "--port", str(port)]
    argv += ["--db", postgres.new_database(), "--kv-dir", str(d / "kv")]
    args = build_parser().parse_args(argv)
    t = time.monotonic()
    cl.start(args, SessionSettings().to_json())
    print(f"cluster started in {time.monotonic() - t:.1f} s")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield client
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def send(client: httpx.Client, sid: str, text: str) -> str:
    """One turn; the replica that served it."""
    with client.stream("POST", f"/api/sessions/{sid}/messages", json={"text": text, "params": GREEDY}) as r:
        assert r.status_code == 200, r.read()
        ev = events(r)
        assert ev[-1][0] == "done", ev[-3:]
        return r.headers[HEADER]


def history(client: httpx.Client, sid: str) -> list[tuple[str, str]]:
    r = client.get(f"/api/sessions/{sid}")
    assert r.status_code == 200, r.text
    return [(m["kind"], m["text"]) for m in r.json()["messages"]]


def new_session(client: httpx.Client) -> tuple[str, str]:
    r = client.post("/api/sessions", json={"system_prompt": "Be brief.", "settings": GREEDY})
    assert r.status_code == 201, r.text
    return r.json()["id"], r.headers[HEADER]


def replicas(client: httpx.Client) -> dict[str, dict]:
    r = client.get("/cluster")
    assert r.status_code == 200, r.text
    return {x["replica"]: x for x in r.json()["replicas"]}


def converse(client, n_sessions: int, n_turns: int) -> dict[str, tuple[list[str], list[tuple[str, str]]]]:
    """n_sessions clients at once, n_turns each: per session, the replicas that served it and its history."""
    out: dict[str, tuple[list[str], list[tuple[str, str]]]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            sid, rid = new_session(client)
            served = [rid] + [send(client, sid, f"session {i} turn {j}") for j in range(n_turns)]
            out[sid] = (served, history(client, sid))
        except BaseException as e:  # reported by the test
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    return out


def user_turns(h: list[tuple[str, str]]) -> list[str]:
    assert [k for k, _ in h] == ["user", "assistant"] * (len(h) // 2), h  # every turn has its reply
    return [t for k, t in h if k == "user"]


def test_sessions_are_pinned_and_spread(cluster):
    t = time.monotonic()
    got = converse(cluster, 10, 5)
    print(f"10 sessions x 5 turns: {time.monotonic() - t:.1f} s")
    assert len(got) == 10
    per_replica: dict[str, int] = {}
    for served, h in got.values():
        assert len(set(served)) == 1, served  # every request of a session on one replica
        per_replica[served[0]] = per_replica.get(served[0], 0) + 1
        i = user_turns(h)[0].split()[1]
        assert user_turns(h) == [f"session {i} turn {j}" for j in range(5)]  # none lost, none from another
    assert sorted(per_replica.values()) == [5, 5]  # new sessions go to the least-loaded replica
    live = replicas(cluster)
    assert set(live) == set(per_replica)
    for rid, n in per_replica.items():
        assert live[rid]["pinned"] == n

    # OpenAI requests without a session: the same prompt prefix goes where it went before
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    first = cluster.post("/v1/chat/completions", json={**body, "max_tokens": 2})
    assert first.status_code == 200, first.text
    turns = [*body["messages"], {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    longer = {**body, "messages": turns}
    for b in (body, longer):
        r = cluster.post("/v1/chat/completions", json={**b, "max_tokens": 2})
        assert r.status_code == 200 and r.headers[HEADER] == first.headers[HEADER]

    metrics = cluster.get("/metrics").text
    assert "infinichat_replicas 2" in metrics
    for rid, n in per_replica.items():
        assert f'infinichat_pinned_sessions{{replica="{rid}"}} {n}' in metrics
        assert f'infinichat_tokens_out_total{{replica="{rid}"}}' in metrics
    total = [ln for ln in metrics.splitlines() if ln.startswith("infinichat_tokens_out_total ")]
    per = [ln for ln in metrics.splitlines() if ln.startswith("infinichat_tokens_out_total{")]
    assert len(total) == 1 and float(total[0].split()[1]) == sum(float(ln.split()[1]) for ln in per) >= 50 * 4
    assert cluster.get("/health").json()["replicas"] == 2


def test_a_dead_replicas_sessions_continue_elsewhere(cluster):
    got = converse(cluster, 4, 2)
    by_replica: dict[str, list[str]] = {}
    for sid, (served, _) in got.items():
        by_replica.setdefault(served[0], []).append(sid)
    assert len(by_replica) == 2
    victim, survivor = sorted(by_replica, key=lambda r: -len(by_replica[r]))
    doomed = by_replica[victim]
    before = {sid: history(cluster, sid) for sid in doomed}

    # one of the victim's sessions is in the middle of a long reply when the replica is killed (at its first token)
    mid = doomed[0]
    pid = replicas(cluster)[victim]["pid"]
    body = {"text": "a long one", "params": {**GREEDY, "max_tokens": 1500}}
    seen: list[str] = []
    try:
        with cluster.stream("POST", f"/api/sessions/{mid}/messages", json=body) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("event: "):
                    seen.append(line[7:])
                    if line == "event: token" and seen.count("token") == 1:
                        os.kill(pid, signal.SIGKILL)
    except httpx.HTTPError:
        pass  # the connection may be cut: either way the stream ends, it does not hang
    assert "token" in seen and "done" not in seen, seen

    for sid in doomed:  # each continues on the survivor with every completed turn intact
        h = history(cluster, sid)
        if sid == mid:  # its user message was saved before the reply began; the reply is absent
            assert h[:-1] == before[sid] and h[-1] == ("user", "a long one"), h
            r = cluster.post(f"/api/sessions/{sid}/retry", json={"params": GREEDY})
            assert r.status_code == 200, r.text
            h = history(cluster, sid)
        else:
            assert h == before[sid]
        home = send(cluster, sid, "after the failover")
        assert home != victim and send(cluster, sid, "and again") == home  # pinned to its new replica
        after = history(cluster, sid)
        assert after[: len(h)] == h and len(after) == len(h) + 4
        assert [after[len(h)][1], after[len(h) + 2][1]] == ["after the failover", "and again"]
    for sid in set(got) - set(doomed):  # the survivor's own sessions never noticed
        assert send(cluster, sid, "still here") == survivor
    assert cluster.get("/cluster").json()["repins"] >= len(doomed)
    pinned = sum(x["pinned"] for x in replicas(cluster).values())
    gone = next(iter(got))
    assert cluster.delete(f"/api/sessions/{gone}").status_code == 204
    assert sum(x["pinned"] for x in replicas(cluster).values()) == pinned - 1  # its pin went with it
    assert cluster.get(f"/api/sessions/{gone}").status_code == 404


def test_sessions_survive_an_ingress_restart(cluster):
    """The ingress (and the router's table of pins in it) is killed: Ray starts a new one; every session
    continues with its turns intact and is pinned again, to one replica per session."""
    got = converse(cluster, 4, 1)
    before = {sid: history(cluster, sid) for sid in got}
    info = cluster.get("/cluster").json()
    os.kill(info["ingress_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 180
    while True:  # the proxy answers 5xx (or drops the connection) until the new ingress is up
        try:
            r = cluster.get("/cluster", timeout=10)
            if r.status_code == 200 and r.json()["ingress_pid"] != info["ingress_pid"]:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "no new ingress"
        time.sleep(1)
    for sid, h in before.items():
        assert history(cluster, sid) == h
        served = {send(cluster, sid, "after the restart"), send(cluster, sid, "once more")}
        assert len(served) == 1
        after = history(cluster, sid)
        assert after[: len(h)] == h and [after[len(h)][1], after[len(h) + 2][1]] == ["after the restart", "once more"]
