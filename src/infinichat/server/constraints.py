"""What a request may impose on the tokens, checked once for every API: `logit_bias` (OpenAI's {"token id": bias}
or llama.cpp's [[id, bias]]) and the grammar of the output (`response_format` json_object / json_schema,
llama.cpp's `grammar` (GBNF) or `json_schema`; at most one). The OpenAI routes, /completion and the session API's
`params` all read them here; `where` prefixes the field names in errors (the session API: "params.")."""

from __future__ import annotations

from typing import Any

from infinichat.engine.grammar import Grammar, check_grammar
from infinichat.engine.sampling import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES
from infinichat.errors import InfinichatError
from infinichat.server.errors import ApiError

GRAMMAR_FIELDS = ("response_format", "grammar", "json_schema")


def logit_bias_of(raw: Any, vocab_size: int | None = None, where: str = "") -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias}, or llama.cpp's [[id, bias], ...] (bias false: never), as (id, bias) pairs;
    with `vocab_size`, every id must be below it."""
    if raw is None:
        return ()
    name = where + "logit_bias"
    accepted = f"an object mapping token ids to numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    if not isinstance(pairs, list) or len(pairs) > MAX_LOGIT_BIAS_ENTRIES:
        raise ApiError(400, f"{name} must be {accepted} (at most {MAX_LOGIT_BIAS_ENTRIES})", param=name)
    out = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ApiError(400, f"{name}: {pair!r:.80} is not a (token id, bias) pair; expected {accepted}", name)
        key, bias = pair
        tid = int(key) if isinstance(key, str) and key.strip().isdigit() and key.isascii() else key
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            raise ApiError(400, f"{name}: key {key!r:.80} is not a token id; expected {accepted}", param=name)
        if vocab_size is not None and tid >= vocab_size:
            raise ApiError(400, f"{name}: token id {tid} is not in [0, {vocab_size})", param=name)
        if bias is False:
            bias = -MAX_LOGIT_BIAS  # llama.cpp: the token never comes
        if (
            not isinstance(bias, (int, float))
            or isinstance(bias, bool)
            or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS
        ):
            raise ApiError(400, f"{name}: the bias {bias!r:.80} of token {tid} is not in [-100, 100]", name)
        out.append((tid, float(bias)))
    return tuple(out)


def grammar_of(response_format: Any, grammar: Any, json_schema: Any, tok, where: str = "") -> Grammar | None:
    """The grammar the output must follow, from at most one of the three fields; checked against the vocabulary
    here (a 400 if it does not compile)."""
    values = {"response_format": response_format, "grammar": grammar, "json_schema": json_schema}
    given = [n for n in GRAMMAR_FIELDS if values[n] is not None]
    if len(given) > 1:
        raise ApiError(
            400, f"give at most one of response_format, grammar and json_schema, got {given}", where + given[1]
        )
    g: Grammar | None = None
    param = where + (given[0] if given else "")
    if grammar is not None:
        if not isinstance(grammar, str):
            raise ApiError(400, f"{param} must be a GBNF grammar as a string", param)
        g = Grammar("gbnf", grammar)
    elif json_schema is not None:
        if not isinstance(json_schema, (dict, bool)):
            raise ApiError(400, f"{param} must be a JSON schema (an object)", param)
        g = Grammar.json_schema(json_schema)
    elif response_format is not None:
        g = _response_format(response_format, param)
    if g is None:
        return None
    try:
        check_grammar(g, tok)
    except InfinichatError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None
    return g


def _response_format(rf: Any, param: str) -> Grammar | None:
    if not isinstance(rf, dict):
        raise ApiError(400, f"{param} must be an object: {{type: text | json_object | json_schema, ...}}", param)
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":  # llama.cpp also reads a "schema" here
        schema = rf.get("schema")
        if schema is not None and not isinstance(schema, (dict, bool)):
            raise ApiError(400, f"{param}.schema must be a JSON schema object", param)
        return Grammar.json_object() if schema is None else Grammar.json_schema(schema)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(400, f"{param}.json_schema must be an object: {{name, schema, strict}}", param)
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, (dict, bool)):
            raise ApiError(400, f"{param}.json_schema.schema must be a JSON schema object", param)
        return Grammar.json_schema(schema)
    raise ApiError(400, f"{param}.type {kind!r:.80} is not supported; accepted: text, json_object, json_schema", param)
