"""The Ray Serve request router of the engine replicas: every request of a session goes to the replica that
holds the session (strictly: one replica per rank, no fallback while it lives), new sessions to the
least-loaded replica, OpenAI requests without a session to the replica that served their longest prompt
prefix (its prefix cache holds the KV), everything else to the least-loaded replica.

The router runs in the ingress's process (a deployment handle routes where it is called); the ingress passes
each request's routing key (a dict) as the first argument of the call. The table of pins (cluster_table.py)
is shared by the routers of the handles of this process and read by the ingress (/metrics, failover).
A replica that dies (Ray tells the router, or the ingress sees a call fail) loses its pins: its sessions
go to the least-loaded live replica, which opens them from the shared store.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

# the table by attribute: Ray pickles this module by value into the handle's process, cluster_table by reference
from infinichat.server import cluster_table
from infinichat.server.cluster_table import MAX_PREFIXES

log = logging.getLogger(__name__)

DEAD_FOR_S = 120.0  # how long a replica seen failing is avoided if Ray still lists it


def route_of(pending: PendingRequest | None) -> dict[str, Any]:
    if pending is None or not pending.args or not isinstance(pending.args[0], dict):
        return {}
    return pending.args[0]


class SessionRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        pass

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        cluster_table.TABLE.replicas = {r.replica_id.unique_id for r in replicas}

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        cluster_table.TABLE.mark_dead(replica_id.unique_id)
        super().on_replica_actor_died(replica_id)

    def _least_loaded(self, live: list[RunningReplica], sessions_first: bool) -> RunningReplica:
        pinned = cluster_table.TABLE.pinned_per_replica()

        def load(r: RunningReplica) -> tuple:
            queue = self.replica_queue_len_cache.get(r.replica_id) or 0
            held = pinned.get(r.replica_id.unique_id, 0)
            return ((held, queue) if sessions_first else (queue, held)) + (random.random(),)

        return min(live, key=load)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        now = time.monotonic()
        for rid, t in list(cluster_table.TABLE.dead.items()):
            if now - t > DEAD_FOR_S:
                del cluster_table.TABLE.dead[rid]
        live = [
            r for r in candidate_replicas if r.replica_id.unique_id not in cluster_table.TABLE.dead
        ] or candidate_replicas
        if not live:
            return []
        by_id = {r.replica_id.unique_id: r for r in live}
        route = route_of(pending_request)
        chosen = self._choose(route, by_id, live)
        cluster_table.TABLE.record(route.get("nonce"), chosen.replica_id.unique_id)
        return [[chosen]]

    def _choose(self, route: dict[str, Any], by_id: dict[str, RunningReplica], live: list[RunningReplica]):
        want = route.get("replica")
        if want in by_id:  # the ingress asks one replica (metrics, health)
            return by_id[want]
        sid = route.get("session")
        if sid:
            rid = cluster_table.TABLE.pins.get(sid)
            if rid in by_id:
                return by_id[rid]
            r = self._least_loaded(live, sessions_first=True)
            if rid is not None:
                cluster_table.TABLE.repins += 1
                log.info("session %s moves from replica %s to %s", sid, rid, r.replica_id.unique_id)
            cluster_table.TABLE.pins[sid] = r.replica_id.unique_id
            return r
        prefixes = route.get("prefixes") or []
        for h in reversed(prefixes):  # the longest prefix a live replica served
            rid = cluster_table.TABLE.prefixes.get(h)
            if rid in by_id:
                r = by_id[rid]
                break
        else:
            r = self._least_loaded(live, sessions_first=False)
        for h in prefixes:
            cluster_table.TABLE.prefixes[h] = r.replica_id.unique_id
            cluster_table.TABLE.prefixes.move_to_end(h)
        while len(cluster_table.TABLE.prefixes) > MAX_PREFIXES:
            cluster_table.TABLE.prefixes.popitem(last=False)
        return r
