"""Executable statements of the core invariants (docs/transitions.md). Each check raises
AssertionError naming the invariant; tests and property machines call them after every
transition. Cost is O(pool + tokens): for tests, never on the engine's per-step path."""
from __future__ import annotations

from collections import Counter
from typing import Optional

from functional_llm.core.blocks import blocks_for, chain_hash
from functional_llm.core.commit import PENDING
from functional_llm.core.records import BlockPool, Plan, SchedConfig, SchedState


def check_pool(pool: BlockPool, hash_fn=chain_hash) -> None:
    free = {b for b in range(pool.num_blocks) if pool.ref[b] == 0}
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
        assert PENDING not in info.tokens, f"I16: block {b} indexed with a pending token"
        parent = None if info.parent is None else pool.cached.get(info.parent[0])
        if info.parent is None or (parent is not None and parent.epoch == info.parent[1]):
            ph = None if parent is None else parent.hash
            assert hash_fn(ph, info.tokens) == info.hash, f"I4: block {b} chain hash mismatch"


def check_state(state: SchedState, cfg: SchedConfig, hash_fn=chain_hash, plan: Optional[Plan] = None) -> None:
    """Between steps (plan None), or during one: `plan` is the step in progress, with rows only
    for live sequences (after a pipelined resolve, the plan without the rows of sequences
    that finished meanwhile). During a step the planned sequences' tables already cover
    their scheduled tokens (I5), and a sequence preempted by this step may still hold the
    pending token of the step before (I16)."""
    pool = state.pool
    check_pool(pool, hash_fn)
    live = set(state.waiting) | set(state.running)
    assert live == set(state.seqs), "I7: seqs and queues disagree"
    assert not set(state.waiting) & set(state.running), "I7: a request both waiting and running"
    assert len(state.running) <= cfg.max_num_seqs, "I6: too many running"
    for rid in state.waiting:   # I12: a waiting sequence holds no KV (never admitted, or reset)
        seq = state.seqs[rid]
        assert seq.num_computed == 0 and len(seq.block_table) == 0 and not seq.block_hashes, \
            f"I12: waiting {rid} holds KV ({seq.num_computed} tokens, {len(seq.block_table)} blocks)"
    # I2 refcount: ref(b) = number of block tables holding b
    held = Counter(b for s in state.seqs.values() for b in s.block_table.tolist())
    for b in range(pool.num_blocks):
        assert pool.ref[b] == held.get(b, 0), f"I2: block {b} ref {pool.ref[b]} != {held.get(b, 0)}"
    scheduled = {} if plan is None else dict(zip(plan.rids, map(sum, zip(plan.starts, plan.counts))))
    for rid, seq in state.seqs.items():
        # I5 coverage: blocks for exactly the computed tokens, or the scheduled ones mid-step
        want = blocks_for(scheduled.get(rid, seq.num_computed), cfg.block_size)
        assert len(seq.block_table) == want, \
            f"I5: {rid} has {len(seq.block_table)} blocks for {seq.num_computed} tokens"
        # I3 exclusive tail: a block still being written belongs to this seq alone
        if len(seq.block_table) and seq.num_computed % cfg.block_size:
            tail = int(seq.block_table[seq.num_computed // cfg.block_size])
            assert pool.ref[tail] == 1 and tail not in pool.cached, f"I3: shared tail of {rid}"
        # I16 a pending token (pipelined engine) is the last token, past the computed KV; between
        # steps only a running sequence holds one, exactly at num_computed
        if PENDING in seq.tokens:
            at = len(seq.tokens) - 1
            assert seq.tokens.index(PENDING) == at and at >= seq.num_computed, \
                f"I16: {rid} holds a pending token inside its known tokens"
            assert plan is not None or (rid in state.running and at == seq.num_computed), \
                f"I16: {rid} holds a pending token at {at} between steps ({seq.num_computed} computed)"
    assert live or pool.num_free == pool.num_blocks, "I8: blocks held with nothing running"
