"""Token sampling: repetition / presence / frequency penalties, DRY, top-k, top-p, min-p, XTC, temperature, draw.

The order is llama.cpp's default chain (`common_params_sampling::samplers` in common/common.h, documented
for `--samplers` in tools/main/README.md: penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature),
without the samplers we do not have: penalties -> DRY -> top_k -> top_p -> min_p -> XTC -> temperature -> draw.
Before them, as in llama.cpp, the logit biases (OpenAI's `logit_bias`: token id -> a bias in [-100, 100] added to
its logit) and a grammar's mask (`TokenConstraint`, engine/grammar.py: the tokens it does not accept next get -inf),
so every filter works on the tokens the grammar allows; the drawn token then advances the grammar.
top_p, min_p and XTC therefore see temperature-1 probabilities of the tokens that survived the filters
before them. Ties at a cut are all kept (top_k, top_p and XTC), so a result never depends on the order of
equal logits.

DRY ("don't repeat yourself", p-e-w, text-generation-webui PR 5677; also in KoboldCpp and llama.cpp): if the
last tokens of the history repeat a sequence seen earlier in the window, the token that followed that
earlier occurrence would extend the repetition; when the matched length L >= dry_allowed_length its
logit is lowered by dry_multiplier * dry_base ** (L - dry_allowed_length) (the longest match per token).
A match never crosses a sequence breaker: a token whose text contains one of `dry_sequence_breakers`
(the strings are matched inside each vocabulary token's bytes); a breaker as the last token, or as the
token that would follow, is never penalised. The exponent is capped where the penalty would overflow
float32, as llama.cpp does. XTC ("exclude top choices", p-e-w, text-generation-webui PR 6335): with
probability xtc_probability per step, when at least two candidates have probability >= xtc_threshold,
all of them are removed except the least likely of them (ties with it kept).

Every piece is a free function on a 1-D logits tensor (`apply_penalties`, `apply_top_k`,
`apply_top_p`, `apply_min_p`) that never modifies its input. `Sampler` runs the same selections on a
shrinking candidate set (no full-vocab sort: top_k uses torch.topk, top_p sorts only the tokens near
the best) and owns the seeded `torch.Generator`. The draw is one uniform number per step (inverse
CDF), so the same seed gives the same tokens on the same device.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeGuard

import numpy as np
import torch

from infinichat.errors import InfinichatError
from infinichat.model.transfer import to_device

if TYPE_CHECKING:
    from infinichat.engine.grammar import Grammar

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
MIN_TEMPERATURE = 1e-3  # temperatures in (0, this) are refused: logits / T overflows; use 0 for greedy
MAX_SCALE = 100.0  # the largest temperature and repetition penalty (and 1 / the smallest penalty)
PENALTY_RANGE = 2.0  # presence / frequency penalties accepted in [-2, 2], as in the OpenAI API
_NO_MASS = "cannot sample: every logit is -inf or NaN after the filters"
_TOP_P_GAPS = (6.0, 12.0, math.inf)  # top_p sorts tokens within this many nats of the best, widening if < p
DRY_BREAKERS = ("\n", ":", '"', "*")  # the default sequence breakers of llama.cpp / text-generation-webui
MAX_DRY_BREAKERS = 32
MAX_BREAKER_CHARS = 64
_LOG_FLT_MAX = 88.7228  # ln(float32 max): the DRY exponent is capped so the penalty stays finite
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_LOGIT_BIAS_ENTRIES = 1024


class TokenConstraint(Protocol):
    """Which tokens may come next (a grammar, engine/grammar.py); the sampler masks the rest."""

    def allowed(self) -> torch.Tensor:
        """(V,) bool on the CPU: true for the tokens accepted next."""
        ...

    def accept(self, token: int) -> None: ...

    @property
    def done(self) -> bool:
        """Nothing more can be accepted: the generation ends here."""
        ...


@dataclass
class SamplingParams:
    temperature: float = 0.7  # 0 => greedy
    top_k: int = 0  # 0 => off
    top_p: float = 1.0  # 1 => off
    min_p: float = 0.0  # 0 => off
    repetition_penalty: float = 1.0  # logit > 0 -> logit / penalty, else logit * penalty (distinct tokens)
    repeat_last_n: int = 64  # look-back window of the three penalties; 0 => off, -1 => whole history
    presence_penalty: float = 0.0  # logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # logit -= frequency * count
    dry_multiplier: float = 0.0  # DRY penalty scale; 0 => off
    dry_base: float = 1.75  # growth of the DRY penalty per token of match beyond the allowed length
    dry_allowed_length: int = 2  # matches this long or longer are penalised
    dry_penalty_last_n: int = -1  # DRY look-back window: -1 => whole history (the cache), 0 => off
    dry_sequence_breakers: tuple[str, ...] = DRY_BREAKERS  # a token containing one of these ends a match
    xtc_probability: float = 0.0  # chance per step that XTC acts; 0 => off
    xtc_threshold: float = 0.1  # XTC removes the tokens with p >= threshold but the least likely; > 0.5 => off
    seed: int | None = None  # None => a random seed (see Sampler.seed)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0  # alternatives returned per step, 0..20
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logits first
    grammar: Grammar | None = None  # the output must match it (constrained decoding, engine/grammar.py)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif isinstance(self.stop, list):
            self.stop = tuple(self.stop)
        if isinstance(self.dry_sequence_breakers, list):
            self.dry_sequence_breakers = tuple(self.dry_sequence_breakers)
        if isinstance(self.logit_bias, dict):
            self.logit_bias = tuple(self.logit_bias.items())
        elif isinstance(self.logit_bias, list):
            self.logit_bias = tuple(tuple(b) for b in self.logit_bias)

    @property
    def dry_active(self) -> bool:
        return self.dry_multiplier > 0.0 and self.dry_penalty_last_n != 0

    @property
    def xtc_active(self) -> bool:
        return self.xtc_probability > 0.0 and self.xtc_threshold <= 0.5

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise InfinichatError naming the first bad field, its value and what is accepted."""
        if self.temperature != 0:  # a tiny (or huge) divisor overflows the logits: nothing left to sample
            accepted = f"0 (greedy) or a number in [{MIN_TEMPERATURE:g}, {MAX_SCALE:g}]"
            _check_real("temperature", self.temperature, MIN_TEMPERATURE, MAX_SCALE, accepted)
        _check_int("top_k", self.top_k, 0, None, "an integer >= 0 (0 = off)")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            _bad("top_p", self.top_p, "a number in (0, 1] (1 = off)")
        _check_real("min_p", self.min_p, 0.0, 1.0, "a number in [0, 1] (0 = off)")
        accepted = f"a number in [{1 / MAX_SCALE:g}, {MAX_SCALE:g}] (1 = off)"
        _check_real("repetition_penalty", self.repetition_penalty, 1 / MAX_SCALE, MAX_SCALE, accepted)
        _check_int("repeat_last_n", self.repeat_last_n, -1, None, "an integer >= -1 (0 = off, -1 = whole history)")
        accepted = f"a number in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}] (0 = off)"
        _check_real("presence_penalty", self.presence_penalty, -PENALTY_RANGE, PENALTY_RANGE, accepted)
        _check_real("frequency_penalty", self.frequency_penalty, -PENALTY_RANGE, PENALTY_RANGE, accepted)
        _check_real("dry_multiplier", self.dry_multiplier, 0.0, math.inf, "a finite number >= 0 (0 = off)")
        _check_real("dry_base", self.dry_base, 1.0, math.inf, "a finite number >= 1")
        _check_int("dry_allowed_length", self.dry_allowed_length, 1, None, "an integer >= 1")
        _check_int(
            "dry_penalty_last_n", self.dry_penalty_last_n, -1, None, "an integer >= -1 (0 = off, -1 = whole history)"
        )
        b = self.dry_sequence_breakers
        if (
            not isinstance(b, tuple)
            or len(b) > MAX_DRY_BREAKERS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_BREAKER_CHARS for s in b)
        ):
            _bad(
                "dry_sequence_breakers",
                b,
                f"a list of at most {MAX_DRY_BREAKERS} non-empty strings of at most {MAX_BREAKER_CHARS} characters",
            )
        _check_real("xtc_probability", self.xtc_probability, 0.0, 1.0, "a number in [0, 1] (0 = off)")
        _check_real("xtc_threshold", self.xtc_threshold, 0.0, 1.0, "a number in [0, 1] (> 0.5 = off)")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**64 - 1, "null or an integer in [0, 2**64 - 1]")
        _check_int("max_tokens", self.max_tokens, 1, None, "an integer >= 1")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            _bad("stop", self.stop, "a list of non-empty strings")
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        lb = self.logit_bias
        accepted = (
            f"at most {MAX_LOGIT_BIAS_ENTRIES} pairs of a token id (an integer >= 0) and a bias in "
            f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
        )
        if not isinstance(lb, tuple) or len(lb) > MAX_LOGIT_BIAS_ENTRIES:
            _bad("logit_bias", lb, accepted)
        for pair in lb:
            ok = isinstance(pair, tuple) and len(pair) == 2
            if not ok or not isinstance(pair[0], int) or isinstance(pair[0], bool) or pair[0] < 0:
                _bad("logit_bias", pair, accepted)
            if not _is_real(pair[1]) or not -MAX_LOGIT_BIAS <= pair[1] <= MAX_LOGIT_BIAS:
                _bad("logit_bias", pair, accepted)
        if self.grammar is not None:
            self.grammar.validate()


