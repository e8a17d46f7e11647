"""The llama-server endpoints (server/routes_llama.py), scripted as a llama-server user would with plain HTTP:
/completion (n_predict, stream, cache_prompt, n_probs, sampling fields, grammar / json_schema), /props, /slots,
/apply-template."""

from __future__ import annotations

import json
import os

import httpx
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def test_completion_like_llama_server(http):
    body = {"prompt": "Once upon a time", "n_predict": 8, "temperature": 0, "n_probs": 2}
    r = http.post("/completion", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["stop"] is True and d["tokens_predicted"] == len(d["completion_probabilities"]) <= 8
    assert d["stop_type"] in ("limit", "eos") and d["tokens_evaluated"] > 0 and d["content"]
    assert all(len(p["top_logprobs"]) == 2 and "token" in p for p in d["completion_probabilities"])
    again = http.post("/completion", json=body).json()
    assert again["content"] == d["content"] and again["tokens_cached"] == d["tokens_evaluated"] - 1  # cache_prompt
    cold = http.post("/completion", json={**body, "cache_prompt": False}).json()
    assert cold["content"] == d["content"] and cold["tokens_cached"] == 0
    # streaming: data lines with content, the last with stop and the totals
    with http.stream("POST", "/completion", json={**body, "stream": True}) as s:
        lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ")]
    assert "".join(x["content"] for x in lines) == d["content"] and lines[-1]["stop"] is True
    assert all(x["stop"] is False for x in lines[:-1])


def test_stop_type_tells_word_limit_and_eos_apart(http):
    """llama-server's stop_type: "word" when a stop string ended the text (named in stopping_word), "limit" at
    n_predict, "eos" at the end of generation."""
    body = {"prompt": "Once upon a time", "n_predict": 12, "temperature": 0}
    full = http.post("/completion", json=body).json()
    assert full["stop_type"] == "limit" and full["stopping_word"] == "" and len(full["content"]) > 3
    word = full["content"][2:4]  # a stop string the greedy text holds
    cut = http.post("/completion", json={**body, "stop": [word]}).json()
    assert cut["stop_type"] == "word" and cut["stopping_word"] == word
    assert cut["content"] == full["content"][: full["content"].index(word)]
    with http.stream("POST", "/completion", json={**body, "stop": [word], "stream": True}) as r:
        last = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")][-1]
    assert last["stop"] is True and last["stop_type"] == "word" and last["stopping_word"] == word
    eos_id = http.get("/tokenizer_info").json()["eos_token_id"]
    eos = http.post("/completion", json={**body, "stop": [word], "logit_bias": {str(eos_id): 100}}).json()
    assert eos["stop_type"] == "eos" and eos["stopping_word"] == "" and eos["content"] == ""


def test_completion_sampling_and_grammar(http):
    seeded = {"prompt": "Hello", "n_predict": 10, "temperature": 1.0, "seed": 9, "top_k": 5}
    assert (
        http.post("/completion", json=seeded).json()["content"]
        == http.post("/completion", json=seeded).json()["content"]
    )
    g = http.post("/completion", json={**seeded, "n_predict": 40, "grammar": 'root ::= ("ab" | "cd") "!"'}).json()
    assert g["content"] in ("ab!", "cd!")
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    j = http.post("/completion", json={**seeded, "n_predict": 40, "json_schema": schema}).json()
    assert isinstance(json.loads(j["content"])["n"], int)
    unbounded = http.post(
        "/completion",
        json={"prompt": "Hi", "n_predict": -1, "temperature": 0, "logit_bias": [[268, False], [270, False]]},
    )
    assert unbounded.status_code == 200 and unbounded.json()["stop_type"] == "limit"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "id_slot": 0}, "id_slot"),
        ({"prompt": "x", "n_predict": 0}, "n_predict"),
        ({"prompt": "x", "mirostat": 2}, "mirostat"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "x", "grammar": "root ::= ("}, "grammar"),
        ({"prompt": "x", "n_probs": 99}, "n_probs"),
        ({"prompt": "x", "n_predict": 10**9}, "n_predict"),
    ],
)
def test_completion_bad_input_is_400(http, body, param):
    r = http.post("/completion", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_props_slots_apply_template(http, tiny_chat_model):
    p = http.get("/props").json()
    # llama-server's model_path is the model file; the id clients send as `model` is its alias
    assert p["model_path"] == str(tiny_chat_model.path.resolve()) and p["model_path"].endswith("tiny.gguf")
    assert p["model_alias"] == http.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"
    assert p["default_generation_settings"]["n_ctx"] > 0
    assert p["eos_token"] == tiny_chat_model.tokenizer.eos_token
    http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"X-Session-Id": "slotted"},
    )
    slots = http.get("/slots").json()
    mine = [s for s in slots if s["id_session"] == "slotted"]
    assert mine and mine[0]["n_past"] > 0 and mine[0]["is_processing"] is False
    assert [s["id"] for s in slots] == list(range(len(slots)))
    msgs = [{"role": "user", "content": "hi"}]
    t = http.post("/apply-template", json={"messages": msgs}).json()["prompt"]
    assert t == tiny_chat_model.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)


