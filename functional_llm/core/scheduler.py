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
from functional_llm.core.records import (MAX_BANNED, NO_BLOCKS, Plan, Request, SchedConfig,
                                        SchedState, Seq, block_array)
from functional_llm.errors import InvalidPrompt, InvalidSamplingParams, RequestTooLarge


def check_request(cfg: SchedConfig, req: Request) -> None:
    """Raise (typed, before admission) for a request this configuration can never serve."""
    n = len(req.prompt)
    if n == 0:
        raise InvalidPrompt("prompt", list(req.prompt), "must contain at least one token")
    if n >= cfg.max_model_len:
        raise InvalidPrompt("prompt", f"<{n} tokens>",
                            f"prompt length {n} must be < max_model_len={cfg.max_model_len}")
    if req.params.min_tokens and len(banned_ids(cfg, req)) > MAX_BANNED:
        raise InvalidSamplingParams("stop_token_ids", req.params.stop_token_ids, f"with min_tokens, "
                                    f"at most {MAX_BANNED} ids with EOS can be masked")
    longest = min(n + req.params.max_tokens, cfg.max_model_len)
    if (need := B.blocks_for(longest, cfg.block_size)) > cfg.num_blocks:
        raise RequestTooLarge("num_kv_blocks", cfg.num_blocks, f"request {req.rid!r} may need {longest} "
                              f"tokens = {need} blocks of {cfg.block_size}")


def banned_ids(cfg: SchedConfig, req: Request) -> tuple:
    """The ids masked from sampling while the request is under min_tokens: EOS (unless
    ignore_eos) and its stop ids."""
    eos = () if req.params.ignore_eos else cfg.eos_token_ids
    return tuple(sorted(set(eos) | set(req.params.stop_token_ids)))


def admit(state: SchedState, cfg: SchedConfig, req: Request) -> SchedState:
    """Append a new request to the waiting queue, its arrival stamped from the state's count
    (the one place arrivals are numbered, so a replay numbers them alike). Raises ValueError
    subclasses (state unchanged) for invalid requests or a duplicate id."""
    check_request(cfg, req)
    if req.rid in state.seqs:
        raise InvalidPrompt("request_id", req.rid, "is already in use by a live request")
    ctr = state.counters
    req = attrs.evolve(req, arrival=ctr.arrivals)
    seqs = MappingProxyType({**state.seqs, req.rid: Seq(req, pvector(req.prompt))})
    return attrs.evolve(state, waiting=state.waiting + (req.rid,), seqs=seqs,
                        counters=attrs.evolve(ctr, arrivals=ctr.arrivals + 1))


def schedule(state: SchedState, cfg: SchedConfig) -> tuple[SchedState, Plan]:
    """Choose the next step's work. Returns the state with blocks allocated for every
    scheduled token (the step writes their KV) and the Plan. Never raises for valid states.
    The state argument is unchanged."""
    S, hash_fn = cfg.block_size, cfg.hash_fn or B.chain_hash
    pool, seqs, changed = state.pool, state.seqs, {}
    budget, running, waiting = cfg.max_num_batched_tokens, list(state.running), list(state.waiting)
    rids, starts, counts, sample = [], [], [], []
    preempted, chunked, hit_tokens, decode = [], 0, 0, 0

    def add_row(seq, start, n):  # one scheduled piece of work; per-step hot path
        nonlocal chunked, decode
        rids.append(seq.req.rid)
        starts.append(start)
        counts.append(n)
        end = start + n
        sample.append(end == len(seq.tokens))
        chunked += end < len(seq.tokens)
        decode += n == 1 and start >= len(seq.req.prompt)  # one generated token: a decode

    def preempt(rid):   # the youngest running sequence, just popped from running
        nonlocal pool
        seq = changed.get(rid) or seqs[rid]
        pool = B.free(pool, seq.block_table)
        changed[rid] = Seq(seq.req, seq.tokens, 0, NO_BLOCKS, (), seq.num_cached)   # tokens kept, KV not
        waiting.insert(0, rid)
        preempted.append(rid)

    i = 0
    while i < len(running) and budget > 0:
        rid = running[i]
        seq = changed.get(rid) or seqs[rid]
        n = min(len(seq.tokens) - seq.num_computed, budget)
        need = B.blocks_for(seq.num_computed + n, S) - len(seq.block_table)
        while need > pool.num_free and running[-1] != rid:
            preempt(running.pop())
        if need > pool.num_free:  # it is the youngest itself: preempt it and stop
            preempt(running.pop())
            break
        if need > 0:
            pool, new = B.allocate(pool, need)
            seq = changed[rid] = Seq(seq.req, seq.tokens, seq.num_computed,
                                     block_array(seq.block_table.tolist() + list(new)),
                                     seq.block_hashes, seq.num_cached)
        add_row(seq, seq.num_computed, n)
        budget -= n
        i += 1

    while not preempted and waiting and budget > 0 and len(running) < cfg.max_num_seqs:
        seq = changed.get(waiting[0]) or seqs[waiting[0]]
        match = (B.match_prefix(pool, seq.tokens, hash_fn)   # (prompt logprobs: compute all)
                 if cfg.enable_prefix_caching and seq.req.params.prompt_logprobs is None else B.PrefixMatch())
        start = len(match.blocks) * S
        n = min(len(seq.tokens) - start, budget)
        need = B.blocks_for(start + n, S) - len(match.blocks)
        reviving = sum(pool.ref[b] == 0 for b in match.blocks)
        if need + reviving > pool.num_free:
            break
        pool = B.acquire(pool, match.blocks)
        pool, new = B.allocate(pool, need)
        seq = changed[seq.req.rid] = attrs.evolve(
            seq, num_computed=start, block_table=block_array(match.blocks + new), block_hashes=match.hashes,
            num_cached=start if seq.num_cached is None else seq.num_cached)
        waiting.pop(0)
        running.append(seq.req.rid)
        add_row(seq, start, n)
        hit_tokens += start
        budget -= n

    if changed:
        seqs = MappingProxyType({**seqs, **changed})
    plan = Plan(tuple(rids), tuple(starts), tuple(counts), tuple(sample), tuple(preempted))
    ctr = state.counters
    counters = attrs.evolve(
        ctr, steps=ctr.steps + 1, prefill_tokens=ctr.prefill_tokens + sum(counts) - decode,
        decode_tokens=ctr.decode_tokens + decode, chunked_prefills=ctr.chunked_prefills + chunked,
        preemptions=ctr.preemptions + len(preempted), cache_hit_tokens=ctr.cache_hit_tokens + hit_tokens)
    return SchedState(tuple(waiting), tuple(running), seqs, pool, counters), plan
