"""A Hypothesis state machine over the block pool's pure functions (allocate, acquire, free,
match_prefix, register), driven like the scheduler drives them: sequences that share a
cached prefix, grow, compute their KV into newly appended blocks, index their full blocks,
and release them; other users that evict cached blocks and overwrite their KV.

After every rule: I1, I2, I4 (core/invariants.check_pool), exact refcounts (I2), exclusive
tails (I3), coverage (I5), conservation (I8), served KV = the KV of the sequence's own
token prefix (I9, simulated KV) and agreement with the naive model of
properties/reference_pool.py (I15): same refcounts, same free order, same blocks returned by
allocate and match_prefix, same set of reachable cached blocks.
"""
from __future__ import annotations

import random
from collections import Counter

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from functional_llm.core import blocks as B
from functional_llm.core.invariants import check_pool
from functional_llm.core.records import new_pool
from properties import sim
from properties.profiles import budget
from properties.reference_pool import NaivePool

JUNK = 9          # what evict() writes: never in a prompt


@attrs.define
class Holder:
    """One user of blocks: its tokens, block table, computed tokens and indexed blocks."""

    tokens: list
    table: list
    computed: int
    indexed: int = 0


class PoolMachine(RuleBasedStateMachine):
    hashes = (B.chain_hash,)
    compare = True                      # I15: the weak-hash machine cannot match the model

    @initialize(num_blocks=st.integers(1, 16), block_size=st.integers(1, 4), data=st.data())
    def setup(self, num_blocks, block_size, data):
        self.hash_fn = data.draw(st.sampled_from(type(self).hashes), label="hash_fn")
        self.S = block_size
        self.pool, self.model = new_pool(num_blocks, block_size), NaivePool(num_blocks, block_size)
        self.kv = sim.FakeKV(num_blocks, block_size)
        self.live = {}                  # id -> Holder
        self.seen = []                  # every sequence's tokens, for share_prefix
        self.next_id = 0

    def _add(self, holder: Holder) -> None:
        self.next_id += 1
        self.live[self.next_id] = holder

    def _pick(self, data) -> int:
        return data.draw(st.sampled_from(sorted(self.live)), label="holder")

    def _match(self, tokens) -> B.PrefixMatch:
        before = self.pool
        match = B.match_prefix(self.pool, tokens, self.hash_fn)
        assert self.pool is before                          # a lookup changes nothing
        if self.compare:
            assert list(match.blocks) == self.model.match(tokens), "I15: match_prefix"
        return match

    def _start(self, tokens) -> None:
        """A new sequence takes the longest cached prefix of its tokens (maybe none)."""
        match = self._match(tokens)
        self.pool = B.acquire(self.pool, match.blocks)
        self.model.acquire(match.blocks)
        n = len(match.blocks)
        self._add(Holder(list(tokens), list(match.blocks), n * self.S, n))
        self.seen.append(tuple(tokens))

    @rule(tokens=sim.prompts())
    def start(self, tokens):
        self._start(tokens)

    @precondition(lambda self: self.seen)
    @rule(data=st.data(), suffix=st.lists(st.integers(1, 3), max_size=4))
    def share_prefix(self, data, suffix):
        """A new sequence that repeats a leading part of an earlier one's tokens."""
        base = data.draw(st.sampled_from(self.seen), label="base")
        cut = data.draw(st.integers(0, len(base)), label="cut")
        self._start(base[:cut] + tuple(suffix))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), more=st.lists(st.integers(1, 3), max_size=3), k=st.integers(1, 16),
          index=st.booleans())
    def append(self, data, more, k, index):
        """A sequence gains `more` tokens (decoding), then computes up to k of its tokens:
        blocks they need are allocated at the table's end and their KV written; then maybe
        its full blocks are indexed at once, as commit does."""
        holder = self._pick(data)
        h = self.live[holder]
        h.tokens += more
        if h.computed == len(h.tokens):
            return
        k = min(k, len(h.tokens) - h.computed)
        need = B.blocks_for(h.computed + k, self.S) - len(h.table)
        if need > self.pool.num_free:
            try:
                B.allocate(self.pool, need)
                raise AssertionError("allocate beyond num_free must raise PoolExhausted")
            except B.PoolExhausted:
                return
        self.pool, new = B.allocate(self.pool, need)
        if self.compare:
            assert list(new) == self.model.allocate(need), "I15: allocation order"
        h.table += new
        seq = _as_seq(h)
        self.kv.write(seq, h.computed, k)
        h.computed += k
        if index:
            self._index(h)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def hash(self, data):
        """Index every full computed block not yet indexed (what commit does)."""
        self._index(self.live[self._pick(data)])

    def _index(self, h: Holder) -> None:
        S, parent_hash = self.S, None
        for j in range(h.computed // S):
            block_tokens = tuple(h.tokens[j * S:(j + 1) * S])
            parent_hash = self.hash_fn(parent_hash, block_tokens)
            if j >= h.indexed:
                self.pool = B.register(self.pool, h.table[j], parent_hash, block_tokens,
                                       h.table[j - 1] if j else None)
                self.model.register(h.table[j], tuple(h.tokens[:(j + 1) * S]),
                                    h.table[j - 1] if j else None)
        h.indexed = h.computed // S

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        h = self.live.pop(self._pick(data))
        self.pool = B.free(self.pool, h.table)
        self.model.free(h.table)

    @precondition(lambda self: self.pool.num_free)
    @rule(n=st.integers(1, 4))
    def evict(self, n):
        """Another user takes the least recently freed blocks (evicting their cache entries),
        overwrites their KV, and gives them back."""
        n = min(n, self.pool.num_free)
        self.pool, new = B.allocate(self.pool, n)
        if self.compare:
            assert list(new) == self.model.allocate(n), "I15: allocation order"
        scratch = Holder([JUNK] * (n * self.S), list(new), n * self.S)
        self.kv.write(_as_seq(scratch), 0, n * self.S)
        self.pool = B.free(self.pool, new)
        self.model.free(new)

    @invariant()
    def invariants_hold(self):
        if not hasattr(self, "pool"):
            return
        pool = self.pool
        check_pool(pool, self.hash_fn)                                          # I1, I4
        held = Counter(b for h in self.live.values() for b in h.table)
        assert list(pool.ref) == [held[b] for b in range(pool.num_blocks)], "I2"
        for h in self.live.values():
            assert len(h.table) == B.blocks_for(h.computed, self.S), "I5"
            if h.computed % self.S:                                             # I3
                tail = h.table[-1]
                assert pool.ref[tail] == 1 and tail not in pool.cached, "I3"
            self.kv.check(_as_seq(h), h.computed)                               # I9
        if not self.live:
            assert pool.num_free == pool.num_blocks, "I8"
        if self.compare:                                                        # I15
            assert list(pool.ref) == self.model.ref, "I15: refcounts"
            assert _free_order(pool) == self.model.free_order, "I15: free order"
            assert _reachable(pool) == {b: p for b, (p, _) in self.model.cached.items()}, \
                "I15: cached blocks"


@attrs.frozen
class _HolderSeq:                       # what FakeKV reads of a Seq
    block_table: list
    tokens: list
    rid: str = "holder"


def _as_seq(h: Holder) -> _HolderSeq:
    return _HolderSeq(h.table, h.tokens)


def _free_order(pool) -> list:
    return [pool.queue[i] for i in range(pool.head, len(pool.queue))
            if pool.ref[pool.queue[i]] == 0 and pool.queued_at[pool.queue[i]] == i]


def _reachable(pool) -> dict:
    """Cached blocks whose parent chain is intact (what match_prefix can serve), each with the
    whole token prefix it ends."""
    out = {}

    def prefix(b):
        info = pool.cached[b]
        if info.parent is None:
            return info.tokens
        pb, pe = info.parent
        if pb not in pool.cached or pool.cached[pb].epoch != pe:
            return None
        p = prefix(pb)
        return None if p is None else p + info.tokens

    for b in pool.cached:
        p = prefix(b)
        if p is not None:
            out[b] = p
    return out


class WeakHashPoolMachine(PoolMachine):
    hashes = sim.WEAK_HASHES
    compare = False


def test_I1_I2_I3_I4_I5_I8_I9_I15_pool_machine():
    run_state_machine_as_test(PoolMachine, settings=settings(max_examples=budget(200)))


def test_I4_I9_pool_machine_with_weak_hash():
    run_state_machine_as_test(WeakHashPoolMachine, settings=settings(max_examples=budget(150)))


@settings(max_examples=budget(4))
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(1, 8), block_size=st.integers(1, 3))
def test_I1_I2_I15_free_queue_compaction_over_long_runs(seed, num_blocks, block_size):
    """Thousands of allocate / free / revive operations, so the free queue is compacted many
    times (every 1024 consumed entries): the pool still agrees with the naive model."""
    rng = random.Random(seed)
    pool, model, held = new_pool(num_blocks, block_size), NaivePool(num_blocks, block_size), []
    compactions = 0
    for op in range(4000):
        choice = rng.random()
        if choice < 0.45 and pool.num_free:
            n, head = rng.randint(1, pool.num_free), pool.head
            pool, new = B.allocate(pool, n)
            compactions += pool.head < head
            assert list(new) == model.allocate(n), f"I15: allocation order at op {op}"
            held.append(list(new))
        elif choice < 0.9 and held:
            table = held.pop(rng.randrange(len(held)))
            pool = B.free(pool, table)
            model.free(table)
        elif held:                                  # share a held table (a prefix hit)
            table = held[rng.randrange(len(held))]
            pool = B.acquire(pool, table)
            model.acquire(table)
            held.append(list(table))
        if op % 97 == 0:
            check_pool(pool)                                                    # I1
            counts = Counter(b for t in held for b in t)
            assert list(pool.ref) == [counts[b] for b in range(num_blocks)] == model.ref, "I2"
            assert _free_order(pool) == model.free_order, "I15: free order"
    assert compactions, "the free queue was never compacted: make the run longer"