def test_slot_save_restore_erase(http):
    chat = "/v1/chat/completions"
    kw = {"max_tokens": 3, "temperature": 0}
    first = [{"role": "user", "content": "Remember the number seven."}]
    http.post(chat, json={"messages": first, **kw}, headers={"X-Session-Id": "keep"})
    slot = next(s for s in http.get("/slots").json() if s["id_session"] == "keep")
    before = http.get("/api/sessions/keep").json()
    saved = http.post(f"/slots/{slot['id']}?action=save", json={"filename": "keep-1"}).json()
    assert saved["n_saved"] == slot["n_past"] > 0 and saved["filename"] == "keep-1"
    # the session moves on, then comes back to the saved state (cache from the snapshot)
    more = [*first, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "And eight."}]
    http.post(chat, json={"messages": more, **kw}, headers={"X-Session-Id": "keep"})
    assert len(http.get("/api/sessions/keep").json()["messages"]) > len(before["messages"])
    back = http.post(f"/slots/{slot['id']}?action=restore", json={"filename": "keep-1"})
    assert back.status_code == 200 and back.json()["n_restored"] == slot["n_past"], back.text
    after = http.get("/api/sessions/keep").json()
    assert [m["text"] for m in after["messages"]] == [m["text"] for m in before["messages"]]
    again = http.post(chat, json={"messages": first, **kw, "seed": 1}, headers={"X-Session-Id": "keep"})
    assert again.status_code == 200
    erased = http.post(f"/slots/{slot['id']}?action=erase").json()
    assert erased["n_erased"] > 0
    assert http.get("/api/sessions/keep").json()["messages"]  # the transcript stays
    for q, body, status in [
        ("action=save", {"filename": "../x"}, 400),
        ("action=restore", {"filename": "nothing"}, 404),
        ("action=fly", {"filename": "a"}, 400),
    ]:
        assert http.post(f"/slots/{slot['id']}?{q}", json=body).status_code == status, q
    assert http.post("/slots/999?action=erase").status_code == 404


@pytest.mark.parametrize("name", [b"tiny.gguf", b"t\xffiny.gguf"])  # a name that is not UTF-8: /props was a 500
def test_props_model_path_of_serve(tmp_path, name):
    """`infinichat serve --model FILE` (build_app): /props names the file it loaded, the id stays the alias."""
    from fastapi.testclient import TestClient
    from gguf_util import tiny_llama, write_gguf

    from infinichat.cli.main import build_parser
    from infinichat.server.app import build_app, check_serve_options

    model = tmp_path / os.fsdecode(name)
    write_gguf(model, tiny_llama(seed=3, max_position_embeddings=4096))
    argv = ["serve", "--threads", "1", "--model", str(model), "--dtype", "float32"]
    args = build_parser().parse_args([*argv, "--cache-dir", str(tmp_path / "c"), "--data-dir", str(tmp_path / "d")])
    app, _ = build_app(args, check_serve_options(args))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        p = c.get("/props").json()
        assert p["model_path"] == str(model.resolve()).replace("\udcff", "\ufffd")
        assert p["model_alias"] == c.get("/v1/models").json()["data"][0]["id"] != p["model_path"]
