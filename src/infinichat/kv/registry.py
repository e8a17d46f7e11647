"""Policies by name (for flags and config)."""

from __future__ import annotations

from infinichat.errors import InfinichatError
from infinichat.kv.brutal_offload import BrutalOffloadPolicy
from infinichat.kv.expected_attention import ExpectedAttentionPolicy
from infinichat.kv.full import FullPolicy
from infinichat.kv.h2o import H2OPolicy
from infinichat.kv.kvzip import KVzipPolicy
from infinichat.kv.omnikv import OmniKVPolicy
from infinichat.kv.policy import EvictionPolicy
from infinichat.kv.recompute import RecomputePolicy
from infinichat.kv.snapkv import SnapKVPolicy
from infinichat.kv.streaming import StreamingPolicy
from infinichat.kv.tova import TOVAPolicy
from infinichat.kv.turns import TurnsPolicy
from infinichat.kv.window import WindowPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    p.name: p
    for p in (
        StreamingPolicy,
        TurnsPolicy,
        WindowPolicy,
        FullPolicy,
        RecomputePolicy,
        H2OPolicy,
        TOVAPolicy,
        SnapKVPolicy,
        ExpectedAttentionPolicy,
        KVzipPolicy,
        OmniKVPolicy,
        BrutalOffloadPolicy,
    )
}


def make_policy(policy: str | EvictionPolicy, **params) -> EvictionPolicy:
    """A policy object from its name and parameters (an object is returned as is)."""
    if isinstance(policy, EvictionPolicy):
        return policy
    cls = POLICIES.get(policy)
    if cls is None:
        raise InfinichatError(f"unknown KV policy {policy!r}; accepted: {', '.join(POLICIES)}")
    try:
        return cls(**params)
    except TypeError as e:
        raise InfinichatError(f"bad parameters for the {policy} policy: {e}") from None
