"""commit, finish and abort: pure transitions that fold a step's results back into the state.

commit runs after the device step has written the KV of every scheduled token: only then are
newly completed blocks registered in the prefix index (registering earlier could serve KV
that does not exist yet).
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
    S, hashes = cfg.block_size, seq.block_hashes
    full = seq.num_computed // S
    if full <= len(hashes):
        return pool, seq
    hashes = list(hashes)
    for j in range(len(hashes), full):
        tokens = tuple(seq.tokens[j * S:(j + 1) * S])
        h = hash_fn(hashes[-1] if hashes else None, tokens)
        pool = B.register(pool, int(seq.block_table[j]), h, tokens,
                          int(seq.block_table[j - 1]) if j else None)
        hashes.append(h)
    return pool, Seq(seq.req, seq.tokens, seq.num_computed, seq.block_table, tuple(hashes), seq.num_cached)


def commit(state: SchedState, cfg: SchedConfig, plan: Plan, tokens: Sequence[int]
           ) -> tuple[SchedState, Deltas]:
    """Advance every planned sequence by its scheduled tokens and append the sampled token of
    each sampling row (tokens[k] belongs to the k-th row with plan.sample True). Finished
    sequences release their blocks and leave the state; their reasons are in the Deltas."""
    hash_fn = cfg.hash_fn or B.chain_hash
    pool, changed, finished = state.pool, {}, {}
    out_rids, out_tokens, k = [], [], 0
    caching, S, eos, max_len = cfg.enable_prefix_caching, cfg.block_size, cfg.eos_token_ids, cfg.max_model_len
    seqs = state.seqs
    for rid, start, count, sample in zip(plan.rids, plan.starts, plan.counts, plan.sample):
        seq = seqs[rid]
        req = seq.req
        if sample:  # per-step hot path: one Seq, one vector append, a few comparisons
            tok = tokens[k]
            k += 1
            seq = Seq(req, seq.tokens.append(tok), start + count, seq.block_table,
                      seq.block_hashes, seq.num_cached)
            out_rids.append(rid)
            out_tokens.append(tok)
            p, n = req.params, len(seq.tokens) - len(req.prompt)
            if (tok in p.stop_token_ids or (tok in eos and not p.ignore_eos)) and n > p.min_tokens:
                finished[rid] = "stop"      # EOS / stop ids count only after min_tokens tokens
            elif n >= p.max_tokens or len(seq.tokens) >= max_len:
                finished[rid] = "length"
        else:
            seq = Seq(req, seq.tokens, start + count, seq.block_table, seq.block_hashes,
                      seq.num_cached)
        if caching and seq.num_computed // S > len(seq.block_hashes):
            pool, seq = _index_blocks(pool, seq, cfg, hash_fn)
        changed[rid] = seq
    assert k == len(tokens), f"{len(tokens)} tokens for {k} sampling rows"
    seqs = dict(state.seqs)
    seqs.update(changed)
    cached = {}
    for rid in finished:
        seq = seqs.pop(rid)
        pool = B.free(pool, seq.block_table)
        cached[rid] = seq.num_cached or 0
    running = state.running
    if finished:
        running = tuple(r for r in running if r not in finished)
    new = attrs.evolve(state, running=running, seqs=MappingProxyType(seqs), pool=pool)
    return new, Deltas(tuple(out_rids), tuple(out_tokens), MappingProxyType(finished),
                       MappingProxyType(cached))


def finish(state: SchedState, rid: str) -> SchedState:
    """End a live request for a reason decided outside core (a stop string, an abort: the
    reason travels in the caller's Delta and trace, core needs none).
    Its blocks are released; full computed blocks stay in the prefix cache."""
    seq = state.seqs.get(rid)
    if seq is None:
        raise UnknownRequest("request_id", rid, "is not a live request")
    seqs = dict(state.seqs)
    del seqs[rid]
    return attrs.evolve(
        state, waiting=tuple(r for r in state.waiting if r != rid),
        running=tuple(r for r in state.running if r != rid), seqs=MappingProxyType(seqs),
        pool=B.free(state.pool, seq.block_table))


abort = finish  # an abort is a finish decided by the user; the request leaves wherever it is
