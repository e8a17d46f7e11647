"""A ready chat API from a config file: `ChatAPI.from_config("configs/omnikv.toml")`.

    from infinichat.api import ChatAPI
    api = ChatAPI.from_config("configs/omnikv.toml")
    api.chat([{"role": "user", "content": "Hello!"}])          # -> str
    for text in api.stream([{"role": "user", "content": "Hi"}]):
        print(text, end="")

The file is read as `infinichat chat --config FILE` reads it (model, backend, dtype, quant, threads, ctx,
[sampling]; config_file.py); its `[policy]` section gives the KV policy (one name), its budget and its
parameters. Each call is one stateless conversation (the messages are rendered with the model's chat template
and evaluated in a new KV sequence): a policy that drops tokens holds at most `budget` tokens (the prompt
streams through it), a selecting policy (omnikv) keeps everything and selects `budget` tokens per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from infinichat.engine.base import Engine
from infinichat.engine.sampling import SamplingParams
from infinichat.errors import InfinichatError
from infinichat.model.tokenizer import Tokenizer

Message = Mapping[str, str]


class ChatAPI:
    """`chat(messages) -> text` and `stream(messages) -> text chunks` on one loaded engine."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        sampling: SamplingParams,
        policy: str = "streaming",
        budget: int | None = None,
        params: Mapping[str, Any] | None = None,
        name: str = "",
    ):
        from infinichat.eval.runner import PolicyRun, policy_class, selection_budget_field

        cls = policy_class(policy)
        if budget is not None and budget < 1:
            raise InfinichatError(f"the policy budget must be a positive number of tokens, got {budget}")
        sampling.validate()
        self.engine, self.tokenizer, self.sampling, self.name = engine, tokenizer, sampling, name
        no_budget = not cls.drops_tokens and selection_budget_field(cls) is None
        self.run = PolicyRun(policy, dict(params or {}), tokens=None if no_budget else budget)

    @classmethod
    def from_config(cls, path: str | Path, args: Sequence[str] = (), **overrides: Any) -> ChatAPI:
        """Load the model and settings of a config file. `args`: `infinichat chat` options that override the
        file (["--model", "x.gguf", "--threads", "2"]); `overrides`: sampling fields (temperature=0.0, ...)."""
        from infinichat.cli.commands import load_engine, sampling_params
        from infinichat.cli.main import build_parser
        from infinichat.config_file import load, namespace
        from infinichat.eval.runner import parse_policies, policy_params

        ns = namespace(path, "chat", args)
        section = load(path, build_parser()).policy
        names = parse_policies(ns.policy or "streaming")  # the file's, or --policy; unknown names list the registry
        if len(names) > 1:
            raise InfinichatError(f"--config {path}: a chat API takes one policy, got {', '.join(names)}")
        policy = names[0]
        items = [f"{k}={_text(v)}" for k, v in section.params.items()] if policy in section.names else []
        params = policy_params([policy], items, section.n_sink)[policy]
        sampling = replace(sampling_params(ns), **overrides) if overrides else sampling_params(ns)
        tok, name, engine = load_engine(ns, n_ctx=ns.ctx or None)
        budget = ns.ctx or section.budget or None  # --ctx on the command line wins
        return cls(engine, tok, sampling, policy, budget, params, name)

    def _ids(self, messages: Sequence[Message]) -> list[int]:
        if not messages or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
            raise InfinichatError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        text = self.tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True)
        return self.tokenizer.encode(text, add_bos=self.tokenizer.add_bos)

    def stream(self, messages: Sequence[Message], **sampling: Any) -> Iterator[str]:
        """The reply's text as it is generated (never half a UTF-8 character)."""
        from infinichat.engine.textgen import stream_text
        from infinichat.eval.runner import new_sequence

        params = replace(self.sampling, **sampling) if sampling else self.sampling
        params.validate()
        ids = self._ids(messages)
        seq, _ = new_sequence(self.engine, self.run, len(ids), params.max_tokens)
        for chunk in stream_text(self.engine, self.tokenizer, seq, ids, params):
            if chunk.text:
                yield chunk.text

    def chat(self, messages: Sequence[Message], **sampling: Any) -> str:
        """The whole reply."""
        return "".join(self.stream(messages, **sampling))


def _text(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return str(v).lower() if isinstance(v, bool) else str(v)
