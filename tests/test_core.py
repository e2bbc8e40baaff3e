"""Pure-transition unit tests for the block pool, scheduler and commit (no torch, no model)."""
import pytest

from functional_llm.core import blocks as B
from functional_llm.core import commit as C
from functional_llm.core import scheduler as S
from functional_llm.core.invariants import check_pool, check_state
from functional_llm.core.records import Request, SamplingParams, SchedConfig, new_pool, new_state
from functional_llm.errors import InvalidPrompt, RequestTooLarge


def cfg(**kw):
    base = dict(block_size=4, num_blocks=16, max_num_seqs=8, max_num_batched_tokens=64,
                max_model_len=128, eos_token_ids=(0,))
    base.update(kw)
    return SchedConfig(**base)


def fake_token(rid, position):
    """A deterministic 'model': the token depends only on (request, position), like I10."""
    return 1 + (hash((rid, position)) % 97)


def run(c, prompts, max_tokens=6, check=True, abort_at=None):
    """Drive schedule/commit to completion; returns outputs, final state and plans."""
    st = new_state(c)
    for i, p in enumerate(prompts):
        st = S.admit(st, c, Request(f"r{i}", tuple(p), SamplingParams(max_tokens=max_tokens), i, i))
    outs, plans = {f"r{i}": [] for i in range(len(prompts))}, []
    for step in range(1000):
        if not (st.waiting or st.running):
            break
        if abort_at is not None and step == abort_at[1]:
            st = C.abort(st, abort_at[0])
        st, plan = S.schedule(st, c)
        plans.append(plan)
        toks = [fake_token(r, st.seqs[r].num_computed + n) for r, n, smp in
                zip(plan.rids, plan.counts, plan.sample) if smp]
        st, deltas = C.commit(st, c, plan, toks)
        for d in deltas:
            outs[d.rid] += d.new_tokens
        if check:
            check_state(st, c)
    return outs, st, plans


def test_allocate_free_and_lru_eviction():
    pool = new_pool(4, 2)
    pool, a = B.allocate(pool, 3)
    assert a == (0, 1, 2) and pool.num_free == 1
    pool = B.register(pool, 0, 11, (5, 6), None)
    pool = B.free(pool, a)          # frees 2, 1, 0 in that order; 0 keeps its hash
    check_pool(pool, hash_fn=lambda p, t: 11)
    assert pool.num_free == 4 and 0 in pool.cached
    pool, b = B.allocate(pool, 3)   # 3 (never used), then 2 and 1: the cached block 0 survives
    assert b == (3, 2, 1) and 0 in pool.cached
    pool, c = B.allocate(pool, 1)   # only 0 is left: it is evicted and loses its hash
    assert c == (0,) and 0 not in pool.cached and 11 not in pool.by_hash
    with pytest.raises(B.PoolExhausted):
        B.allocate(pool, 1)


def test_match_prefix_confirms_tokens_under_a_colliding_hash():
    weak = lambda parent, toks: 7          # every block collides
    pool = new_pool(4, 2)
    pool, (b0, b1) = B.allocate(pool, 2)
    pool = B.register(pool, b0, 7, (1, 2), None)
    assert B.match_prefix(pool, (1, 2, 9), weak).blocks == (b0,)
    assert B.match_prefix(pool, (3, 4, 9), weak).blocks == ()   # same hash, other tokens: a miss
    # the last token is never served from cache, so a block-aligned prompt leaves one block
    assert B.match_prefix(pool, (1, 2), weak).blocks == ()


def test_prefix_hits_within_one_batch_and_same_outputs_without_cache():
    shared = list(range(10, 22))                    # 3 full blocks of 4
    prompts = [shared + [1, 2], shared + [3], shared + [4, 5, 6]]
    c = cfg(max_num_batched_tokens=16)              # r0 prefills alone in step 1
    outs, st, _ = run(c, prompts)
    assert st.counters.cache_hit_tokens >= 12
    outs2, st2, _ = run(cfg(max_num_batched_tokens=16, enable_prefix_caching=False), prompts)
    assert st2.counters.cache_hit_tokens == 0 and outs == outs2
    assert st.pool.num_free == c.num_blocks         # I8 after the run


def test_chunked_prefill_counts_chunks_and_respects_budget():
    c = cfg(max_num_batched_tokens=5)
    outs, st, plans = run(c, [list(range(1, 18)), list(range(30, 41))])
    assert st.counters.chunked_prefills > 0
    assert all(p.num_tokens <= 5 for p in plans)
    ref, _, _ = run(cfg(), [list(range(1, 18)), list(range(30, 41))])
    assert outs == ref


