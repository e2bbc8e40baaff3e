"""Executable statements of the core invariants (docs/transitions.md). Each check raises
AssertionError naming the invariant; tests and property machines call them after every
transition. Cost is O(pool + tokens): for tests, never on the engine's per-step path."""
from __future__ import annotations

from collections import Counter

from functional_llm.core.blocks import blocks_for, chain_hash
from functional_llm.core.records import BlockPool, SchedConfig, SchedState


def check_pool(pool: BlockPool, hash_fn=chain_hash) -> None:
    n = pool.num_blocks
    free = {b for b in range(n) if pool.ref[b] == 0}
    # I1 partition: free = ref 0, counted exactly, and each free block has one live queue entry
    assert pool.num_free == len(free), f"I1: num_free {pool.num_free} != {len(free)}"
    live = [pool.queue[i] for i in range(pool.head, len(pool.queue))
            if pool.ref[pool.queue[i]] == 0 and pool.queued_at[pool.queue[i]] == i]
    assert sorted(live) == sorted(free), "I1: free queue does not hold exactly the free blocks"
    assert all(r >= 0 for r in pool.ref), "I2: negative refcount"
    # I4 hash integrity: every index entry is a full block whose tokens and chain hash agree
    for h, b in pool.by_hash.items():
        info = pool.cached.get(b)
        assert info is not None and info.hash == h, f"I4: hash {h} -> block {b} not indexed"
    for b, info in pool.cached.items():
        assert len(info.tokens) == pool.block_size, f"I4: block {b} indexed while not full"
        parent = None if info.parent is None else pool.cached.get(info.parent[0])
        if info.parent is None or (parent is not None and parent.epoch == info.parent[1]):
            ph = None if parent is None else parent.hash
            assert hash_fn(ph, info.tokens) == info.hash, f"I4: block {b} chain hash mismatch"


def check_state(state: SchedState, cfg: SchedConfig, hash_fn=chain_hash) -> None:
    pool = state.pool
    check_pool(pool, hash_fn)
    live = set(state.waiting) | set(state.running)
    assert live == set(state.seqs), "I7: seqs and queues disagree"
    assert not set(state.waiting) & set(state.running), "I7: a request both waiting and running"
    assert len(state.running) <= cfg.max_num_seqs, "I6: too many running"
    # I2 refcount: ref(b) = number of block tables holding b
    held = Counter(b for s in state.seqs.values() for b in s.block_table.tolist())
    for b in range(pool.num_blocks):
        assert pool.ref[b] == held.get(b, 0), f"I2: block {b} ref {pool.ref[b]} != {held.get(b, 0)}"
    for rid, seq in state.seqs.items():
        # I5 coverage (between steps): blocks for exactly the computed tokens; none if waiting
        if rid in state.waiting:
            assert seq.num_computed == 0, f"I5: waiting {rid} claims {seq.num_computed} computed tokens"
        want = 0 if rid in state.waiting else blocks_for(seq.num_computed, cfg.block_size)
        assert len(seq.block_table) == want, \
            f"I5: {rid} has {len(seq.block_table)} blocks for {seq.num_computed} tokens"
        # I3 exclusive tail: a block still being written belongs to this seq alone
        if len(seq.block_table) and seq.num_computed % cfg.block_size:
            tail = int(seq.block_table[seq.num_computed // cfg.block_size])
            assert pool.ref[tail] == 1 and tail not in pool.cached, f"I3: shared tail of {rid}"
    if not live:  # I8 conservation
        assert pool.num_free == pool.num_blocks, "I8: blocks held with nothing running"
