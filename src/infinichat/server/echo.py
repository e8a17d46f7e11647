"""`/v1/completions` with `echo`: the prompt comes back with its per-token logprobs (OpenAI's legacy shape),
then up to `max_tokens` generated tokens. This is how lm-evaluation-harness (`local-completions`) scores
loglikelihoods: it sends the context and continuation ids with `echo=true, logprobs=1, max_tokens=1` and
sums the continuation's `token_logprobs`.

Each prompt (a text, one list of token ids, or a batch of either) is evaluated from scratch in a sequence of
its own under the `full` policy (nothing evicted: the scores are the model's), every position's logits
kept: token i's logprob is log_softmax(logits of i - 1)[id_i]; the first token has none (null), as in
OpenAI's API. `top_logprobs` hold the `logprobs` most likely tokens at each position, as {text: logprob}.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Iterator
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse

from infinichat.engine.textgen import Generation, stream_text
from infinichat.server.errors import ApiError, error_body
from infinichat.server.openai_compat import CompletionBody, params_of
from infinichat.server.sessionops import check_max_tokens
from infinichat.server.streaming import collect, open_stream
from infinichat.session.manager import kv_bytes_per_token

MAX_ECHO_PROMPTS = 64  # prompts per request
MAX_TOP = 20  # top_logprobs per position


def prompt_list(prompt: Any) -> list[str | list[int]]:
    """`prompt` as a list of prompts: a text, a list of token ids, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


def prompt_ids(tok, prompt: str | list[int], i: int) -> list[int]:
    ids = tok.encode(prompt, add_bos=tok.add_bos, parse_special=False) if isinstance(prompt, str) else list(prompt)
    if not ids or any(not 0 <= t < tok.vocab_size for t in ids):
        raise ApiError(
            400,
            f"prompt[{i}]: a prompt must be non-empty text or a non-empty list of token ids in [0, {tok.vocab_size})",
            param="prompt",
        )
    return ids


def _top(tok, row: torch.Tensor, k: int) -> dict[str, float]:
    values, idx = torch.topk(row, k)  # (k,)
    return {tok.decode([int(t)]): float(v) for t, v in zip(idx.tolist(), values.tolist(), strict=True)}


def scored_prompt(engine, tok, ids: list[int], top: int, params, should_stop, m=None) -> Iterator[dict[str, Any]]:
    """Runs in the engine worker: the prompt's logprobs, then the generation after it (one item). With the session
    manager `m`, the sequence's KV memory (its whole capacity) is reserved first (idle caches offloaded to fit the
    cap; refused past the hard limit) and held while it lives (SessionManager.reserved)."""
    n = len(ids) + params.max_tokens + 1
    if m is None:
        yield from _score(engine, tok, engine.new_sequence(budget=n, policy="full"), ids, top, params, should_stop)
        return
    per_token = kv_bytes_per_token(engine)
    what = f"an echo prompt of {len(ids)} tokens + max_tokens {params.max_tokens}"
    with m.reserved(per_token * n, what, per_token):
        yield from _score(engine, tok, engine.new_sequence(budget=n, policy="full"), ids, top, params, should_stop)


def _score(engine, tok, seq, ids: list[int], top: int, params, should_stop) -> Iterator[dict[str, Any]]:
    lps: list[float | None] = [None]
    tops: list[dict[str, float] | None] = [None]
    if len(ids) > 1:
        logits = engine.prefill(seq, ids[:-1], all_logits=True)  # (T - 1, V): predictions of ids[1:]
        logp = torch.log_softmax(logits.float(), dim=-1)  # (T - 1, V)
        lps += logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        tops += [_top(tok, row, top) for row in logp] if top else [{} for _ in ids[1:]]
    gen, steps = Generation(), []
    if params.max_tokens > 0:
        for chunk in stream_text(
            engine, tok, seq, ids[-1:], params, history=ids[:-1], should_stop=should_stop, result=gen
        ):
            if chunk.step is not None:
                steps.append(chunk.step)
    else:
        gen.finish_reason = "length"
    yield {"ids": ids, "lps": lps, "tops": tops, "steps": steps, "text": gen.text, "done": gen.finish_reason}


def _logprobs(tok, item: dict, top: int) -> dict[str, Any]:
    pieces = [tok.decode([t]) for t in item["ids"]] + [tok.decode([s.token]) for s in item["steps"]]
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    gen_tops = [{tok.decode([t]): lp for t, lp in s.top[:top]} for s in item["steps"]]
    return {
        "tokens": pieces,
        "token_logprobs": item["lps"] + [s.logprob for s in item["steps"]],
        "top_logprobs": item["tops"] + gen_tops if top else None,
        "text_offset": offsets,
    }


async def echo_completion(request: Request, body: CompletionBody, fingerprint: str) -> JSONResponse:
    st = request.app.state
    tok = st.tokenizer
    if body.stream:
        raise ApiError(400, "echo with stream=true is not supported; use stream=false", param="stream")
    if body.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    prompts = prompt_list(body.prompt)
    if not 1 <= len(prompts) <= MAX_ECHO_PROMPTS:
        raise ApiError(400, f"prompt: give 1 to {MAX_ECHO_PROMPTS} prompts, got {len(prompts)}", param="prompt")
    top = body.logprobs or 0
    if not 0 <= top <= MAX_TOP:
        raise ApiError(400, f"logprobs must be in [0, {MAX_TOP}], got {body.logprobs}", param="logprobs")
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if asked == 0:  # the prompt's logprobs only (OpenAI accepts max_tokens=0 with echo)
        body = body.model_copy(update={"max_tokens": 1, "max_completion_tokens": None})
    params = params_of(body, top, 16)
    if asked == 0:
        params = dataclasses.replace(params, max_tokens=0)
    budget = st.prefix_lru.budget
    ids_list = [prompt_ids(tok, p, i) for i, p in enumerate(prompts)]
    for i, ids in enumerate(ids_list):
        if len(ids) + params.max_tokens + 1 > budget:
            raise ApiError(
                400,
                f"prompt[{i}] is {len(ids)} tokens + max_tokens {params.max_tokens}; the context budget of this "
                f"server is {budget} tokens (serve --budget)",
                param="prompt",
            )
    check_max_tokens(params.max_tokens, budget, "max_tokens")

    def run(m, job):
        m.check_room()
        for ids in ids_list:
            yield from scored_prompt(st.engine, tok, ids, top, params, job.should_stop, m)

    _, items = await open_stream(st.worker, run, request=request)
    got = await collect(request, items)
    if got is None:
        return JSONResponse(error_body(499, "the client closed the request"), status_code=499)
    choices = []
    for i, (prompt, item) in enumerate(zip(prompts, got, strict=True)):
        prompt_text = prompt if isinstance(prompt, str) else tok.decode(item["ids"])
        choices.append(
            {
                "index": i,
                "text": prompt_text + item["text"],
                "finish_reason": item["done"],
                "logprobs": _logprobs(tok, item, top) if body.logprobs is not None else None,
            }
        )
    n_prompt = sum(len(x["ids"]) for x in got)
    n_gen = sum(len(x["steps"]) for x in got)
    return JSONResponse(
        {
            "id": "cmpl-" + secrets.token_hex(12),
            "object": "text_completion",
            "created": int(time.time()),
            "model": st.info["model"],
            "system_fingerprint": fingerprint,
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_gen,
                "total_tokens": n_prompt + n_gen,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        }
    )