def _is_real(v: object) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _bad(name: str, value: object, accepted: str) -> None:
    raise InfinichatError(f"sampling parameter {name}={value!r} is not accepted; expected {accepted}")


def _check_real(name: str, value: object, lo: float, hi: float, accepted: str) -> None:
    if not _is_real(value) or not lo <= value <= hi or math.isinf(value):
        _bad(name, value, accepted)


def _check_int(name: str, value: object, lo: int, hi: int | None, accepted: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        _bad(name, value, accepted)


@dataclass
class SampledToken:
    token: int
    logprob: float  # log-prob of `token` under the final distribution (greedy: after penalties, temperature 1)
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), best first


# ---------------------------------------------------------------------------------------------------
# Pure pieces. Each takes 1-D logits and returns a new tensor; the input is never modified.


def penalty_window(history: Sequence[int] | torch.Tensor, repeat_last_n: int) -> torch.Tensor:
    """The token ids the penalties look at: the last `repeat_last_n` of history (-1: all, 0: none)."""
    if repeat_last_n == 0 or len(history) == 0:
        return torch.empty(0, dtype=torch.long)
    tail = history if repeat_last_n < 0 else history[-repeat_last_n:]
    if isinstance(tail, torch.Tensor):
        return tail.reshape(-1).long()
    return torch.as_tensor(list(tail), dtype=torch.long)  # (n,)


