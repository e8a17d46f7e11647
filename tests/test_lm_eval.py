"""lm-evaluation-harness against infinichat: the server's `/v1/completions` echo + logprobs and tokenizer endpoints
(what `local-completions` needs), and the in-process `infinichat` model, both running tiny tasks defined in
tests/data/lm_eval (local JSON, no downloads) on a tiny random model; every loglikelihood lm-eval reports is
checked against our own (one forward over context + continuation, fp32, within 1e-3 nats)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import torch

from infinichat.engine.torch_engine import TorchEngine

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import infinichat.eval.lm_harness  # noqa: E402, F401  (registers the "infinichat" model)

DATA = Path(__file__).parent / "data" / "lm_eval"
TASKS = ["infinichat_tiny_mc", "infinichat_tiny_rolling", "infinichat_tiny_gen"]
TOL = 1e-3


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    return TorchEngine(tiny_chat_model.model, tiny_chat_model.tokenizer.eos_ids)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    """The repo's task files with DATA_DIR made absolute."""
    from lm_eval.tasks import TaskManager

    d = tmp_path_factory.mktemp("tasks")
    for f in DATA.glob("*.yaml"):
        (d / f.name).write_text(f.read_text().replace("DATA_DIR", str(DATA)))
    return TaskManager(include_path=str(d), include_defaults=False)  # only these: indexing all of lm-eval's is slow


def ours(engine, ctx: list[int], cont: list[int], policy: str = "full", budget: int | None = None) -> float:
    """log P(cont | ctx): full attention in one forward (or, under a policy, the context then the continuation)."""
    if policy == "full":
        seq = engine.new_sequence(budget=len(ctx) + len(cont))
        logits = engine.prefill(seq, ctx + cont, all_logits=True)[len(ctx) - 1 : -1]  # (n, V)
    else:
        seq = engine.new_sequence(budget=budget, policy=policy)
        rows = [engine.prefill(seq, ctx)[None]]
        if len(cont) > 1:
            rows.append(engine.prefill(seq, cont[:-1], all_logits=True))
        logits = torch.cat(rows)
    lp = torch.log_softmax(logits.float(), dim=-1)
    return float(lp.gather(1, torch.tensor(cont)[:, None]).sum())


