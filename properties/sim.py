"""Test doubles for the pure core: a simulated KV pool and a simulated model, so the core
properties can check what attention would read (I9) and what a request would generate (I10)
without torch; plus the checks core/invariants.py does not make (I6, I11, I12).

The simulated KV slot of position p holds what real K/V at p depends on: the tokens 0..p
(position and context included, as RoPE and the layers below make it). A step writes its
scheduled tokens' slots, then each sampling row "attends" by reading the slots of positions
0..end-1 through its block table: a stale, overwritten, misplaced or missing slot shows up
as a prefix that differs from the sequence's own, which a real model would turn into wrong
logits.
"""
from __future__ import annotations

import numpy as np
import xxhash
from hypothesis import strategies as st

from functional_llm.core.blocks import blocks_for
from functional_llm.core.records import Plan, Request, SamplingParams, SchedConfig, SchedState, Seq

VOCAB = 6            # simulated vocabulary: small, so EOS (0) comes often
EOS = 0
STOP_ID = 5          # a stop_token_id some requests use
EMPTY = None         # a slot never written


def fake_next(seed: int, tokens) -> int:
    """The simulated model: the next token is a stable hash of (seed, every token before it)."""
    return xxhash.xxh64_intdigest(np.asarray([seed, *tokens], dtype="<i8").tobytes()) % VOCAB


def ends(req: Request, tokens: list, max_model_len: int):
    """commit's stopping rule, restated for the reference: the reason, or None to go on."""
    p, n, tok = req.params, len(tokens) - len(req.prompt), tokens[-1]
    if (tok in p.stop_token_ids or (tok == EOS and not p.ignore_eos)) and n > p.min_tokens:
        return "stop"
    if n >= p.max_tokens or len(tokens) >= max_model_len:
        return "length"
    return None


def reference_output(req: Request, max_model_len: int) -> tuple[tuple, str]:
    """What the request generates alone, with nothing cached: (tokens, finish reason)."""
    tokens = list(req.prompt)
    while True:
        tokens.append(fake_next(req.seed, tokens))
        reason = ends(req, tokens, max_model_len)
        if reason:
            return tuple(tokens[len(req.prompt):]), reason


class FakeKV:
    """slots[b][r]: the token prefix whose last K/V block b row r holds (EMPTY if none yet)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.S = block_size
        self.slots = [[EMPTY] * block_size for _ in range(num_blocks)]

    def _slot(self, seq: Seq, p: int):
        j = p // self.S
        assert j < len(seq.block_table), f"I5: {seq.rid} has no block for position {p}"
        return int(seq.block_table[j]), p % self.S

    def write(self, seq: Seq, start: int, count: int) -> None:
        for p in range(start, start + count):
            b, r = self._slot(seq, p)
            self.slots[b][r] = tuple(seq.tokens[:p + 1])

    def check(self, seq: Seq, end: int) -> None:
        """I9 (simulated): the KV of positions 0..end-1 is exactly this sequence's tokens."""
        want = tuple(seq.tokens[:end])
        for p in range(end):
            b, r = self._slot(seq, p)
            assert self.slots[b][r] == want[:p + 1], (
                f"I9: {seq.rid} position {p} reads the KV of {self.slots[b][r]} from block {b}, "
                f"expected that of {want[:p + 1]}")


def device_step(kv: FakeKV, state: SchedState, plan: Plan) -> list:
    """The simulated device step for a scheduled (state, plan): writes every row's KV first
    (as the real step does before attention), then samples each sampling row."""
    rows = [(state.seqs[rid], start, count, smp)
            for rid, start, count, smp in zip(plan.rids, plan.starts, plan.counts, plan.sample)]
    for seq, start, count, _ in rows:
        kv.write(seq, start, count)
    tokens = []
    for seq, start, count, smp in rows:
        if smp:
            kv.check(seq, start + count)
            tokens.append(fake_next(seq.req.seed, list(seq.tokens[:start + count])))
    return tokens


