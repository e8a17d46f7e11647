"""An in-process `infinichat` model for EleutherAI's lm-evaluation-harness: any task under a KV policy and budget.

    python -m infinichat.eval.lm_harness --model infinichat \\
        --model_args policy=streaming,budget=1024 --tasks TASKS ...

Importing this module registers the model with `lm_eval.api.registry.register_model("infinichat")`; lm-eval
0.4.x discovers no third-party models by itself (no entry points), so run it through `python -m
infinichat.eval.lm_harness` (lm-eval's own command line, with this model registered first), or import this
module before `lm_eval.simple_evaluate(model="infinichat", ...)`.

`--model_args`: `model` (a .gguf file or checkpoint folder; default: the embedded model), `backend` (torch,
llamacpp), `dtype`, `quant`, `threads`, `policy` (a registry name, default full), `budget` (tokens; a
budget-free policy ignores it, a selecting one such as omnikv takes it as its selection size), `max_length`
(rolling windows; default the trained context), `max_gen_toks`, and any parameter of the policy
(`n_sink=8`, `window=16`).

How a request is scored under the policy: the context is evaluated into a sequence of the policy and budget
(a prefill-phase policy compresses it then, so SnapKV / KVzip / Expected Attention act on the context before
the continuation is seen), then the continuation, each of its tokens predicted from what the cache holds.
`loglikelihood_rolling` scores lm-eval's disjoint rolling windows the same way; `generate_until` decodes
greedily (or with the request's temperature) until a stop string or `max_gen_toks`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: it fills an empty registry only)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from infinichat.engine.backends import load_engine
from infinichat.engine.sampling import SamplingParams
from infinichat.engine.textgen import stream_text
from infinichat.errors import InfinichatError
from infinichat.eval.runner import PolicyRun, new_sequence, parse_value, policy_class, policy_fields

log = logging.getLogger(__name__)

LOAD_ARGS = ("model", "backend", "dtype", "quant", "threads", "cache_dir", "device")


@register_model("infinichat")
class InfinichatLM(TemplateLM):
    def __init__(
        self,
        policy: str = "full",
        budget: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **kw: Any,
    ) -> None:
        super().__init__()
        load = {k: kw.pop(k) for k in LOAD_ARGS if k in kw}
        for k in ("batch_size", "max_batch_size", "device_map"):  # lm-eval's generic arguments: one at a time here
            kw.pop(k, None)
        known = policy_fields(policy_class(policy))
        unknown = sorted(k for k in kw if k not in known)
        if unknown:
            raise InfinichatError(
                f"infinichat model_args: unknown {unknown}; accepted: policy, budget, max_length, max_gen_toks, "
                f"{', '.join(LOAD_ARGS)} and the {policy} policy's {', '.join(known) or '(none)'}"
            )
        params = {k: parse_value(str(v)) for k, v in kw.items()}
        self.run = PolicyRun(policy, params, tokens=int(budget) if budget is not None else None)
        self.engine, self.tok, _, self.name = load_engine(
            load.get("backend", "torch"),
            load.get("model"),
            load.get("dtype", "float32"),
            int(load.get("threads", 0)),
            load.get("cache_dir"),
            quant=load.get("quant", "none"),
            device=load.get("device", "auto"),
        )
        self.max_length = int(max_length) if max_length else self.engine.cfg.max_position
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        add = bool(add_special_tokens) and self.tok.add_bos and self.tok.bos_id is not None
        return self.tok.encode(string, add_bos=add)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return self.name

    # ------------------------------------------------------------------ scoring
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log P(continuation | context) under the run's policy and budget, and whether it is the greedy one."""
        if not context or not continuation:
            raise InfinichatError("infinichat: a request needs a non-empty context and continuation")
        seq, _ = new_sequence(self.engine, self.run, len(context) + len(continuation), 0)
        rows = [self.engine.prefill(seq, context)[None]]  # (1, V): predicts continuation[0]
        if len(continuation) > 1:
            rows.append(self.engine.prefill(seq, continuation[:-1], all_logits=True))  # (n - 1, V)
        logp = torch.log_softmax(torch.cat(rows).float(), dim=-1)  # (n, V)
        target = torch.tensor(continuation)
        lp = logp.gather(1, target[:, None])[:, 0]  # (n,)
        return float(lp.sum()), bool((logp.argmax(dim=-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for (_ctx_text, _cont_text), ctx, cont in requests:
            room = self.max_length - len(cont)
            out.append(self.score(ctx[-room:] if room > 0 else ctx[-1:], cont))
            if self.cache_hook is not None:
                self.cache_hook.add_partial("loglikelihood", (_ctx_text, _cont_text), out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            out.append(sum(self.score(*make_disjoint_window(w))[0] for w in windows))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self.max_length - max_new) :]
            params = SamplingParams(temperature=temperature, max_tokens=max_new, stop=tuple(until))
            seq, _ = new_sequence(self.engine, self.run, len(ids), max_new)
            text = "".join(c.text for c in stream_text(self.engine, self.tok, seq, ids, params))
            for s in until:  # the stop string itself is not part of the answer
                text = text.split(s)[0]
            out.append(text)
        return out


def main() -> None:
    """lm-eval's command line, with the `infinichat` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
