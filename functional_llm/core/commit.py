"""commit, finish and abort: pure transitions that fold a step's results back into the state.

commit runs after the device step has written the KV of every scheduled token: only then are
newly completed blocks registered in the prefix index (registering earlier could serve KV
that does not exist yet). It is two transitions, advance (token-independent) then resolve
(the sampled tokens), so a pipelined engine can schedule step k+1 before step k's tokens
reach the host.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Sequence

import attrs

from functional_llm.core import blocks as B
from functional_llm.core.records import Deltas, Plan, SchedConfig, SchedState, Seq
from functional_llm.errors import UnknownRequest


def _index_blocks(pool, seq: Seq, cfg: SchedConfig, hash_fn):
    """Register the sequence's newly computed full blocks in the prefix index."""
    S, hashes = cfg.block_size, list(seq.block_hashes)
    full = seq.num_computed // S
    for j in range(len(hashes), full):
        tokens = tuple(seq.tokens[j * S:(j + 1) * S])
        h = hash_fn(hashes[-1] if hashes else None, tokens)
        pool = B.register(pool, int(seq.block_table[j]), h, tokens,
                          int(seq.block_table[j - 1]) if j else None)
        hashes.append(h)
    return pool, Seq(seq.req, seq.tokens, seq.num_computed, seq.block_table, tuple(hashes), seq.num_cached)


PENDING = -1   # a sampled token the host does not know yet (pipelined engine, see advance)


def advance(state: SchedState, cfg: SchedConfig, plan: Plan) -> SchedState:
    """The token-independent half of commit: every planned sequence has computed its scheduled
    tokens (their KV is written); each sampling row gets a PENDING token at the position its
    sample will fill; newly completed blocks are indexed. A PENDING token is never inside an
    indexed block: it sits at position num_computed, past every computed token.

    The pipelined engine runs advance right after launching a step, so the next step can be
    scheduled while this one is still on the device; resolve fills the tokens in later."""
    pool, seqs, changed = state.pool, state.seqs, {}
    caching, S, hash_fn = cfg.enable_prefix_caching, cfg.block_size, cfg.hash_fn or B.chain_hash
    for rid, start, count, sample in zip(plan.rids, plan.starts, plan.counts, plan.sample):
        seq = seqs[rid]   # per-step hot path: one Seq and at most one vector append per row
        assert seq.num_computed == start, f"{rid!r}: planned from {start}, computed {seq.num_computed}"
        seq = Seq(seq.req, seq.tokens.append(PENDING) if sample else seq.tokens, start + count,
                  seq.block_table, seq.block_hashes, seq.num_cached)
        if caching and seq.num_computed // S > len(seq.block_hashes):
            pool, seq = _index_blocks(pool, seq, cfg, hash_fn)
        changed[rid] = seq
    return attrs.evolve(state, seqs=MappingProxyType({**seqs, **changed}), pool=pool)


def resolve(state: SchedState, cfg: SchedConfig, plan: Plan, tokens: Sequence[int]
            ) -> tuple[SchedState, Deltas]:
    """The token-dependent half of commit, for an advanced plan: tokens[k] (the k-th sampling
    row's sample) replaces that row's PENDING token; then stop ids, EOS, max_tokens and
    max_model_len decide who finishes. Finished sequences release their blocks and leave the
    state wherever they are (a pipelined engine may have preempted one meanwhile)."""
    finished, cached, seqs = {}, {}, dict(state.seqs)
    eos, max_len = cfg.eos_token_ids, cfg.max_model_len
    rows = [(rid, start + count) for rid, start, count, smp
            in zip(plan.rids, plan.starts, plan.counts, plan.sample) if smp]
    assert len(rows) == len(tokens), f"{len(tokens)} tokens for {len(rows)} sampling rows"
    for (rid, pos), tok in zip(rows, tokens):
        seq = seqs[rid]
        assert seq.tokens[pos] == PENDING, f"{rid!r}: no pending token at {pos}"
        seq = seqs[rid] = Seq(seq.req, seq.tokens.set(pos, tok), seq.num_computed,
                              seq.block_table, seq.block_hashes, seq.num_cached)
        cached[rid] = seq.num_cached or 0
        p, n = seq.req.params, pos + 1 - len(seq.req.prompt)
        if (tok in p.stop_token_ids or (tok in eos and not p.ignore_eos)) and n > p.min_tokens:
            finished[rid] = "stop"          # EOS / stop ids count only after min_tokens tokens
        elif n >= p.max_tokens or pos + 1 >= max_len:
            finished[rid] = "length"
    pool = state.pool
    for rid in finished:
        pool = B.free(pool, seqs.pop(rid).block_table)
    running, waiting = state.running, state.waiting
    if finished:
        running, waiting = (tuple(r for r in ids if r not in finished) for ids in (running, waiting))
    new = attrs.evolve(state, running=running, waiting=waiting, seqs=MappingProxyType(seqs), pool=pool)
    return new, Deltas(tuple(rid for rid, _ in rows), tuple(tokens), MappingProxyType(finished),
                       MappingProxyType(cached))


def commit(state: SchedState, cfg: SchedConfig, plan: Plan, tokens: Sequence[int]
           ) -> tuple[SchedState, Deltas]:
    """Fold a finished step into the state: advance every planned sequence by its scheduled
    tokens, then append the sampled token of each sampling row (tokens[k] belongs to the k-th
    row with plan.sample True). Finished sequences release their blocks and leave the state;
    their reasons are in the Deltas. commit = resolve . advance (the synchronous engine)."""
    return resolve(advance(state, cfg, plan), cfg, plan, tokens)


def finish(state: SchedState, rid: str) -> SchedState:
    """End a live request for a reason decided outside core (a stop string, an abort: the
    reason travels in the caller's Delta and trace, core needs none).
    Its blocks are released; full computed blocks stay in the prefix cache."""
    if (seq := state.seqs.get(rid)) is None:
        raise UnknownRequest("request_id", rid, "is not a live request")
    return attrs.evolve(state, pool=B.free(state.pool, seq.block_table),
                        waiting=tuple(r for r in state.waiting if r != rid),
                        running=tuple(r for r in state.running if r != rid),
                        seqs=MappingProxyType({r: s for r, s in state.seqs.items() if r != rid}))


abort = finish  # an abort is a finish decided by the user; the request leaves wherever it is
