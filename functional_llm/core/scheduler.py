"""admit, schedule and preempt: pure transitions over SchedState.

One step's policy (continuous batching with chunked prefill, recompute preemption):
1. Running sequences, oldest first, each get their unfinished tokens (1 for a decode, the rest
   of the prompt for a chunked prefill) within the step's token budget. When the pool cannot
   hold a sequence's next block, the youngest running sequence is preempted: its blocks are
   freed (full ones stay in the prefix cache) and it returns to the front of the waiting queue
   with num_computed = 0, to be recomputed later with the same sampling keys.
2. If nothing was preempted, waiting sequences are admitted in order while seats, budget and
   blocks last, each first reusing its longest cached prefix.
"""
from __future__ import annotations

from types import MappingProxyType

import attrs
from pyrsistent import pvector

from functional_llm.core import blocks as B
from functional_llm.core.records import Plan, Request, SchedConfig, SchedState, Seq
from functional_llm.errors import InvalidPrompt, RequestTooLarge


def check_request(cfg: SchedConfig, req: Request) -> None:
    """Raise (typed, before admission) for a request this configuration can never serve."""
    n = len(req.prompt)
    if n == 0:
        raise InvalidPrompt("prompt", list(req.prompt), "must contain at least one token")
    if n >= cfg.max_model_len:
        raise InvalidPrompt("prompt", f"<{n} tokens>",
                            f"prompt length {n} must be < max_model_len={cfg.max_model_len}")
    longest = min(n + req.params.max_tokens, cfg.max_model_len)
    if B.blocks_for(longest, cfg.block_size) > cfg.num_blocks:
        raise RequestTooLarge("num_kv_blocks", cfg.num_blocks,
                              f"request {req.rid!r} may need {longest} tokens = "
                              f"{B.blocks_for(longest, cfg.block_size)} blocks of {cfg.block_size}")


def admit(state: SchedState, cfg: SchedConfig, req: Request) -> SchedState:
    """Append a new request to the waiting queue. Raises ValueError subclasses (state unchanged)
    for invalid requests or a duplicate id."""
    check_request(cfg, req)
    if req.rid in state.seqs:
        raise InvalidPrompt("request_id", req.rid, "is already in use by a live request")
    seqs = dict(state.seqs)
    seqs[req.rid] = Seq(req, pvector(req.prompt))
    return attrs.evolve(state, waiting=state.waiting + (req.rid,), seqs=MappingProxyType(seqs))


def _reset(seq: Seq) -> Seq:
    """A preempted sequence keeps its tokens but forgets its KV."""
    return attrs.evolve(seq, num_computed=0, block_table=(), block_hashes=())


def schedule(state: SchedState, cfg: SchedConfig) -> tuple[SchedState, Plan]:
    """Choose the next step's work. Returns the state with blocks allocated for every
    scheduled token (the step writes their KV) and the Plan. Never raises for valid states."""
    S, hash_fn = cfg.block_size, cfg.hash_fn or B.chain_hash
    pool, seqs, changed = state.pool, state.seqs, {}
    budget = cfg.max_num_batched_tokens
    running, waiting = list(state.running), list(state.waiting)
    rows, preempted, chunked, hit_tokens = [], [], 0, 0

    def get(rid):
        return changed.get(rid) or seqs[rid]

    i = 0
    while i < len(running) and budget > 0:
        seq = get(running[i])
        n = min(len(seq.tokens) - seq.num_computed, budget)
        need = B.blocks_for(seq.num_computed + n, S) - len(seq.block_table)
        while need > pool.num_free and running[-1] != seq.rid:
            victim = get(running.pop())
            pool = B.free(pool, victim.block_table)
            changed[victim.rid] = _reset(victim)
            waiting.insert(0, victim.rid)
            preempted.append(victim.rid)
        if need > pool.num_free:  # it is the youngest itself: preempt it and stop
            running.pop()
            pool = B.free(pool, seq.block_table)
            changed[seq.rid] = _reset(seq)
            waiting.insert(0, seq.rid)
            preempted.append(seq.rid)
            break
        if need > 0:
            pool, new = B.allocate(pool, need)
            seq = changed[seq.rid] = attrs.evolve(seq, block_table=seq.block_table + new)
        rows.append((seq.rid, seq.num_computed, n))
        chunked += seq.num_computed + n < len(seq.tokens)
        budget -= n
        i += 1

    while not preempted and waiting and budget > 0 and len(running) < cfg.max_num_seqs:
        seq = get(waiting[0])
        match = B.PrefixMatch()
        if cfg.enable_prefix_caching:
            match = B.match_prefix(pool, seq.tokens, hash_fn)
        start = match.num_blocks * S
        n = min(len(seq.tokens) - start, budget)
        need = B.blocks_for(start + n, S) - match.num_blocks
        reviving = sum(pool.ref[b] == 0 for b in match.blocks)
        if need + reviving > pool.num_free:
            break
        pool = B.acquire(pool, match.blocks)
        pool, new = B.allocate(pool, need)
        seq = changed[seq.rid] = attrs.evolve(
            seq, num_computed=start, block_table=match.blocks + new, block_hashes=match.hashes,
            num_cached=start if seq.num_cached is None else seq.num_cached)
        waiting.pop(0)
        running.append(seq.rid)
        rows.append((seq.rid, start, n))
        chunked += start + n < len(seq.tokens)
        hit_tokens += start
        budget -= n

    if changed:
        seqs = dict(seqs)
        seqs.update(changed)
        seqs = MappingProxyType(seqs)
    rids, starts, counts = zip(*rows) if rows else ((), (), ())
    final = {rid: len(get(rid).tokens) for rid in rids}
    sample = tuple(s + c == final[r] for r, s, c in zip(rids, starts, counts))
    plan = Plan(rids, starts, counts, sample, tuple(preempted))
    ctr = state.counters
    # a decode row computes exactly one generated token; everything else is prefill work
    decode = sum(c == 1 and s >= len(get(r).req.prompt) for r, s, c in rows)
    counters = attrs.evolve(
        ctr, steps=ctr.steps + 1, prefill_tokens=ctr.prefill_tokens + sum(counts) - decode,
        decode_tokens=ctr.decode_tokens + decode,
        chunked_prefills=ctr.chunked_prefills + chunked,
        preemptions=ctr.preemptions + len(preempted), cache_hit_tokens=ctr.cache_hit_tokens + hit_tokens)
    return SchedState(tuple(waiting), tuple(running), seqs, pool, counters), plan
