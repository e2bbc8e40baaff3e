"""End-to-end engine tests on tiny random models (fp32, CPU) against Hugging Face transformers,
and the engine's invariance under prefix caching, preemption, chunking and batching."""
import pytest
import torch

from functional_llm import LLM, SamplingParams
from functional_llm.errors import InvalidConfig, InvalidPrompt, InvalidSamplingParams, RequestTooLarge
from tests.tiny_models import make_tiny_model

ARCHS = ["qwen3", "qwen2", "llama"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param), seed=0)
    return request.param, path


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("q3"), seed=1)


def prompts(n, lo=3, hi=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 200, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_greedy(path, prompt, n):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_greedy_matches_transformers_single_and_mixed_batch(tiny):
    arch, path = tiny
    ps = prompts(4)
    want = [hf_greedy(path, p, 12) for p in ps]
    assert any(len(set(w)) > 3 for w in want), "tiny model too degenerate: outputs do not vary"
    llm = LLM(str(path), block_size=4)
    single = llm.generate(ps[0], GREEDY, use_tqdm=False)[0]
    assert list(single.token_ids) == want[0]
    batch = llm.generate(ps, GREEDY, use_tqdm=False)
    assert [list(o.token_ids) for o in batch] == want
    assert all(o.finish_reason == "length" for o in batch)


def _tokens(outs):
    return [list(o.token_ids) for o in outs]


def test_prefix_cache_on_off_same_tokens_and_hits_counted(qwen3):
    shared = list(range(5, 37))
    ps = [shared + [40 + i] * (i + 1) for i in range(6)]
    on = LLM(str(qwen3), block_size=4, max_num_batched_tokens=40)
    off = LLM(str(qwen3), block_size=4, enable_prefix_caching=False)
    out_on, out_off = on.generate(ps, GREEDY, use_tqdm=False), off.generate(ps, GREEDY, use_tqdm=False)
    assert _tokens(out_on) == _tokens(out_off)
    assert on.counters["cache_hit_tokens"] > 0 and off.counters["cache_hit_tokens"] == 0
    assert sum(o.num_cached_tokens for o in out_on) > 0
    again = on.generate(ps[:1], GREEDY, use_tqdm=False)[0]     # a later call hits the cache too
    assert again.num_cached_tokens == 32 and list(again.token_ids) == list(out_on[0].token_ids)
    assert on.counters["blocks_in_use"] == 0


def test_forced_preemption_same_tokens(qwen3):
    ps = prompts(6, lo=10, hi=20, seed=3)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = LLM(str(qwen3), block_size=4).generate(ps, params, use_tqdm=False)
    tight = LLM(str(qwen3), block_size=4, num_kv_blocks=12)
    got = tight.generate(ps, params, use_tqdm=False)
    assert tight.counters["preemptions"] > 0
    assert _tokens(got) == _tokens(ref)


def test_chunked_prefill_same_tokens(qwen3):
    ps = prompts(4, lo=20, hi=40, seed=4)
    ref = LLM(str(qwen3), block_size=4).generate(ps, GREEDY, use_tqdm=False)
    small = LLM(str(qwen3), block_size=4, max_num_batched_tokens=7)
    got = small.generate(ps, GREEDY, use_tqdm=False)
    assert small.counters["chunked_prefills"] > 0
    assert _tokens(got) == _tokens(ref)


def test_seeded_sampling_alone_equals_in_batch(qwen3):
    ps = prompts(5, seed=5)
    sp = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=10, ignore_eos=True)
          for i in range(5)]
    llm = LLM(str(qwen3), block_size=4)
    batch = llm.generate(ps, sp, use_tqdm=False)
    alone = [llm.generate(p, s, use_tqdm=False)[0] for p, s in zip(ps, sp)]
    assert _tokens(batch) == _tokens(alone)
    other_seed = llm.generate(ps[0], SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=10,
                                                    ignore_eos=True), use_tqdm=False)[0]
    assert list(other_seed.token_ids) != list(batch[0].token_ids)
    # no seed: derived from (engine seed, request id), so two engines with one seed agree
    a = LLM(str(qwen3), seed=3).generate(ps, SamplingParams(max_tokens=8), use_tqdm=False)
    b = LLM(str(qwen3), seed=3).generate(ps, SamplingParams(max_tokens=8), use_tqdm=False)
    assert _tokens(a) == _tokens(b)


