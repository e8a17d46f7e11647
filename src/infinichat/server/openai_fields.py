"""Every request field of OpenAI's /v1/chat/completions and /v1/completions, and what this server does with it:
`supported` (honoured; `test` names the test that shows it), `accepted` (takes no part in generation, by design:
said why) or `refused` (a 400 naming the field unless its value asks for nothing: `neutral`). The request models
(openai_compat.py) forbid any other field, so no field is silently ignored; tests/test_openai_fields.py walks
this list. The llama.cpp server's extensions that /v1 honours are listed too (`extension`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infinichat.server.errors import ApiError

CHAT, COMPLETIONS = "chat", "completions"
BOTH = (CHAT, COMPLETIONS)
_T = "tests/"


@dataclass(frozen=True)
class FieldRule:
    name: str
    endpoints: tuple[str, ...]
    status: str  # "supported" | "accepted" | "refused" | "extension"
    note: str
    test: str = ""  # the test that covers it ("tests/file.py::name")
    neutral: tuple[Any, ...] = (None,)  # for "refused": values that ask for nothing, accepted


FIELDS: tuple[FieldRule, ...] = (
    # --- honoured
    FieldRule(
        "messages",
        (CHAT,),
        "supported",
        "system/developer/user/assistant/tool roles, text parts; name: to the template (400 with X-Session-Id)",
        _T + "test_server.py::test_openai_client",
    ),
    FieldRule(
        "prompt",
        (COMPLETIONS,),
        "supported",
        "one string, or token ids; with echo, a batch of either",
        _T + "test_server_compat.py::test_text_offset_and_fingerprint",
    ),
    FieldRule(
        "model",
        BOTH,
        "supported",
        "the one served model answers whatever the name (as llama-server); GET /v1/models lists it",
        _T + "test_server_compat.py::test_models_by_id",
    ),
    FieldRule("max_tokens", BOTH, "supported", "", _T + "test_server.py::test_openai_client"),
    FieldRule("max_completion_tokens", BOTH, "supported", "", _T + "test_openai_fields.py::test_max_completion_tokens"),
    FieldRule(
        "temperature",
        BOTH,
        "supported",
        "0 = greedy",
        _T + "test_server_compat.py::test_stream_usage_only_with_include_usage",
    ),
    FieldRule("top_p", BOTH, "supported", "", _T + "test_openai_fields.py::test_extensions_are_honoured"),
    FieldRule(
        "n",
        BOTH,
        "supported",
        "1 only; another value is a 400",
        _T + "test_server.py::test_openai_client",
        neutral=(None, 1),
    ),
    FieldRule(
        "stream",
        BOTH,
        "supported",
        "server-sent events, [DONE] last",
        _T + "test_server_compat.py::test_stream_usage_only_with_include_usage",
    ),
    FieldRule(
        "stream_options",
        BOTH,
        "supported",
        "include_usage",
        _T + "test_server_compat.py::test_stream_usage_only_with_include_usage",
    ),
    FieldRule(
        "stop", BOTH, "supported", "up to 4 strings", _T + "test_openai_fields.py::test_stop_strings_end_the_text"
    ),
    FieldRule(
        "seed",
        BOTH,
        "supported",
        "-1 or null = random; a seeded request ignores the prefix cache",
        _T + "test_server_compat.py::test_seed_reproducible_across_cold_and_warm_prefix_cache",
    ),
    FieldRule(
        "presence_penalty", BOTH, "supported", "[-2, 2]", _T + "test_openai_fields.py::test_penalties_change_the_text"
    ),
    FieldRule(
        "frequency_penalty", BOTH, "supported", "[-2, 2]", _T + "test_openai_fields.py::test_penalties_change_the_text"
    ),
    FieldRule(
        "logit_bias",
        BOTH,
        "supported",
        "token id -> bias in [-100, 100]",
        _T + "test_structured.py::test_logit_bias_through_the_openai_client",
    ),
    FieldRule(
        "logprobs",
        BOTH,
        "supported",
        "chat: bool; completions: 0..20",
        _T + "test_server_compat.py::test_text_offset_and_fingerprint",
    ),
    FieldRule("top_logprobs", (CHAT,), "supported", "0..20, needs logprobs", _T + "test_server.py::test_openai_client"),
    FieldRule(
        "response_format",
        (CHAT, COMPLETIONS),
        "supported",
        "text, json_object, json_schema (constrained decoding)",
        _T + "test_structured.py::test_json_schema_through_the_openai_client",
    ),
    FieldRule(
        "tools",
        (CHAT,),
        "supported",
        "through the model's chat template; a 400 where it has no tool support",
        _T + "test_tools.py::test_tool_call_parsed_through_the_openai_client",
    ),
    FieldRule(
        "tool_choice",
        (CHAT,),
        "supported",
        "none, auto, required, or one named function",
        _T + "test_tools.py::test_tool_choice_named_function",
    ),
    FieldRule(
        "parallel_tool_calls",
        (CHAT,),
        "supported",
        "false: at most one call",
        _T + "test_tools.py::test_tool_call_parsed_through_the_openai_client",
    ),
    # --- no part in generation, by design
    FieldRule(
        "user",
        BOTH,
        "accepted",
        "an end-user id for OpenAI's abuse monitoring; nothing to do here",
        _T + "test_openai_fields.py::test_accepted_fields",
    ),
    FieldRule("safety_identifier", (CHAT,), "accepted", "as user", _T + "test_openai_fields.py::test_accepted_fields"),
    FieldRule(
        "metadata",
        (CHAT,),
        "accepted",
        "tags of a stored completion; nothing is stored (store is refused)",
        _T + "test_openai_fields.py::test_accepted_fields",
    ),
    FieldRule(
        "prompt_cache_key",
        (CHAT,),
        "accepted",
        "a hint for OpenAI's cache; the prefix cache needs none",
        _T + "test_openai_fields.py::test_accepted_fields",
    ),
    FieldRule(
        "service_tier", (CHAT,), "refused", "one tier only: 'auto' or 'default'", neutral=(None, "auto", "default")
    ),
    # --- refused unless asking for nothing
    FieldRule("store", (CHAT,), "refused", "completions are not stored", neutral=(None, False)),
    FieldRule("modalities", (CHAT,), "refused", "text output only", neutral=(None, ["text"])),
    FieldRule("audio", (CHAT,), "refused", "no audio output"),
    FieldRule("prediction", (CHAT,), "refused", "no predicted outputs"),
    FieldRule("reasoning_effort", (CHAT,), "refused", "not a reasoning model"),
    FieldRule("verbosity", (CHAT,), "refused", "not a reasoning model"),
    FieldRule("web_search_options", (CHAT,), "refused", "no web search"),
    FieldRule("functions", (CHAT,), "refused", "deprecated by OpenAI: use tools"),
    FieldRule("function_call", (CHAT,), "refused", "deprecated by OpenAI: use tool_choice"),
    FieldRule("best_of", (COMPLETIONS,), "refused", "one candidate per request", neutral=(None, 1)),
    FieldRule(
        "echo",
        (COMPLETIONS,),
        "supported",
        "the prompt's tokens with their logprobs (lm-evaluation-harness); not with stream",
        _T + "test_lm_eval.py::test_echo_returns_each_prompt_tokens_logprob_and_top",
    ),
    FieldRule("suffix", (COMPLETIONS,), "refused", "no insertion (fill-in-the-middle)"),
    # --- llama.cpp server's extensions honoured on /v1
    FieldRule("top_k", BOTH, "extension", "0 = off", _T + "test_openai_fields.py::test_extensions_are_honoured"),
    FieldRule("min_p", BOTH, "extension", "0 = off", _T + "test_openai_fields.py::test_extensions_are_honoured"),
    FieldRule(
        "repeat_penalty", BOTH, "extension", "1 = off", _T + "test_openai_fields.py::test_extensions_are_honoured"
    ),
    FieldRule(
        "repeat_last_n",
        BOTH,
        "extension",
        "the penalties' window",
        _T + "test_openai_fields.py::test_extensions_are_honoured",
    ),
    FieldRule("dry_multiplier", BOTH, "extension", "DRY", _T + "test_server_samplers.py"),
    FieldRule("dry_base", BOTH, "extension", "DRY", _T + "test_server_samplers.py"),
    FieldRule("dry_allowed_length", BOTH, "extension", "DRY", _T + "test_server_samplers.py"),
    FieldRule("dry_penalty_last_n", BOTH, "extension", "DRY", _T + "test_server_samplers.py"),
    FieldRule("dry_sequence_breakers", BOTH, "extension", "DRY", _T + "test_server_samplers.py"),
    FieldRule("xtc_probability", BOTH, "extension", "XTC", _T + "test_server_samplers.py"),
    FieldRule("xtc_threshold", BOTH, "extension", "XTC", _T + "test_server_samplers.py"),
    FieldRule(
        "grammar",
        BOTH,
        "extension",
        "a GBNF grammar (constrained decoding)",
        _T + "test_structured.py::test_gbnf_grammar_field",
    ),
    FieldRule(
        "json_schema",
        BOTH,
        "extension",
        "a JSON schema (constrained decoding)",
        _T + "test_structured.py::test_json_schema_field",
    ),
)


def fields_of(endpoint: str) -> dict[str, FieldRule]:
    return {f.name: f for f in FIELDS if endpoint in f.endpoints}


def refuse_unsupported(body: Any, endpoint: str) -> None:
    """A 400 naming the first refused field the request sets to something other than a neutral value."""
    for rule in fields_of(endpoint).values():
        if rule.status != "refused" or rule.name not in body.model_fields_set:
            continue
        value = getattr(body, rule.name)
        if any(value == n and type(value) is type(n) for n in rule.neutral):
            continue
        accepted = ", ".join("null" if n is None else repr(n) for n in rule.neutral)
        raise ApiError(
            400,
            f"{rule.name}={value!r} is not supported by this server ({rule.note}); "
            f"accepted: {accepted} or leave it out",
            param=rule.name,
        )