# ------------------------------------------------------------------ the server's endpoints
def test_echo_returns_each_prompt_tokens_logprob_and_top(live, engine, tiny_chat_model):
    tok = tiny_chat_model.tokenizer
    a, b = tok.encode("Once upon a time there"), tok.encode("The sea was calm")
    r = httpx.post(
        live.url + "/v1/completions",
        json={"prompt": [a, b], "echo": True, "logprobs": 3, "max_tokens": 1, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for ids, c in zip((a, b), choices, strict=True):
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and all(len(t) <= 3 for t in lp["top_logprobs"][1:])
        for i in range(1, len(ids)):
            assert abs(lp["token_logprobs"][i] - ours(engine, ids[:i], [ids[i]])) <= TOL
            assert lp["token_logprobs"][i] <= max(lp["top_logprobs"][i].values()) + 1e-6
        assert c["text"].startswith(tok.decode(ids)) and lp["tokens"][: len(ids)] == [tok.decode([t]) for t in ids]
    only = httpx.post(
        live.url + "/v1/completions",
        json={"prompt": "Once upon a time there", "echo": True, "logprobs": 0, "max_tokens": 0},
        timeout=60,
    ).json()["choices"][0]
    assert only["text"] == "Once upon a time there" and len(only["logprobs"]["token_logprobs"]) == len(a)
    assert only["logprobs"]["top_logprobs"] is None


@pytest.mark.parametrize(
    "body, match",
    [
        ({"prompt": [[1, 2], []], "echo": True}, "prompt\\[1\\]"),
        ({"prompt": [10**7], "echo": True}, "token ids in"),
        ({"prompt": "x", "echo": True, "stream": True}, "echo with stream"),
        ({"prompt": "x", "echo": True, "logprobs": 50}, "logprobs must be in"),
        ({"prompt": [[1, 2], [3]]}, "a batch only with echo"),
    ],
)
def test_bad_echo_requests_are_400(live, body, match):
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert pytest.importorskip("re").search(match, r.json()["error"]["message"])


def test_tokenize_detokenize_and_tokenizer_info(live, tiny_chat_model):
    tok = tiny_chat_model.tokenizer
    text = "Hello world<|im_end|>"
    got = httpx.post(live.url + "/tokenize", json={"content": text}).json()
    assert got == {"tokens": tok.encode(text)}  # control tokens parsed, as llama-server does
    assert httpx.post(live.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json() == got
    assert httpx.post(live.url + "/tokenize", json={"content": text, "parse_special": False}).json()["tokens"] == (
        tok.encode(text, parse_special=False)
    )
    pieces = httpx.post(live.url + "/tokenize", json={"content": "Hi there", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tok.encode("Hi there") and "".join(p["piece"] for p in pieces) == "Hi there"
    back = httpx.post(live.url + "/detokenize", json={"tokens": got["tokens"]}).json()
    assert back == {"content": tok.decode(got["tokens"]), "prompt": tok.decode(got["tokens"])}
    assert httpx.post(live.url + "/detokenize", json={"tokens": [-1]}).status_code == 400
    assert httpx.post(live.url + "/tokenize", json={}).status_code == 400
    info = httpx.get(live.url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["eos_token_id"] == tok.eos_id
    assert info["chat_template"] == tok.chat_template and info["vocab_size"] == tok.vocab_size


# ------------------------------------------------------------------ lm-eval end to end
def _check_samples(result: dict, engine, tok, policy: str = "full", budget: int | None = None) -> dict:
    """Every loglikelihood in lm-eval's logged samples against ours; returns the generations by doc."""
    gens = {}
    for s in result["samples"]["infinichat_tiny_mc"]:
        for arg, resp in zip(s["arguments"], s["resps"], strict=True):
            ctx, cont = arg[0], arg[1]
            whole, c = tok.encode(ctx + cont), tok.encode(ctx)
            want = ours(engine, c, whole[len(c) :], policy, budget)
            assert abs(float(resp[0][0]) - want) <= TOL, (ctx, cont)
    for s in result["samples"]["infinichat_tiny_rolling"]:
        ids = tok.encode(s["arguments"][0][0])
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        want = ours(engine, [prefix], ids, policy, budget)  # one window: the text fits the context
        assert abs(float(s["resps"][0][0]) - want) <= TOL * len(ids)
    for s in result["samples"]["infinichat_tiny_gen"]:
        gens[s["doc_id"]] = s["resps"][0][0]
    return gens


def test_lm_eval_local_completions_and_in_process_infinichat_agree_with_ours(
    live, engine, tiny_chat_model, task_manager
):
    tok = tiny_chat_model.tokenizer
    common = {"tasks": TASKS, "task_manager": task_manager, "log_samples": True, "bootstrap_iters": 0}
    server = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={live.url}/v1/completions,model=tiny,tokenizer_backend=remote,max_retries=1",
        **common,
    )
    local = lm_eval.simple_evaluate(model="infinichat", model_args=f"model={tiny_chat_model.path},threads=1", **common)
    assert set(server["results"]) == set(local["results"]) == set(TASKS)
    assert _check_samples(server, engine, tok) == _check_samples(local, engine, tok)  # same greedy answers too
    for task, metric in [("infinichat_tiny_mc", "acc,none"), ("infinichat_tiny_rolling", "word_perplexity,none")]:
        assert server["results"][task][metric] == pytest.approx(local["results"][task][metric], rel=1e-3)


def test_in_process_infinichat_scores_under_a_kv_policy_and_budget(engine, tiny_chat_model, task_manager):
    tok = tiny_chat_model.tokenizer
    args = f"model={tiny_chat_model.path},threads=1,policy=streaming,budget=12,n_sink=2,n_discard=4"
    got = lm_eval.simple_evaluate(
        model="infinichat",
        model_args=args,
        tasks=["infinichat_tiny_rolling"],
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    for s in got["samples"]["infinichat_tiny_rolling"]:
        ids = tok.encode(s["arguments"][0][0])
        assert len(ids) > 12  # the text outgrows the budget: streaming evicts while it is scored
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        streaming = engine.new_sequence(budget=12, policy="streaming", n_sink=2, n_discard=4)
        rows = [engine.prefill(streaming, [prefix])[None], engine.prefill(streaming, ids[:-1], all_logits=True)]
        lp = torch.log_softmax(torch.cat(rows).float(), dim=-1)
        want = float(lp.gather(1, torch.tensor(ids)[:, None]).sum())
        assert abs(float(s["resps"][0][0]) - want) <= TOL * len(ids)
        assert abs(want - ours(engine, [prefix], ids)) > 0.01  # and differs from full attention


def test_unknown_model_args_are_a_clear_error(tiny_chat_model):
    from infinichat.errors import InfinichatError
    from infinichat.eval.lm_harness import InfinichatLM

    with pytest.raises(InfinichatError, match=r"unknown \['windw'\]; accepted: .*window"):
        InfinichatLM(policy="snapkv", model=str(tiny_chat_model.path), windw=8)
