"""Tokenizer endpoints: `/tokenize`, `/detokenize` (llama-server's shapes, also read by vLLM-style clients) and
`/tokenizer_info` (what lm-evaluation-harness's remote tokenizer reads).

- `POST /tokenize` `{"content": text}` (or `"prompt"`) -> `{"tokens": [ids]}`; `add_special` (or
  `add_special_tokens`): prepend BOS where the model adds one; `parse_special` (default true): control tokens
  written in the text become their ids; `with_pieces`: `{"tokens": [{"id", "piece"}]}`, a piece being the
  token's text, or its bytes as a list of ints when they are not valid UTF-8 on their own.
- `POST /detokenize` `{"tokens": [ids]}` -> `{"content": text, "prompt": text}`.
- Both run in a thread of their own (a long text does not hold up the event loop); /tokenize takes at most
  MAX_TOKENIZE_CHARS characters per request.
- `GET /tokenizer_info` -> the special tokens (text and id), the vocabulary size, the BOS policy and the chat
  template.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from infinichat.server.errors import ApiError

router = APIRouter()
MAX_TOKENIZE_CHARS = 1_000_000  # per /tokenize request (~1 s of tokenizing here); longer texts go in pieces


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str | None = None
    prompt: str | None = None
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


def _piece(tok, i: int) -> str | list[int]:
    raw = tok.token_bytes(i)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@router.post("/tokenize")
async def tokenize(body: TokenizeBody, request: Request):
    tok = request.app.state.tokenizer
    field = "content" if body.content is not None else "prompt"
    text = body.content if body.content is not None else body.prompt
    if text is None:
        raise ApiError(400, "give the text to tokenize as 'content' (or 'prompt')", param="content")
    if len(text) > MAX_TOKENIZE_CHARS:
        raise ApiError(
            400, f"{field} is {len(text)} characters; at most {MAX_TOKENIZE_CHARS} per request (split it)", field
        )
    add = body.add_special if body.add_special is not None else bool(body.add_special_tokens)

    def work() -> JSONResponse:
        bos = add and tok.add_bos and tok.bos_id is not None
        ids = tok.encode(text, add_bos=bos, parse_special=body.parse_special)
        if body.with_pieces:
            return JSONResponse({"tokens": [{"id": i, "piece": _piece(tok, i)} for i in ids]})
        return JSONResponse({"tokens": ids})

    return await asyncio.to_thread(work)  # a long text: the event loop keeps serving meanwhile


@router.post("/detokenize")
async def detokenize(body: DetokenizeBody, request: Request):
    tok = request.app.state.tokenizer
    bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
    if bad:
        raise ApiError(400, f"tokens: {bad[0]} is not a token id; accepted: 0..{tok.vocab_size - 1}", param="tokens")

    def work() -> JSONResponse:
        text = tok.decode(body.tokens)
        return JSONResponse({"content": text, "prompt": text})

    return await asyncio.to_thread(work)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    tok = request.app.state.tokenizer
    return {
        "eos_token": tok.eos_token or None,
        "eos_token_id": tok.eos_id,
        "bos_token": tok.bos_token or None,
        "bos_token_id": tok.bos_id,
        "pad_token": tok.id_to_piece(tok.pad_id) if tok.pad_id is not None else None,
        "pad_token_id": tok.pad_id,
        "add_bos_token": tok.add_bos,
        "vocab_size": tok.vocab_size,
        "chat_template": tok.chat_template,
        "model_max_length": request.app.state.prefix_lru.budget,
    }
