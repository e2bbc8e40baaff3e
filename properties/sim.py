"""Test doubles for the pure core: a simulated KV pool and a simulated model, so the core
properties can check what attention would read (I9) and what a request would generate (I10)
without torch; plus the plan checks core/invariants.py does not make (I6 budget, I11).

The simulated KV slot of position p holds what real K/V at p depends on: the tokens 0..p
(position and context included, as RoPE and the layers below make it). A step computes its
scheduled tokens' slots in order, each from its input id and the slot of the position before
(read through the block table, as attention reads it); then each sampling row "attends" by
reading the slots of positions 0..end-1 and samples from the last. A stale, overwritten,
misplaced or missing slot shows up as a prefix that differs from the sequence's own, which
a real model would turn into wrong logits; so does a wrong input id.
"""
from __future__ import annotations

import functools

import numpy as np
import xxhash
from hypothesis import strategies as st

from functional_llm.core.blocks import blocks_for
from functional_llm.core.commit import PENDING
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
        """Store the KV of positions start..start+count-1 of the sequence's known tokens."""
        for p in range(start, start + count):
            b, r = self._slot(seq, p)
            self.slots[b][r] = tuple(seq.tokens[:p + 1])

    def read(self, seq: Seq, p: int):
        b, r = self._slot(seq, p)
        return self.slots[b][r]

    def forward(self, seq: Seq, start: int, ids) -> None:
        """One row of a simulated forward: position start+i gets the slot of the position
        before it (read through the table) extended by the input id ids[i]."""
        for p, tok in enumerate(ids, start):
            before = self.read(seq, p - 1) if p else ()
            assert before is not EMPTY, f"I9: {seq.rid} position {p} attends to unwritten KV"
            b, r = self._slot(seq, p)
            self.slots[b][r] = before + (tok,)

    def check(self, seq: Seq, end: int, tokens=None) -> None:
        """I9 (simulated): the KV of positions 0..end-1 is exactly this sequence's tokens (or
        `tokens`: the known ones with the fed ids in place of pending ones)."""
        want = tuple(seq.tokens[:end] if tokens is None else tokens[:end])
        for p in range(end):
            b, r = self._slot(seq, p)
            assert self.slots[b][r] == want[:p + 1], (
                f"I9: {seq.rid} position {p} reads the KV of {self.slots[b][r]} from block {b}, "
                f"expected that of {want[:p + 1]}")


def device_step(kv: FakeKV, state: SchedState, plan: Plan, fed=None) -> list:
    """The simulated device step for a scheduled (state, plan): computes every row's KV first
    (as the real step does before attention), then samples each sampling row from the KV of
    its last position. fed (the pipelined engine): rid -> the token the previous step sampled
    for it, which the device puts where the host's input ids still say PENDING. A PENDING
    reaching the model is an I16 failure."""
    rows = []
    for rid, start, count, smp in zip(plan.rids, plan.starts, plan.counts, plan.sample):
        seq = state.seqs[rid]
        ids = list(seq.tokens[start:start + count])
        if fed is not None and ids[-1] == PENDING and rid in fed:
            ids[-1] = fed[rid]
        assert PENDING not in ids, f"I16: {rid} feeds a pending token to the model ({start}:{start + count})"
        assert PENDING not in seq.tokens[:start], f"I16: {rid} has computed a pending token"
        rows.append((seq, start, ids, smp))
    for seq, start, ids, _ in rows:
        kv.forward(seq, start, ids)
    tokens = []
    for seq, start, ids, smp in rows:
        if smp:
            end = start + len(ids)
            kv.check(seq, end, list(seq.tokens[:start]) + ids)
            tokens.append(fake_next(seq.req.seed, kv.read(seq, end - 1)))
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


def guarded(method):
    """For state machines: marks the machine broken while a rule runs, so teardown does not
    drain after a failure."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        self.broken = True
        method(self, *args, **kwargs)
        self.broken = False
    return run


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