def test_validation_errors_leave_the_engine_usable(qwen3):
    llm = LLM(str(qwen3), block_size=4, num_kv_blocks=8, max_model_len=64)
    ok = [1, 2, 3]
    cases = [
        (lambda: llm.generate([], use_tqdm=False), InvalidPrompt, "prompts"),
        (lambda: llm.generate([ok, []], use_tqdm=False), InvalidPrompt, "prompt"),
        (lambda: llm.generate([ok, [1, 10**6]], use_tqdm=False), InvalidPrompt, "prompt"),
        (lambda: llm.generate([ok, [-1]], use_tqdm=False), InvalidPrompt, "prompt"),
        (lambda: llm.generate([ok, list(range(1, 65))], use_tqdm=False), InvalidPrompt, "prompt"),
        (lambda: llm.generate([ok], SamplingParams(max_tokens=40), use_tqdm=False), RequestTooLarge,
         "num_kv_blocks"),
        (lambda: llm.generate("text", use_tqdm=False), InvalidPrompt, "prompt"),  # no tokenizer
        (lambda: llm.generate([ok, ok], [SamplingParams()], use_tqdm=False), InvalidSamplingParams,
         "sampling_params"),
    ]
    for call, err, param in cases:
        with pytest.raises(err) as e:
            call()
        assert e.value.parameter == param
        assert not llm.has_unfinished_requests() and llm.counters["blocks_in_use"] == 0
        out = llm.generate(ok, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
        assert len(out.token_ids) == 3
    with pytest.raises(InvalidConfig):
        LLM(str(qwen3), block_size=0)


def test_incremental_api_and_abort(qwen3):
    llm = LLM(str(qwen3), block_size=4)
    a = llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    b = llm.add_request([4, 5, 6, 7], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    seen = {}
    for _ in range(3):
        for out in llm.step():
            seen[out.request_id] = out
    llm.abort(b)
    while llm.has_unfinished_requests():
        for out in llm.step():
            seen[out.request_id] = out
    assert seen[a].finish_reason == "length" and len(seen[a].token_ids) == 5
    assert seen[b].finish_reason is None and len(seen[b].token_ids) == 3
    assert llm.counters["blocks_in_use"] == 0


def test_pipelined_engine_gives_the_synchronous_outputs(qwen3):
    """async_scheduling (schedule k+1 before step k's tokens reach the host, its decode ids fed
    from the device) against the synchronous loop: same tokens and finish reasons under EOS-like
    stops, length limits, preemption, chunking, prefix hits, sampling and an abort; the rows of
    sequences that ended while a later step was in flight are counted as dropped."""
    ps = prompts(8, lo=5, hi=30, seed=7)
    ps += [ps[0][:4] + [9, 9, 9] * 4, ps[0][:4] + [9, 9, 9] * 4 + [11]]   # prefix hits
    sync = LLM(str(qwen3), block_size=4, async_scheduling=False)
    free_run = sync.generate(ps, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0.8 * (i % 2), top_k=20, seed=i, max_tokens=6 + i,
                             stop_token_ids=[free_run[i].token_ids[2 + i % 3]]) for i in range(len(ps))]
    want = sync.generate(ps, params, use_tqdm=False)
    assert sum(o.finish_reason == "stop" for o in want) >= 3      # stops really happen
    for kw in ({}, {"num_kv_blocks": 14}, {"max_num_batched_tokens": 9}):
        piped = LLM(str(qwen3), block_size=4, async_scheduling=True, **kw)
        got = piped.generate(ps, params, use_tqdm=False)
        assert _tokens(got) == _tokens(want), kw
        assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
        assert piped.engine.dropped_rows > 0
        assert piped.counters["blocks_in_use"] == 0
        if kw.get("num_kv_blocks"):
            assert piped.counters["preemptions"] > 0
        if kw.get("max_num_batched_tokens"):
            assert piped.counters["chunked_prefills"] > 0
        again = piped.generate(ps, params, use_tqdm=False)       # now served from the cache
        assert _tokens(again) == _tokens(want) and piped.counters["cache_hit_tokens"] > 0
    # the incremental API: abort while a step is in flight; the id can be reused at once
    piped = LLM(str(qwen3), block_size=4, async_scheduling=True)
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    a = piped.add_request(ps[1], long, request_id="x")
    piped.step(), piped.step(), piped.step()
    piped.abort(a)
    b = piped.add_request(ps[2], GREEDY, request_id="x")
    outs = {}
    while piped.has_unfinished_requests():
        for o in piped.step():
            outs[o.request_id] = o
    assert b == "x" and list(outs["x"].token_ids) == list(want_greedy(sync, ps[2]))
    assert piped.counters["blocks_in_use"] == 0 and piped.engine.dropped_rows > 0


def want_greedy(llm, prompt):
    return llm.generate(prompt, GREEDY, use_tqdm=False)[0].token_ids


def test_stream_equals_generate_and_closing_it_early_aborts(qwen3):
    """Tiny model (no tokenizer: token ids only): stream's deltas join to generate's tokens, on
    the synchronous and the pipelined engine; a stream closed early leaves nothing running."""
    ps = prompts(5, lo=3, hi=20, seed=3)
    params = [SamplingParams(temperature=0.7 * (i % 2), seed=i, max_tokens=4 + i, ignore_eos=True)
              for i in range(len(ps))]
    for piped in (False, True):
        llm = LLM(str(qwen3), block_size=4, async_scheduling=piped)
        want = llm.generate(ps, params, use_tqdm=False)
        joined, last = {}, {}
        for out in llm.stream(ps, params):
            joined[out.request_id] = joined.get(out.request_id, ()) + out.delta_token_ids
            assert out.token_ids == joined[out.request_id]
            last[out.request_id] = out
        assert [last[r].token_ids for r in sorted(last, key=lambda r: int(r.split("-")[1]))] == \
            [w.token_ids for w in want]
        assert all(o.finish_reason == "length" for o in last.values())
        gen = llm.stream(ps, SamplingParams(max_tokens=50, ignore_eos=True))
        next(gen)
        gen.close()
        assert llm.counters["blocks_in_use"] == 0
        while llm.has_unfinished_requests():     # pipelined: the step in flight drains, silent
            assert llm.step() == []


def test_request_ids_never_collide_and_a_dict_of_params_is_named(qwen3):
    llm = LLM(str(qwen3), block_size=4)
    llm.add_request([1, 2, 3], SamplingParams(max_tokens=40), request_id="req-0")
    outs = llm.generate([[4, 5, 6], [7, 8]], GREEDY, use_tqdm=False)   # auto ids skip "req-0"
    assert len(outs) == 2 and "req-0" not in {o.request_id for o in outs}
    auto = llm.add_request([1, 2])
    with pytest.raises(InvalidPrompt) as e:
        llm.add_request([3], request_id=auto)
    assert e.value.parameter == "request_id"
    for call in (lambda: llm.generate([1, 2], {"temperature": 0}, use_tqdm=False),
                 lambda: llm.add_request([1, 2], {"temperature": 0})):
        with pytest.raises(InvalidSamplingParams) as e:
            call()
        assert e.value.parameter == "sampling_params" and e.value.value == {"temperature": 0}
        assert "SamplingParams(**" in str(e.value)


def test_generate_progress_bar_counts_tokens_with_overall_rates(qwen3, capsys):
    llm = LLM(str(qwen3), block_size=4)
    llm.generate(prompts(3), [SamplingParams(max_tokens=n, ignore_eos=True) for n in (4, 6, 8)])
    draws = capsys.readouterr().err.rstrip("\n").split("\r")
    assert "\n" not in "".join(draws)                       # one line, redrawn in place
    assert "18/18 tokens" in draws[-1] and "3/3 prompts" in draws[-1]
    assert "prompt " in draws[-1] and "output " in draws[-1] and "tok/s" in draws[-1]



def test_what_one_llm_froze_the_next_one_collects():
    """Each LLM freezes the objects alive at its start out of the collector's view
    (quiet_collector); the next one unfreezes them first, so cycles dropped in between (a
    compiled, graph-captured LLM holds its KV pool in some) are collected, not kept for the
    process's life."""
    import gc
    import weakref
    from functional_llm.llm import quiet_collector

    class Node:
        pass
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    quiet_collector()
    try:
        del a, b
        gc.collect()
        assert ref() is not None          # frozen: the collector does not see it
        quiet_collector()                 # the next LLM's start
        assert ref() is None
    finally:
        gc.unfreeze()


def test_a_dropped_llm_is_collected_before_the_next_one_sizes_its_pool(qwen3, monkeypatch):
    """The next LLM collects a dropped one (cycles and all, as a compiled, graph-captured LLM
    holds its pool) before it builds its runner, so on a GPU that memory counts as free."""
    import weakref
    import functional_llm.llm as llm_module
    first = LLM(str(qwen3), device="cpu")
    first.cycle = first
    dropped = weakref.ref(first)
    del first
    seen, build = [], llm_module.build_runner
    monkeypatch.setattr(llm_module, "build_runner", lambda spec: seen.append(dropped() is None) or build(spec))
    LLM(str(qwen3), device="cpu")
    assert seen == [True]
