"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

A request with the header `X-Session-Id: <id>` runs in that session (see openai_compat.session_chat);
otherwise the longest cached token prefix of recent requests is reused."""

from __future__ import annotations

import dataclasses
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from infinichat.engine.grammar import check_grammar
from infinichat.errors import InfinichatError
from infinichat.server.echo import echo_completion, prompt_list
from infinichat.server.errors import ApiError, error_body
from infinichat.server.openai_compat import ChatBody, CompletionBody, anonymous, chat_messages, params_of, session_chat
from infinichat.server.streaming import collect, open_stream, sse, sse_response
from infinichat.server.tools import (
    call_grammar,
    check_tools,
    chosen,
    parse_calls,
    template_messages,
    template_reads_tools,
)

router = APIRouter(prefix="/v1")
DEFAULT_MAX_TOKENS = 256


def _model(info: dict) -> dict:
    return {"id": info["model"], "object": "model", "created": int(info["started"]), "owned_by": "infinichat"}


@router.get("/models")
async def models(request: Request):
    return {"object": "list", "data": [_model(request.app.state.info)]}


@router.get("/models/{model_id:path}")
async def model(model_id: str, request: Request):
    info = request.app.state.info
    if model_id not in info["aliases"]:  # the served id, or the model's label or own name
        raise ApiError(
            404, f"no model {model_id!r}; this server serves {info['model']!r}", param="model", code="model_not_found"
        )
    return _model(info)


def fingerprint(info: dict) -> str:
    """Names what produced a result: the backend and the weights' hash (a change of either changes it)."""
    return f"fp_{info['backend']}_{info.get('model_hash', '')[:10]}"


def _chat_logprobs(tok, item: dict) -> dict:
    def one(t, lp):
        return {"token": tok.decode([t]), "logprob": lp, "bytes": list(tok.token_bytes(t))}

    return {**one(item["token"], item["logprob"]), "top_logprobs": [one(t, lp) for t, lp in item["top"]]}


def _completion_logprobs(tok, items: list[dict], start: int = 0) -> dict:
    """`text_offset`: where each token's text starts in the completion's text (`start`: the text before `items`).
    A token that ends inside a UTF-8 character has no text of its own yet: it starts where the next text does."""
    toks, offsets, at = [], [], start
    for i in items:
        if i["token"] is not None:
            toks.append(i)
            offsets.append(at)
        at += len(i.get("text", ""))
    return {
        "tokens": [tok.decode([i["token"]]) for i in toks],
        "token_logprobs": [i["logprob"] for i in toks],
        "top_logprobs": [{tok.decode([t]): lp for t, lp in i["top"]} for i in toks],
        "text_offset": offsets,
    }