def test_preemption_recomputes_and_yields_the_same_tokens():
    prompts = [list(range(1 + 10 * i, 9 + 10 * i)) for i in range(4)]
    tight = cfg(num_blocks=7)
    outs, st, plans = run(tight, prompts, max_tokens=12)
    assert st.counters.preemptions > 0 and any(p.preempted for p in plans)
    ref, _, _ = run(cfg(num_blocks=64), prompts, max_tokens=12)
    assert outs == ref and all(len(v) == 12 for v in outs.values())


def test_max_num_seqs_and_abort_release_everything():
    c = cfg(max_num_seqs=2)
    outs, st, plans = run(c, [[1, 2, 3]] * 3 + [[4, 5, 6, 7, 8]], abort_at=("r3", 2))
    assert all(len(p.rids) <= 2 for p in plans)
    assert outs["r3"] == [] and all(len(outs[f"r{i}"]) == 6 for i in range(3))
    assert st.pool.num_free == c.num_blocks and not st.seqs


def test_eos_min_tokens_and_stop_ids():
    c = cfg(eos_token_ids=(9,))
    st = new_state(c)
    st = S.admit(st, c, Request("a", (1, 2), SamplingParams(max_tokens=5, min_tokens=2), 0, 0))
    st = S.admit(st, c, Request("b", (1, 2), SamplingParams(max_tokens=5, stop_token_ids=[4]), 0, 1))
    st = S.admit(st, c, Request("c", (1, 2), SamplingParams(max_tokens=5, ignore_eos=True), 0, 2))
    reasons = {}
    for toks in ([9, 3, 9], [9, 4, 9], [9, 9]):
        st, plan = S.schedule(st, c)
        st, d = C.commit(st, c, plan, toks[:sum(plan.sample)])
        reasons.update(d.finished)
    # a: EOS ignored for the first 2 tokens, ends at the third; b: stop id; c: ignores EOS
    assert reasons == {"b": "stop", "a": "stop"} and st.running == ("c",)


def test_generation_ends_at_max_model_len():
    c = cfg(max_model_len=6)
    outs, st, _ = run(c, [[1, 2, 3, 4]], max_tokens=10)
    assert len(outs["r0"]) == 2


def test_invalid_requests_raise_before_admission():
    c = cfg(num_blocks=2, max_model_len=32)
    st = new_state(c)
    with pytest.raises(InvalidPrompt) as e:
        S.admit(st, c, Request("x", (), SamplingParams(), 0, 0))
    assert e.value.parameter == "prompt"
    with pytest.raises(InvalidPrompt):
        S.admit(st, c, Request("x", tuple(range(32)), SamplingParams(), 0, 0))
    with pytest.raises(RequestTooLarge) as e:
        S.admit(st, c, Request("x", (1, 2, 3), SamplingParams(max_tokens=8), 0, 0))
    assert e.value.parameter == "num_kv_blocks"
    st = S.admit(st, c, Request("x", (1, 2), SamplingParams(max_tokens=4), 0, 0))
    with pytest.raises(InvalidPrompt):
        S.admit(st, c, Request("x", (1, 2), SamplingParams(max_tokens=4), 0, 0))
    assert st.waiting == ("x",)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 1.5),
    ("max_tokens", 0), ("stop", [""]), ("seed", -1),
    # wrong types: the typed error, never a TypeError from a comparison; bools are not ints
    ("temperature", "hot"), ("temperature", None), ("top_p", "1"), ("min_p", [0.1]),
    ("top_k", 2.0), ("top_k", True), ("max_tokens", "16"), ("max_tokens", 16.0),
    ("max_tokens", True), ("min_tokens", 1.5), ("seed", 1.0), ("seed", False), ("stop", 3.5),
    ("stop", [1]), ("stop_token_ids", ["2"]), ("stop_token_ids", [True]),
    ("stop_token_ids", 2.5), ("ignore_eos", "yes"), ("ignore_eos", 1)])
def test_sampling_params_validation(field, value):
    from functional_llm.errors import InvalidSamplingParams
    with pytest.raises(InvalidSamplingParams) as e:
        SamplingParams(**{field: value})
    assert e.value.parameter == field


def test_sampling_params_accept_ints_and_floats_for_numbers():
    p = SamplingParams(temperature=1, top_p=1, min_p=0, stop="x", stop_token_ids=3)
    assert (p.temperature, p.stop, p.stop_token_ids) == (1, ("x",), (3,))
    assert SamplingParams(temperature=0.5, top_p=0.9, min_p=0.1).top_p == 0.9


def test_min_tokens_above_max_tokens_is_rejected():
    from functional_llm.errors import InvalidSamplingParams
    with pytest.raises(InvalidSamplingParams) as e:
        SamplingParams(max_tokens=2, min_tokens=3)
    assert e.value.parameter == "min_tokens"