def _penalties_active(params: SamplingParams) -> bool:
    return params.repeat_last_n != 0 and (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def _penalize_(x: torch.Tensor, window: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """In place on float32 `x` (V,): repetition (once per distinct id), then presence and frequency."""
    V = x.shape[0]
    window = window[(window >= 0) & (window < V)]  # (n,) ids outside the logits cannot be penalized
    if window.numel() == 0:
        return x
    ids, counts = torch.unique(window, return_counts=True)  # (u,), (u,) where the history is (the host)
    ids, counts = to_device(ids, x.device), to_device(counts, x.device)  # (uploads only: no sync on a GPU)
    vals = x[ids]  # (u,)
    if params.repetition_penalty != 1.0:
        rp = params.repetition_penalty
        vals = torch.where(vals > 0, vals / rp, vals * rp)
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        vals = vals - params.frequency_penalty * counts.to(vals.dtype) - params.presence_penalty
    x[ids] = vals
    return x


def apply_penalties(
    logits: torch.Tensor, history: Sequence[int] | torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """llama.cpp penalties over the look-back window, on a float32 copy of `logits` (V,).

    repetition: each distinct id in the window once, logit > 0 -> logit / penalty, else logit * penalty;
    then logit -= frequency_penalty * count + presence_penalty * (count > 0).
    """
    x = logits.detach().to(torch.float32, copy=True)  # (V,)
    if not _penalties_active(params):
        return x
    return _penalize_(x, penalty_window(history, params.repeat_last_n), params)


def dry_penalties(
    history: Sequence[int] | torch.Tensor | np.ndarray, params: SamplingParams, breakers: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """DRY: (token ids, penalties) to subtract from their logits, given `history` (all ids so far).

    For every earlier position i of the window whose token equals the last one, L(i) = how many tokens
    ending at i equal the tokens ending the history (never counting a breaker, `breakers[id]` true).
    The token after i would make the repetition L(i) + 1 long; if L(i) >= dry_allowed_length it gets
    dry_multiplier * dry_base ** (L - dry_allowed_length), with the largest L over its occurrences.
    """
    empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))
    if not params.dry_active:
        return empty
    h = np.asarray(history, dtype=np.int64).reshape(-1)  # (n,)
    if params.dry_penalty_last_n > 0:
        h = h[-params.dry_penalty_last_n :]
    n = h.shape[0]
    if n < 2:
        return empty
    if breakers is not None:
        V = breakers.shape[0]
        brk = breakers[np.clip(h, 0, V - 1)] & (h >= 0) & (h < V)  # (n,) ids outside the mask never break
    else:
        brk = np.zeros(n, dtype=bool)
    if brk[-1]:
        return empty
    allowed = params.dry_allowed_length
    base = params.dry_base
    max_exp = int(_LOG_FLT_MAX / math.log(base)) if base > 1.0 else 0  # longer matches add nothing
    cap = allowed + max_exp  # the longest match worth measuring
    starts = np.nonzero(h[:-1] == h[-1])[0]  # (m,) positions i < n - 1 holding the last token
    nxt = h[starts + 1]  # (m,) the tokens that would extend each match
    ok = ~brk[starts + 1]
    starts, nxt = starts[ok], nxt[ok]
    if starts.size == 0:
        return empty
    length = np.ones(starts.shape[0], dtype=np.int64)  # (m,) h[i] == h[-1] and it is no breaker
    alive = np.arange(starts.shape[0])  # matches still growing
    k = 1
    while alive.size and k < cap:
        j = starts[alive] - k  # (a,) the k-th token before each match's end
        inside = j >= 0
        alive, j = alive[inside], j[inside]
        grow = (h[j] == h[n - 1 - k]) & ~brk[j]
        alive = alive[grow]
        length[alive] += 1
        k += 1
    hit = length >= allowed
    if not hit.any():
        return empty
    ids, inv = np.unique(nxt[hit], return_inverse=True)
    best = np.zeros(ids.shape[0], dtype=np.int64)
    np.maximum.at(best, inv, length[hit])  # the longest match per token
    expo = np.minimum(best - allowed, max_exp).astype(np.float64)
    return ids, np.minimum(params.dry_multiplier * base**expo, np.finfo(np.float32).max)


def _dry_(
    x: torch.Tensor, history: Sequence[int] | torch.Tensor, params: SamplingParams, breakers: np.ndarray | None
) -> None:
    ids, pen = dry_penalties(history, params, breakers)
    keep = ids < x.shape[0]
    if keep.any():
        idx = to_device(torch.from_numpy(ids[keep]), x.device)
        x[idx] -= to_device(torch.from_numpy(pen[keep]).to(x.dtype), x.device)


def apply_dry(
    logits: torch.Tensor,
    history: Sequence[int] | torch.Tensor,
    params: SamplingParams,
    breakers: np.ndarray | None = None,
) -> torch.Tensor:
    """DRY on a float32 copy of `logits` (V,) (see `dry_penalties`); `breakers`: (V,) bool, true for a breaker."""
    x = logits.detach().to(torch.float32, copy=True)  # (V,)
    _dry_(x, history, params, breakers)
    return x


def _xtc_keep(logits: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """Positions XTC keeps in `logits` (n,), or None when fewer than two tokens reach `threshold`."""
    probs = torch.softmax(logits, dim=0)  # (n,)
    above = probs >= threshold
    if int(above.sum()) < 2:
        return None
    least = probs[above].min()  # the least likely of the top choices stays (with its ties)
    return _nonzero(~above | (probs <= least))


def apply_xtc(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """XTC when it fires: mask every token with p >= threshold (softmax of `logits`) to -inf, except the least
    likely of them; nothing changes when fewer than two reach the threshold. (The Sampler fires it with
    probability xtc_probability per step.)"""
    keep = _xtc_keep(logits, threshold)
    return logits.clone() if keep is None else _keep_only(logits, keep)


def _keep_only(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(logits, -math.inf)  # (n,)
    out[keep] = logits[keep]
    return out


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).squeeze(1)  # (m,) indices where mask is true


def _top_k_keep(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest logits plus any tied with the k-th (k < n)."""
    vals, idx = torch.topk(logits, k + 1)  # (k+1,) sorted; the extra one tells whether the cut splits ties
    if vals[-1] < vals[-2]:
        return idx[:-1]  # (k,)
    return _nonzero(logits >= vals[-2])


def _top_p_keep(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Indices of the smallest set of best tokens whose mass (softmax of logits) is >= p, plus ties.

    Only the tokens within a few nats of the best are sorted, unless they hold less than p of the mass.
    """
    best = logits.max()
    if not torch.isfinite(best):  # all -inf, or NaN: nothing to rank; let the caller see it
        return torch.arange(logits.shape[0], device=logits.device)
    lse = torch.logsumexp(logits, dim=-1).double()  # ()
    for gap in _TOP_P_GAPS:
        near_ids = _nonzero(logits >= best - gap) if gap < math.inf else _nonzero(logits > -math.inf)  # (m,)
        near = logits[near_ids]  # (m,) every token of the set is among these
        vals = torch.sort(near, descending=True).values  # (m,) best first
        mass = torch.exp(vals.double() - lse).cumsum(0)  # (m,) cumulative probability, float64
        if mass[-1] >= p or gap == math.inf:
            break
    cut = min(int(torch.searchsorted(mass, p)), mass.shape[0] - 1)  # first position reaching p
    return near_ids[near >= vals[cut]]


def _masked_filters_(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """top-k, top-p and min-p in that order as masks over the whole of x (V,), in place: the filtered tokens go to
    -inf. The kept set is the `_keep` functions' (ties with the last token kept stay), but nothing is sized on
    the host, so on a GPU it takes no sync."""
    if 0 < p.top_k < x.shape[0]:
        x.masked_fill_(x < torch.topk(x, p.top_k).values[-1], -math.inf)  # below the k-th largest
    if p.top_p < 1.0:
        vals = torch.sort(x, descending=True).values  # (V,) best first; the masked ones last, with no mass
        mass = torch.exp(vals.double() - torch.logsumexp(x, dim=0).double()).cumsum(0)  # (V,) float64
        want = torch.full((1,), p.top_p, dtype=torch.float64, device=x.device)
        cut = torch.searchsorted(mass, want).clamp(max=x.shape[0] - 1)  # (1,) first position reaching p
        x.masked_fill_(x < vals[cut], -math.inf)
    if p.min_p > 0.0:
        x.masked_fill_(x < x.max() + math.log(p.min_p), -math.inf)  # p < min_p * p_max
    return x


def _min_p_keep(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    return _nonzero(logits >= logits.max() + math.log(min_p))  # p >= min_p * p_max


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (and any tied with the k-th); mask the rest to -inf. k = 0: off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits.clone()
    return _keep_only(logits, _top_k_keep(logits, k))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability mass (softmax of `logits`) is >= p.

    Tokens tied with the last one kept are kept too; at least one token always survives. p = 1: off.
    """
    if p >= 1.0:
        return logits.clone()
    return _keep_only(logits, _top_p_keep(logits, p))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with p >= min_p * p_max (i.e. logit >= max logit + log(min_p)). min_p = 0: off."""
    if min_p <= 0.0:
        return logits.clone()
    return _keep_only(logits, _min_p_keep(logits, min_p))


# ---------------------------------------------------------------------------------------------------


class Sampler:
    """Samples one sequence's tokens with fixed params and its own seeded generator.

    The generator is created on the device of the first logits it sees; same seed and device ->
    same tokens.
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        dry_breakers: np.ndarray | None = None,
        constraint: TokenConstraint | None = None,
    ) -> None:
        """`dry_breakers`: (V,) bool, true for the tokens containing one of params.dry_sequence_breakers
        (`Tokenizer.tokens_containing`); required when DRY is on with breakers (the engine has no tokenizer).
        `constraint`: the grammar the tokens must follow (built from params.grammar by the caller, who has the
        tokenizer: engine/grammar.py); each sampled token advances it."""
        params.validate()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
        if params.grammar is not None and constraint is None:
            raise ValueError("a grammar needs its constraint (engine/grammar.make_constraint)")
        bad = [i for i, _ in params.logit_bias if i >= vocab_size]
        if bad:
            raise InfinichatError(
                f"sampling parameter logit_bias: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})"
            )
        self.constraint = constraint
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = torch.tensor([i for i, _ in params.logit_bias], dtype=torch.long)  # (b,)
            self._bias = (ids, torch.tensor([float(b) for _, b in params.logit_bias], dtype=torch.float32))
        if params.dry_active and params.dry_sequence_breakers and dry_breakers is None:
            raise ValueError("DRY with sequence breakers needs their token mask (Tokenizer.tokens_containing)")
        self.dry_breakers = dry_breakers
        self.params = params
        self.vocab_size = vocab_size
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator: torch.Generator | None = None
        self._work: torch.Tensor | None = None  # (V,) float32 scratch, reused every step

    def _setup(self, device: torch.device) -> torch.Tensor:
        if self._work is None or self._work.device != device:
            if self._generator is not None and self._work is not None:
                log.warning("sampler moved from %s to %s; the seeded stream restarts", self._work.device, device)
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            self._work = torch.empty(self.vocab_size, dtype=torch.float32, device=device)
        return self._work

    def sample(self, logits: torch.Tensor, history: Sequence[int] | torch.Tensor) -> SampledToken:
        """Pick the next token from `logits` (V,), any float dtype; `history` = all ids so far."""
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"logits must have shape ({self.vocab_size},), got {tuple(logits.shape)}")
        x = self._setup(logits.device).copy_(logits)  # (V,) float32
        if self._bias is not None:
            ids, bias = self._bias
            x.index_add_(0, ids.to(x.device), bias.to(x.device))  # repeated ids add up
        if self.constraint is not None:
            x.masked_fill_(~self.constraint.allowed().to(x.device), -math.inf)
        step = self._pick(x, history)
        if self.constraint is not None:
            self.constraint.accept(step.token)
        return step

    def _pick(self, x: torch.Tensor, history: Sequence[int] | torch.Tensor) -> SampledToken:
        p = self.params
        if _penalties_active(p):
            _penalize_(x, penalty_window(history, p.repeat_last_n), p)
        if p.dry_active:
            _dry_(x, history, p, self.dry_breakers)

        on_device = x.device.type != "cpu"  # a GPU: the step's numbers come to the host in one read (one sync)
        if p.greedy:
            if on_device:
                jt = torch.argmax(x)
                j_f, xj, lse = torch.stack((jt.double(), x[jt].double(), torch.logsumexp(x, dim=0).double())).tolist()
                j = int(j_f)  # a vocabulary index is exact in float64
            else:
                j = _argmax(x)
                xj, lse = float(x[j]), float(torch.logsumexp(x, dim=0))  # temperature 1
            if xj == -math.inf:
                raise ValueError(_NO_MASS)
            top = [(i, v - lse) for i, v in _top(x, None, p.top_logprobs)]
            return SampledToken(j, xj - lse, top)

        # Each filter shrinks the candidate set; `ids` maps candidates to vocab ids (None: the whole vocab). On a
        # GPU the filters mask the whole vocabulary instead (the same kept set; no set sized on the host).
        ids: torch.Tensor | None = None
        cand = x  # (n,)
        filters: tuple[tuple[Callable[[torch.Tensor], torch.Tensor], bool], ...] = (
            (lambda c: _top_k_keep(c, p.top_k), 0 < p.top_k < cand.shape[0]),
            (lambda c: _top_p_keep(c, p.top_p), p.top_p < 1.0),
            (lambda c: _min_p_keep(c, p.min_p), p.min_p > 0.0),
        )
        if on_device:
            cand = _masked_filters_(x, p)
        for keep_fn, on in filters if not on_device else ():
            if on:
                keep = keep_fn(cand)  # (m,) positions in cand
                if keep.numel() == 0:
                    raise ValueError(_NO_MASS)
                cand = cand[keep]  # (m,)
                ids = keep if ids is None else ids[keep]
        if p.xtc_active:  # one draw per step, as llama.cpp does, whether or not XTC then finds two top choices
            fire = float(torch.rand((), generator=self._generator, device=x.device)) < p.xtc_probability
            keep_x = _xtc_keep(cand, p.xtc_threshold) if fire else None
            if keep_x is not None:
                cand = cand[keep_x]  # (m,)
                ids = keep_x if ids is None else ids[keep_x]
        scaled = cand.div_(p.temperature)  # (n,) cand is a scratch buffer or a fresh gather

        probs = torch.softmax(scaled, dim=0)  # (n,)
        cdf = torch.cumsum(probs, dim=0)  # (n,)
        if on_device:  # the same draw on the device; total, j, p_j and the token read back together
            total_t = cdf[-1]
            u_t = torch.rand((), generator=self._generator, device=x.device) * total_t  # inverse CDF draw
            jt = torch.searchsorted(cdf, u_t.reshape(1), right=True)[0].clamp(max=cdf.shape[0] - 1)
            tok_t = jt if ids is None else ids[jt]
            read = torch.stack((total_t.double(), jt.double(), probs[jt].double(), tok_t.double())).tolist()
            total, j, pj, token = read[0], int(read[1]), read[2], int(read[3])
        else:
            total = float(cdf[-1])
            if total > 0 and not math.isinf(total):
                u = float(torch.rand((), generator=self._generator, device=x.device)) * total  # inverse CDF draw
                j = min(int(torch.searchsorted(cdf, u, right=True)), cdf.shape[0] - 1)
                pj = float(probs[j])
        if not total > 0 or math.isinf(total):
            raise ValueError(_NO_MASS)
        if pj <= 0:  # u rounded up onto the total: take the last token that has mass
            j = int(torch.nonzero(probs).max())
            pj = float(probs[j])
        if not on_device or pj <= 0:
            token = j if ids is None else int(ids[j])
        if p.top_logprobs:
            logp = torch.log_softmax(scaled, dim=0)  # (n,)
            return SampledToken(token, float(logp[j]), _top(logp, ids, p.top_logprobs))
        return SampledToken(token, math.log(pj))


def _argmax(x: torch.Tensor) -> int:
    """Index of the first largest value of x (V,). On CPU through numpy: torch's CPU argmax took 217 us over a
    49k vocab against numpy's 10 us, a visible share of a llama.cpp decode step (~11 ms)."""
    if x.device.type == "cpu":
        return int(x.numpy().argmax())
    return int(torch.argmax(x))


def _top(logp: torch.Tensor, ids: torch.Tensor | None, n: int) -> list[tuple[int, float]]:
    """The n best (id, score) of `logp` (n_cand,), best first; tokens masked to -inf are left out."""
    if n <= 0:
        return []
    vals, idx = torch.topk(logp, min(n, logp.shape[0]))  # (n,), sorted
    if ids is not None:
        idx = ids[idx]
    if logp.device.type != "cpu":  # one read from a GPU (ids are exact in float64)
        return [(int(i), v) for i, v in torch.stack((idx.double(), vals.double()), 1).tolist() if v > -math.inf]
    return [(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True) if v > -math.inf]
