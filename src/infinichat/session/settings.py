"""Per-session settings: sampling, cache budget and policy. Changes apply to the next generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from infinichat.engine.sampling import DRY_BREAKERS, SamplingParams
from infinichat.errors import InfinichatError
from infinichat.kv.registry import POLICIES
from infinichat.session.limits import MAX_NEW_TOKENS, MAX_USER_NAME_CHARS, bad_code_point

MAX_BUDGET = 1 << 20


def check_budget(budget: int, cap: int | None) -> int:
    """`budget` if it is within the server's cap (`serve --max-budget`); None: no cap beyond MAX_BUDGET."""
    if cap is not None and budget > cap:
        raise InfinichatError(
            f"budget {budget} is over this server's limit of {cap} tokens (serve --max-budget); accepted: [64, {cap}]"
        )
    return budget


@dataclass(frozen=True)
class SessionSettings:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.1
    # DRY on by default: at the default budget the session defaults without it looped (benchmarks/long_chat.py,
    # README "Long chats"); XTC stays off. See engine/sampling.py for what each does.
    dry_multiplier: float = 0.8
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = DRY_BREAKERS
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    seed: int | None = None
    max_tokens: int = 256
    budget: int = 2048  # tokens the session's cache may hold
    policy: str = "turns"  # eviction when over budget: whole old turns, then streaming
    n_sink: int = 4
    narrations_kept: int = 3  # only the last K narrations stay in the cache
    user_name: str = "User"
    suggest_max_tokens: int = 64  # a suggestion stops here, at a paragraph end or at another speaker's line
    narrate_max_tokens: int = 160  # a narration likewise
    lore_ttl: int = 3  # user turns a lorebook entry stays in the cache after its key last appeared
    # when an entry leaves: re-evaluate the tokens after it (the cache then equals a fresh evaluation), or
    # only re-rotate them (cheaper; they keep what they attended to, as with an evicted turn)
    lore_recompute: bool = True

    def validate(self) -> SessionSettings:
        self.sampling().validate()
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or not 64 <= self.budget <= MAX_BUDGET:
            raise InfinichatError(
                f"budget must be an integer number of tokens in [64, {MAX_BUDGET}], got {self.budget!r}"
            )
        if self.max_tokens > MAX_NEW_TOKENS:
            raise InfinichatError(f"max_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {self.max_tokens!r}")
        if self.policy not in POLICIES:
            raise InfinichatError(f"unknown policy {self.policy!r}; accepted: {', '.join(POLICIES)}")
        for name, lo in (("n_sink", 0), ("narrations_kept", 0), ("lore_ttl", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= 4096:
                raise InfinichatError(f"{name} must be an integer in [{lo}, 4096], got {v!r}")
        if not isinstance(self.lore_recompute, bool):
            raise InfinichatError(f"lore_recompute must be true or false, got {self.lore_recompute!r}")
        for name in ("suggest_max_tokens", "narrate_max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_NEW_TOKENS:
                raise InfinichatError(f"{name} must be an integer in [1, {MAX_NEW_TOKENS}], got {v!r}")
        name = self.user_name
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_USER_NAME_CHARS or bad_code_point(name) is not None:
            raise InfinichatError(
                f"user_name must be a string of 1 to {MAX_USER_NAME_CHARS} valid Unicode characters, "
                f"got {str(name)[:80]!r}"
            )
        return self

    def sampling(self, **overrides) -> SamplingParams:
        p = SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            dry_multiplier=self.dry_multiplier,
            dry_base=self.dry_base,
            dry_allowed_length=self.dry_allowed_length,
            dry_penalty_last_n=self.dry_penalty_last_n,
            dry_sequence_breakers=self.dry_sequence_breakers,
            xtc_probability=self.xtc_probability,
            xtc_threshold=self.xtc_threshold,
            seed=self.seed,
            max_tokens=self.max_tokens,
        )
        return replace(p, **overrides) if overrides else p

    def policy_params(self) -> dict:
        return {"n_sink": self.n_sink} if "n_sink" in {f.name for f in fields(POLICIES[self.policy])} else {}

    def updated(self, changes: dict) -> SessionSettings:
        """A copy with `changes` applied and validated; unknown names are an error."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise InfinichatError(f"unknown setting(s) {', '.join(bad)}; accepted: {', '.join(sorted(known))}")
        return replace(self, **_tuples(changes)).validate()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SessionSettings:
        known = {f.name for f in fields(cls)}
        return cls(**_tuples({k: v for k, v in data.items() if k in known}))


def _tuples(changes: dict) -> dict:
    """JSON lists of strings (dry_sequence_breakers) as the tuples the frozen settings hold."""
    b = changes.get("dry_sequence_breakers")
    return {**changes, "dry_sequence_breakers": tuple(b)} if isinstance(b, list) else changes
