"""Segments and token-level edits against a plain Python model of the cache (hypothesis state machine).

No model weights: a fake forward writes, for each appended token, V = its id and K = a fixed per-token
vector rotated at its position. After every operation the store must hold exactly the reference's ids,
positions and segment tags, V must have moved with its token, and every K must equal its token's vector
rotated at the slot's current position (so each shift re-rotated correctly).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from infinichat.errors import InfinichatError
from infinichat.kv import KINDS, KVSequence, KVStore, make_policy
from infinichat.model.config import ModelConfig
from infinichat.model.rope import apply_rope

CFG = ModelConfig(
    arch="llama", vocab_size=50, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=8, max_position=256
)
BUDGET = 40
U = torch.randn(CFG.vocab_size, CFG.head_dim, generator=torch.Generator().manual_seed(0))  # (V, hd)


def fake_forward(seq: KVSequence, tokens: list[int]) -> None:
    """What the engine does, with a fake model: write K/V at the end, record the tokens (room made before)."""
    ids = torch.tensor(tokens)
    pos = seq.next_positions(len(tokens))
    start = seq.length
    cos, sin = seq.store.rope.cos_sin(pos, torch.float32)
    seq.store.k_all[:, :, start : start + len(tokens)] = apply_rope(U[ids], cos, sin)  # (n, hd) broadcast
    seq.store.v_all[:, :, start : start + len(tokens)] = ids.float()[:, None]
    seq.append(ids, pos)


class Ref:
    """The plain Python model: per slot [token, position, tag]; segments in order."""

    def __init__(self):
        self.slots: list[list[int]] = []
        self.segs: list[dict] = []
        self.next_id = 1

    def copy(self) -> Ref:
        r = Ref()
        r.slots = [list(s) for s in self.slots]
        r.segs = [dict(s) for s in self.segs]
        r.next_id = self.next_id
        return r

    # queries
    def open(self):
        return self.segs[-1] if self.segs and not self.segs[-1]["closed"] else None

    def seg(self, sid):
        return next(s for s in self.segs if s["id"] == sid)

    def slots_of(self, sid) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s[2] == sid]

    def next_pos(self) -> int:
        return self.slots[-1][1] + 1 if self.slots else 0

    def _drop_empty_closed(self):
        self.segs = [s for s in self.segs if not s["closed"] or self.slots_of(s["id"])]

    # operations
    def create(self, kind, pinned):
        self.close()
        self.segs.append(
            {
                "id": self.next_id,
                "kind": kind,
                "pinned": kind == "system" if pinned is None else pinned,
                "closed": False,
            }
        )
        self.next_id += 1

    def close(self):
        o = self.open()
        if o is not None:
            if self.slots_of(o["id"]):
                o["closed"] = True
            else:
                self.segs.pop()

    def append(self, tokens):
        o = self.open()
        for t in tokens:
            self.slots.append([t, self.next_pos(), o["id"] if o else -1])

    def truncate(self, n):
        o = self.open()
        if o is not None and not self.slots_of(o["id"]) and n != len(self.slots):
            self.segs.pop()  # the empty open segment sits at the old end
        elif o is not None and self.slots_of(o["id"]) and self.slots_of(o["id"])[0] >= n:
            self.segs.pop()
        self.slots = self.slots[:n]
        self._drop_empty_closed()

    def remove_spans(self, spans):
        for s, e in reversed(spans):
            if e < len(self.slots):
                d = self.slots[e][1] - self.slots[s][1]
                for slot in self.slots[e:]:
                    slot[1] -= d
            del self.slots[s:e]
        self._drop_empty_closed()

    def shift(self, start, delta, capacity) -> bool:
        if start == len(self.slots) or delta == 0:
            return True
        floor = self.slots[start - 1][1] + 1 if start else 0
        if self.slots[start][1] + delta < floor or self.slots[-1][1] + delta >= capacity:
            return False
        for slot in self.slots[start:]:
            slot[1] += delta
        return True

    def revert_to(self, sid):
        idx = self.segs.index(self.seg(sid))
        mine = self.slots_of(sid)
        start = mine[0] if mine else len(self.slots)
        self.segs = self.segs[:idx]
        self.slots = self.slots[:start]

    def remove_segment(self, sid):
        seg, mine = self.seg(sid), self.slots_of(sid)
        if seg["closed"]:
            self.segs.remove(seg)
        if mine:
            self.remove_spans([(mine[0], mine[-1] + 1)])

    def merge(self, sid) -> bool:
        seg = self.seg(sid)
        if not seg["closed"]:
            return False
        if seg["pinned"]:
            return True
        start = self.slots_of(sid)[0]
        if start == 0:
            seg["pinned"] = True
            return True
        prev = self.slots[start - 1][2]
        if prev == -1 or not self.seg(prev)["pinned"]:
            return False
        for i in self.slots_of(sid):
            self.slots[i][2] = prev
        self.segs.remove(seg)
        return True


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.seq = KVSequence(KVStore(CFG, BUDGET), BUDGET, make_policy("streaming", n_discard=6))
        self.ref = Ref()

    def _seg_ids(self):
        return [s["id"] for s in self.ref.segs]

    @rule(
        policy=st.sampled_from(["streaming", "window", "recompute"]),
        n_sink=st.integers(0, 5),
        n_discard=st.integers(1, 20),
        snap=st.booleans(),
    )
    def set_policy(self, policy, n_sink, n_discard, snap):
        self.seq.policy = make_policy(policy, n_sink=n_sink, n_discard=n_discard, snap=snap)

    @rule(tokens=st.lists(st.integers(0, CFG.vocab_size - 1), min_size=1, max_size=12))
    def append(self, tokens):
        before = self.ref.copy()
        try:
            spans = self.seq.make_room(len(tokens))
        except InfinichatError:
            self.ref = before  # nothing may have changed
            return
        assert self.seq.length + len(tokens) <= BUDGET
        pinned = {i for i, s in enumerate(self.ref.slots) if s[2] != -1 and self.ref.seg(s[2])["pinned"]}
        n_sink = self.seq.policy.n_sink if not pinned else 0
        assert not any(s < n_sink or pinned & set(range(s, e)) for s, e in spans), f"evicted protected {spans}"
        self.ref.remove_spans(spans)
        if self.seq.stale_from is not None:  # a recomputing policy: rewrite K of the stale slots, as the engine does
            a, b = self.seq.stale_from, self.seq.length
            cos, sin = self.seq.store.rope.cos_sin(self.seq.store.positions[a:b], torch.float32)
            self.seq.store.k_all[:, :, a:b] = apply_rope(U[self.seq.store.tokens[a:b]], cos, sin)
            self.seq.mark_fresh()
        if self.ref.next_pos() + len(tokens) > BUDGET:  # gaps left by positive shifts use up positions
            with pytest.raises(InfinichatError, match="full"):
                fake_forward(self.seq, tokens)
            return
        fake_forward(self.seq, tokens)
        self.ref.append(tokens)

    @rule(kind=st.sampled_from(KINDS), pinned=st.sampled_from([None, True, False]))
    def create(self, kind, pinned):
        self.seq.create_segment(kind, pinned=pinned)
        self.ref.create(kind, pinned)

    @rule()
    def close(self):
        self.seq.close_segment()
        self.ref.close()

    @rule(data=st.data())
    def truncate(self, data):
        n = data.draw(st.integers(0, self.seq.length))
        self.seq.truncate(n)
        self.ref.truncate(n)

    @precondition(lambda self: self.seq.length > 0)
    @rule(data=st.data())
    def remove(self, data):
        s = data.draw(st.integers(0, self.seq.length - 1))
        e = data.draw(st.integers(s + 1, self.seq.length))
        self.seq.remove(s, e)
        self.ref.remove_spans([(s, e)])

    @rule(data=st.data(), delta=st.integers(-6, 6))
    def shift(self, data, delta):
        start = data.draw(st.integers(0, self.seq.length))
        ok = self.ref.shift(start, delta, BUDGET)
        if ok:
            self.seq.shift(start, delta)
        else:
            with pytest.raises(InfinichatError):
                self.seq.shift(start, delta)

    @precondition(lambda self: self.ref.segs)
    @rule(data=st.data())
    def revert_to(self, data):
        sid = data.draw(st.sampled_from(self._seg_ids()))
        self.seq.revert_to(sid)
        self.ref.revert_to(sid)

    @precondition(lambda self: self.ref.segs)
    @rule(data=st.data())
    def remove_segment(self, data):
        sid = data.draw(st.sampled_from(self._seg_ids()))
        self.seq.remove_segment(sid)
        self.ref.remove_segment(sid)

    @precondition(lambda self: self.ref.segs)
    @rule(data=st.data())
    def merge(self, data):
        sid = data.draw(st.sampled_from(self._seg_ids()))
        before = self.ref.copy()
        if self.ref.merge(sid):
            self.seq.merge_segment(sid)
        else:
            self.ref = before
            with pytest.raises(InfinichatError, match=r"close it|pinned base"):
                self.seq.merge_segment(sid)

    @rule()
    def snapshot_restore(self):
        other = KVSequence(KVStore(CFG, BUDGET), BUDGET, self.seq.policy)
        other.restore(self.seq.snapshot())
        assert torch.equal(other.store.k_all[:, :, : other.length], self.seq.store.k_all[:, :, : self.seq.length])
        self.seq = other

    @rule(tokens=st.lists(st.integers(0, CFG.vocab_size - 1), min_size=1, max_size=5), keep_child=st.booleans())
    def fork(self, tokens, keep_child):
        child = self.seq.fork()
        parent_bytes = self.seq.snapshot()
        child.store.k_all.add_(1.0)
        if child.length:
            child.remove(0, 1)
        child.truncate(0)
        child.create_segment("scratch")
        fake_forward(child, tokens)
        assert self.seq.snapshot() == parent_bytes
        if keep_child:  # continue with a fork that got the same edits as the reference
            other = self.seq.fork()
            self.seq = other
        self.check()

    @invariant()
    def check(self):
        seq, ref = self.seq, self.ref
        n = seq.length
        assert seq.token_ids() == [s[0] for s in ref.slots]
        assert seq.positions() == [s[1] for s in ref.slots]
        assert seq.segment_tags() == [s[2] for s in ref.slots]
        got = [(s.id, s.kind, s.pinned, s.closed) for s in seq.segments.segments]
        assert got == [(s["id"], s["kind"], s["pinned"], s["closed"]) for s in ref.segs]
        for s in seq.segments.segments:
            assert s.closed or (s is seq.segments.segments[-1] and s.end == n), "the open segment ends the cache"
            assert len(s) > 0 or not s.closed
        assert seq.store.next_position == ref.next_pos() and ref.next_pos() <= BUDGET
        ids = seq.store.tokens[:n]
        assert torch.equal(seq.store.v_all[:, :, :n, 0], ids.float().expand(CFG.n_layers, 1, n))
        cos, sin = seq.store.rope.cos_sin(seq.store.positions[:n], torch.float32)
        want = apply_rope(U[ids], cos, sin)  # (n, hd)
        assert (seq.store.k_all[:, :, :n] - want).abs().max().item() <= 1e-4 if n else True


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ------------------------------------------------------------------ a few readable cases
def _seq():
    return KVSequence(KVStore(CFG, BUDGET), BUDGET, make_policy("streaming", n_discard=4))


def test_chat_turns_revert_remove_merge():
    seq = _seq()
    sys_ = seq.create_segment("system", "card")
    fake_forward(seq, [1, 2, 3])
    rag = seq.create_segment("rag", "doc")
    fake_forward(seq, [4, 5])
    user = seq.create_segment("user")
    fake_forward(seq, [6, 7, 8])
    bot = seq.create_segment("assistant")
    fake_forward(seq, [9, 10])
    seq.close_segment()
    assert seq.segment_tags() == [sys_.id] * 3 + [rag.id] * 2 + [user.id] * 3 + [bot.id] * 2
    with pytest.raises(InfinichatError, match="pinned base"):
        seq.merge_segment(user.id)
    assert seq.merge_segment(rag.id) is sys_ and sys_.end == 5
    seq.remove_segment(user.id)  # the assistant turn shifts down
    assert seq.token_ids() == [1, 2, 3, 4, 5, 9, 10] and seq.positions() == list(range(7))
    seq.revert_to(bot.id)
    assert seq.token_ids() == [1, 2, 3, 4, 5] and [s.id for s in seq.segments.segments] == [sys_.id]
    with pytest.raises(InfinichatError, match="no segment"):
        seq.revert_to(bot.id)
    with pytest.raises(InfinichatError, match="accepted: system, user"):
        seq.create_segment("dialogue")


def test_streaming_keeps_pinned_segments_and_snaps_to_a_turn_start():
    seq = KVSequence(KVStore(CFG, 40), 40, make_policy("streaming", n_discard=12))
    seq.create_segment("system")
    fake_forward(seq, [1] * 4)
    starts = []
    for turn in range(6):
        starts.append(seq.create_segment("user").id)
        fake_forward(seq, [10 + turn] * 6)  # 4 + 36 = 40: full
    assert seq.length == 40
    spans = seq.make_room(1)
    # 12 tokens is the target; the nearest turn start within 3 of it is after two turns (12 tokens)
    assert spans == [(4, 16)]
    assert seq.token_ids()[:4] == [1] * 4 and seq.segments.segments[1].id == starts[2]


def test_streaming_snaps_to_a_message_start_token():
    text = [1] * 40
    text[15] = 7  # a message starts at slot 15
    for boundary, span in (((), (4, 14)), ((7,), (4, 15))):
        seq = KVSequence(KVStore(CFG, 40), 40, make_policy("streaming", n_discard=10, boundary_tokens=boundary))
        fake_forward(seq, text)
        # 4 sinks, 36 evictable, target 10, slack 2: slot 15 is 11 tokens in, near enough
        assert seq.make_room(1) == [span]


def test_without_pinned_segments_streaming_keeps_4_sinks_and_window_none():
    for name, first in (("streaming", [0, 1, 2, 3, 18]), ("window", [16, 17, 18, 19, 20])):
        seq = KVSequence(KVStore(CFG, 32), 32, make_policy(name, n_discard=20))
        fake_forward(seq, list(range(32)))
        seq.make_room(4)  # at most half of the evictable tokens go: 14 of 28 (streaming), 16 of 32 (window)
        assert seq.token_ids()[:5] == first
        assert seq.positions() == list(range(seq.length))


def test_full_policy_error_and_pinned_budget_error():
    seq = KVSequence(KVStore(CFG, 16), 16, make_policy("full"))
    fake_forward(seq, [1] * 16)
    with pytest.raises(InfinichatError, match=r"context is full: 16 cached \+ 2 new tokens > budget 16"):
        seq.make_room(2)
    pinned = KVSequence(KVStore(CFG, 16), 16, make_policy("streaming"))
    pinned.create_segment("system")
    fake_forward(pinned, [1] * 14)
    with pytest.raises(InfinichatError, match="only 0 of 14 cached tokens are evictable"):
        pinned.make_room(3)
    with pytest.raises(InfinichatError, match="unknown KV policy 'h3o'; accepted: streaming"):
        make_policy("h3o")
