"""The routing table of a cluster's ingress process: which replica holds each session, which served each prompt
prefix, which replicas are live or seen dead. Written by the request router (cluster_router.py), read by the
ingress (cluster.py); both reach it as `cluster_table.TABLE` (one object per process)."""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_PREFIXES = 4096  # prompt-prefix hashes remembered (LRU)


@dataclass
class Table:
    pins: dict[str, str] = field(default_factory=dict)  # session id -> replica id
    prefixes: OrderedDict[str, str] = field(default_factory=OrderedDict)  # prompt-prefix hash -> replica id
    dead: dict[str, float] = field(default_factory=dict)  # replica id -> when it was seen dead
    replicas: set[str] = field(default_factory=set)  # the live replicas Ray last announced
    routed: OrderedDict[str, str] = field(default_factory=OrderedDict)  # request nonce -> replica id
    repins: int = 0  # sessions moved off a dead replica

    def mark_dead(self, rid: str) -> None:
        if rid not in self.dead:
            log.warning("replica %s is gone: its sessions move to the other replicas", rid)
        self.dead[rid] = time.monotonic()

    def pinned_per_replica(self) -> Counter[str]:
        return Counter(self.pins.values())

    def record(self, nonce: str | None, rid: str) -> None:
        if nonce:
            self.routed[nonce] = rid
            while len(self.routed) > 1024:
                self.routed.popitem(last=False)


TABLE = Table()
