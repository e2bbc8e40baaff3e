"""Logprobs (SamplingParams.logprobs / prompt_logprobs) against Hugging Face's log_softmax in
fp32, on a tiny random model: per generated token and per prompt token, through chunked
prefill, on the synchronous and the pipelined engine; requests that do not ask pay nothing;
prompt_logprobs requests skip prefix-cache hits; min_tokens masks EOS and stop ids."""
import pytest
import torch

from functional_llm import LLM, SamplingParams
from functional_llm.errors import InvalidSamplingParams
from functional_llm.runtime import runner as runner_module

from tiny_models import EOS_ID, build_tiny_model, make_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("q3"))


@pytest.fixture(scope="module")
def hf():
    return build_tiny_model("qwen3")


def hf_logprobs(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("pipelined", [False, True])
def test_logprobs_match_transformers(folder, hf, pipelined):
    llm = LLM(str(folder), device="cpu", num_kv_blocks=64, block_size=4,
              max_num_batched_tokens=8, async_scheduling=pipelined)   # chunked prompts
    params = [SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=1, max_tokens=4, logprobs=0, ignore_eos=True)]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.counters["chunked_prefills"] > 0
    for prompt, out, p in zip(PROMPTS, outs, params):
        ref = hf_logprobs(hf, prompt + list(out.token_ids))
        n = len(prompt)
        assert len(out.logprobs) == len(out.token_ids)
        for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            row = ref[n - 1 + i]
            assert abs(entry[tok].logprob - row[tok].item()) <= 1e-4
            assert entry[tok].rank == int((row > row[tok]).sum()) + 1
            top = row.topk(p.logprobs).indices.tolist()
            assert set(entry) == set(top) | {tok}            # the sampled token always in
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
        for i in range(1, n):
            entry = out.prompt_logprobs[i]
            assert abs(entry[prompt[i]].logprob - ref[i - 1, prompt[i]].item()) <= 1e-4
            assert len(entry) <= p.prompt_logprobs + 1


def test_streamed_delta_logprobs_align_with_delta_tokens(folder):
    llm = LLM(str(folder), device="cpu", num_kv_blocks=64, block_size=4)
    outs = list(llm.stream(PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, logprobs=1,
                                                       ignore_eos=True)))
    assert all(len(o.delta_logprobs) == len(o.delta_token_ids) for o in outs)
    joined = [e for o in outs for e in o.delta_logprobs]
    assert joined == list(outs[-1].logprobs) and len(joined) == 6


def test_requests_without_logprobs_compute_none(folder, monkeypatch):
    calls = []
    real = runner_module.token_logprobs
    monkeypatch.setattr(runner_module, "token_logprobs", lambda *a: calls.append(1) or real(*a))
    llm = LLM(str(folder), device="cpu", num_kv_blocks=64, block_size=4)
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=4), use_tqdm=False)
    assert calls == [] and out[0].logprobs is None and out[0].prompt_logprobs is None
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, logprobs=0), use_tqdm=False)
    assert len(calls) == 4                      # one per step, only when a row asks


def test_prompt_logprobs_skip_prefix_cache_hits(folder):
    llm = LLM(str(folder), device="cpu", num_kv_blocks=64, block_size=4)
    prompt = list(range(20, 40))
    llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    hit = llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert hit.num_cached_tokens > 0                     # the cache would serve it...
    out = llm.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == len(prompt)   # ...but not here


def test_min_tokens_masks_eos_and_stop_ids(folder):
    llm = LLM(str(folder), device="cpu", num_kv_blocks=64, block_size=4)
    greedy = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0].token_ids
    first = greedy[0]
    stopped = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[first]),
                           use_tqdm=False)[0]
    assert stopped.token_ids == (first,) and stopped.finish_reason == "stop"
    held = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=6, min_tokens=3,
                                                     stop_token_ids=[first]), use_tqdm=False)[0]
    assert first not in held.token_ids[:3] and EOS_ID not in held.token_ids[:3]
    assert len(held.token_ids) >= 3


def test_invalid_logprobs_are_typed():
    for bad in (dict(logprobs=21), dict(logprobs="3"), dict(prompt_logprobs=-1), dict(logprobs=True)):
        with pytest.raises(InvalidSamplingParams) as e:
            SamplingParams(**bad)
        assert e.value.parameter == next(iter(bad))


def test_too_many_masked_ids_are_refused(folder):
    llm = LLM(str(folder), device="cpu", num_kv_blocks=64, block_size=4)
    with pytest.raises(InvalidSamplingParams, match="stop_token_ids"):
        llm.generate(PROMPTS[:1], SamplingParams(min_tokens=1, stop_token_ids=list(range(10))))
    assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)[0].token_ids