def check_plan(before: SchedState, after: SchedState, plan: Plan, cfg: SchedConfig) -> None:
    """I6 budgets and I11 well-formed plans, for one schedule(before) -> (after, plan)."""
    assert plan.num_tokens <= cfg.max_num_batched_tokens, f"I6: {plan.num_tokens} tokens scheduled"
    assert len(after.running) <= cfg.max_num_seqs, "I6: too many running"
    assert len(set(plan.rids)) == len(plan.rids), "I11: a sequence scheduled twice"
    for rid, start, count, smp in zip(plan.rids, plan.starts, plan.counts, plan.sample):
        seq = after.seqs[rid]
        assert rid in after.running and count >= 1, f"I11: empty or idle row {rid}"
        assert seq.num_computed == start, f"I11: {rid} starts at {start}, KV holds {seq.num_computed}"
        assert start + count <= len(seq.tokens), f"I11: {rid} scheduled past its tokens"
        assert smp == (start + count == len(seq.tokens)), f"I11: {rid} sample flag"
        assert len(seq.block_table) == blocks_for(start + count, cfg.block_size), f"I5: {rid} blocks"
        if rid in before.running:
            assert before.seqs[rid].num_computed == start, f"I11: {rid} recomputes or skips tokens"
    for rid in plan.preempted:
        assert rid in after.waiting and rid not in plan.rids and rid in before.running, \
            f"I11: preempted {rid} misplaced"
    assert set(before.seqs) == set(after.seqs), "I7: schedule added or dropped a request"


def check_waiting(state: SchedState) -> None:
    """I12: a waiting sequence holds no KV (never admitted, or preempted and reset)."""
    for rid in state.waiting:
        seq = state.seqs[rid]
        assert seq.num_computed == 0 and len(seq.block_table) == 0 and not seq.block_hashes, \
            f"I12: waiting {rid} holds KV ({seq.num_computed} tokens, {len(seq.block_table)} blocks)"


# Deliberately weak chain hashes (SchedConfig.hash_fn): unrelated blocks collide all the time,
# so only match_prefix's token and parent-link comparisons keep wrong KV from being served.
def hash_constant(parent, tokens) -> int:
    return 0


def hash_ignoring_parent(parent, tokens) -> int:
    return sum(tokens) % 4


def hash_tiny_chain(parent, tokens) -> int:
    return ((parent or 0) * 3 + sum(tokens)) % 5


WEAK_HASHES = (hash_constant, hash_ignoring_parent, hash_tiny_chain)


# -- strategies ---------------------------------------------------------------------------------
STEMS = ((), (1, 2, 3, 1), (1, 2, 3, 1, 2, 2, 3, 3), (2, 2, 2, 2, 2, 2))   # shared prefixes


@st.composite
def prompts(draw, max_suffix: int = 6, stems=STEMS) -> tuple:
    stem = draw(st.sampled_from(stems))
    return stem + tuple(draw(st.lists(st.integers(1, 3), max_size=max_suffix)))


@st.composite
def sampling(draw) -> SamplingParams:
    max_tokens = draw(st.integers(1, 8))
    return SamplingParams(max_tokens=max_tokens, min_tokens=draw(st.integers(0, max_tokens)),
                          ignore_eos=draw(st.booleans()),
                          stop_token_ids=draw(st.sampled_from([(), (STOP_ID,)])))


@st.composite
def sched_configs(draw, hash_fn=None) -> SchedConfig:
    """Tiny pools around the size of one longest request (preemption storms; a few requests
    too large to admit), tiny budgets (chunking), few seats."""
    block_size, max_model_len = draw(st.integers(1, 4)), draw(st.integers(4, 24))
    num_blocks = max(1, blocks_for(max_model_len, block_size) + draw(st.integers(-2, 3)))
    return SchedConfig(block_size=block_size, num_blocks=num_blocks,
                       max_num_seqs=draw(st.integers(1, 4)),
                       max_num_batched_tokens=draw(st.integers(1, 12)),
                       max_model_len=max_model_len, eos_token_ids=(EOS,),
                       enable_prefix_caching=draw(st.sampled_from([True, True, True, False])),
                       hash_fn=hash_fn)
