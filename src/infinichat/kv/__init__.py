"""The per-sequence KV store, its segments, budget and eviction policies."""

from infinichat.kv.policy import EvictionPolicy
from infinichat.kv.registry import POLICIES, make_policy
from infinichat.kv.segments import KINDS, Segment, SegmentMap
from infinichat.kv.sequence import KVSequence
from infinichat.kv.store import KVStore

__all__ = ["KINDS", "POLICIES", "EvictionPolicy", "KVSequence", "KVStore", "Segment", "SegmentMap", "make_policy"]