async def _generate(request: Request, body, kind: str):
    st = request.app.state
    tok = st.tokenizer
    if kind == "chat":
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else 0
        messages = chat_messages(body, tools=bool(body.tools))
    else:
        if body.echo:  # the prompt's logprobs (lm-evaluation-harness): server/echo.py
            return await echo_completion(request, body, fingerprint(st.info))
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        top = body.logprobs or 0
        prompts = prompt_list(body.prompt)
        if len(prompts) != 1:
            raise ApiError(
                400,
                f"prompt: exactly one prompt is supported (a batch only with echo), got {len(prompts)}",
                param="prompt",
            )
        prompt = prompts[0]
    params = params_of(body, top, DEFAULT_MAX_TOKENS, tok)
    sid = request.headers.get("x-session-id")
    if sid is not None and kind != "chat":
        raise ApiError(400, "X-Session-Id is supported on /v1/chat/completions only", param="X-Session-Id")
    tools, mode, render_extra = [], "none", {}
    if kind == "chat":
        tools, mode, params = _tools_of(body, tok, params, sid)
        if tools:
            messages = template_messages(messages)
            render_extra = {"tools": tools}

    def run(m, job):
        if sid is not None:
            return session_chat(m, sid, messages, params, job.should_stop, st.metrics)
        if kind == "chat":
            text = tok.apply_chat_template(messages, add_generation_prompt=True, **render_extra)
            ids = tok.encode(text, add_bos=tok.add_bos)
        elif isinstance(prompt, str):
            ids = tok.encode(prompt, add_bos=tok.add_bos, parse_special=False)
        else:
            if not prompt or any(not 0 <= t < tok.vocab_size for t in prompt):
                raise ApiError(
                    400, f"prompt token ids must be a non-empty list in [0, {tok.vocab_size})", param="prompt"
                )
            ids = list(prompt)
        where = "messages" if kind == "chat" else "prompt"
        return anonymous(st.engine, tok, st.prefix_lru, ids, params, job.should_stop, st.metrics, m, where)

    _, items = await open_stream(st.worker, run, session=sid, request=request)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
    obj = "chat.completion" if kind == "chat" else "text_completion"
    created, model, fp = int(time.time()), st.info["model"], fingerprint(st.info)

    def usage(d):
        return {
            "prompt_tokens": d["prompt_tokens"],
            "completion_tokens": d["completion_tokens"],
            "total_tokens": d["prompt_tokens"] + d["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": d["cached_tokens"]},
        }

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        sent = [0]  # characters of completion text streamed so far (text_offset)
        held: list[str] = []  # with tools: the reply's text, sent once its calls are parsed out

        def frame(item):
            done = "done" in item
            if kind == "chat" and mode != "none":
                if not done:
                    held.append(item["text"])
                    return ""
                content, calls = parse_calls("".join(held), tools)
                calls = calls if body.parallel_tool_calls is not False else calls[:1]
                delta: dict = {"role": "assistant", "content": content}
                if calls:
                    delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                head = {"id": rid, "object": obj + ".chunk", "created": created, "model": model}
                head["system_fingerprint"] = fp
                reason = "tool_calls" if calls else item["done"]
                out = sse(None, {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                out += sse(None, {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
                if include_usage:
                    out += sse(None, {**head, "choices": [], "usage": usage(item)})
                return out
            if kind == "chat":
                lp = body.logprobs and not done and item["token"] is not None
                choice = {
                    "index": 0,
                    "delta": {} if done else {"role": "assistant", "content": item["text"]},
                    "finish_reason": item["done"] if done else None,
                    "logprobs": {"content": [_chat_logprobs(tok, item)]} if lp else None,
                }
            else:
                choice = {
                    "index": 0,
                    "text": "" if done else item["text"],
                    "finish_reason": item["done"] if done else None,
                    "logprobs": None
                    if done or not body.logprobs or item["token"] is None
                    else _completion_logprobs(tok, [item], sent[0]),
                }
                sent[0] += 0 if done else len(item["text"])
            head = {
                "id": rid,
                "object": obj + (".chunk" if kind == "chat" else ""),
                "created": created,
                "model": model,
                "system_fingerprint": fp,
            }
            out = sse(None, {**head, "choices": [choice]})
            if done and include_usage:  # OpenAI's last chunk: no choices, the whole request's usage
                out += sse(None, {**head, "choices": [], "usage": usage(item)})
            return out

        return sse_response(items, frame, error_event=None, tail="data: [DONE]\n\n")
    got = await collect(request, items)
    if got is None:  # the client disconnected: the generation was cancelled; nobody reads this answer
        return JSONResponse(error_body(499, "the client closed the request"), status_code=499)
    done = (
        got[-1]
        if got and "done" in got[-1]
        else {"done": "stop", "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
    )
    text = "".join(i.get("text", "") for i in got if "done" not in i)
    toks = [i for i in got if "done" not in i and i["token"] is not None]
    if kind == "chat":
        lp = {"content": [_chat_logprobs(tok, i) for i in toks]} if body.logprobs else None
        message: dict = {"role": "assistant", "content": text}
        reason = done["done"]
        if mode != "none":
            content, calls = parse_calls(text, tools)
            calls = calls if body.parallel_tool_calls is not False else calls[:1]
            if calls:
                message, reason = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": lp}
    else:
        choice = {
            "index": 0,
            "text": text,
            "finish_reason": done["done"],
            "logprobs": _completion_logprobs(tok, toks) if body.logprobs is not None else None,
        }
    return JSONResponse(
        {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "system_fingerprint": fp,
            "choices": [choice],
            "usage": usage(done),
        }
    )


def _tools_of(body: ChatBody, tok, params, sid):
    """(the tools as the template reads them, the tool_choice mode, the params: constrained to one call when the
    choice requires one)."""
    if not body.tools:
        if body.tool_choice not in (None, "none") or body.parallel_tool_calls is not None:
            name = "tool_choice" if body.tool_choice not in (None, "none") else "parallel_tool_calls"
            raise ApiError(400, f"{name} needs tools", param=name)
        return [], "none", params
    if sid is not None:
        raise ApiError(400, "tools are not supported with X-Session-Id (sessions hold plain text turns)", "tools")
    if not template_reads_tools(tok.chat_template):
        raise ApiError(
            400,
            "tools: this model's chat template has no tool support (it does not read `tools`); "
            "serve a model whose template does (Qwen 2.5, Hermes, Llama 3.1, ...)",
            param="tools",
        )
    tools = check_tools(body.tools)
    mode, usable = chosen(tools, body.tool_choice)
    if mode == "required":
        if params.grammar is not None:
            raise ApiError(400, "a required tool call cannot also follow response_format or a grammar", "tool_choice")
        g = call_grammar(usable)
        try:
            check_grammar(g, tok)
        except InfinichatError as e:
            raise ApiError(400, f"tools: {e}", param="tools") from None
        params = dataclasses.replace(params, grammar=g)
    return tools, mode, params


@router.post("/chat/completions")
async def chat_completions(body: ChatBody, request: Request):
    return await _generate(request, body, "chat")


@router.post("/completions")
async def completions(body: CompletionBody, request: Request):
    return await _generate(request, body, "completion")
