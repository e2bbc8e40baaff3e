"""LLM(batch_invariant=True): a request's tokens and logprobs depend only on its own inputs.

On the CPU (which the mode refuses: torch's GEMMs there round a row by the row count): the
argument is checked, and past the check the model goes through the invariant GEMM and norm
ops and the trace records the mode. The kernels themselves are
tested bit for bit in test_triton_attn.py (interpreter). On a GPU (marked `gpu`): real Qwen3
shapes in bf16 with the compiled step and CUDA graphs, alone vs inside batches of 1, 7, 63
and 255 others, with chunked prefill, prefix-cache hits, preemption and traces; and the
default mode, which fails the same check.
"""
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from functional_llm import LLM, SamplingParams
from functional_llm.errors import InvalidConfig, InvalidSamplingParams
from functional_llm.runtime.build import check_invariant
from tests.tiny_models import make_tiny_model

on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model("qwen3", tmp_path_factory.mktemp("bi"), seed=3))


def test_refused_where_it_cannot_hold(tiny):
    for value in ("yes", True):        # not a bool; the CPU (torch's GEMMs round by row count)
        with pytest.raises(InvalidConfig) as e:
            LLM(tiny, device="cpu", batch_invariant=value)
        assert e.value.parameter == "batch_invariant"
    from functional_llm.kernels.reference import ReferenceBackend
    from functional_llm.kernels.triton_attn import TritonBackend
    cuda = torch.device("cuda")
    with pytest.raises(InvalidConfig) as e:        # padded SDPA groups
        check_invariant(True, ReferenceBackend(), cuda, 1)
    assert e.value.parameter == "attention_backend"
    with pytest.raises(InvalidConfig) as e:        # three ranks sum in a row-dependent order
        check_invariant(True, TritonBackend, cuda, 3)
    assert e.value.parameter == "tensor_parallel_size"
    check_invariant(True, TritonBackend, cuda, 2)  # (the class: no triton needed)


def test_the_model_runs_the_invariant_ops_and_the_trace_says_so(tiny, tmp_path, monkeypatch):
    """Past its check (the CPU is refused: patched here), the flag reaches the model, which
    calls the invariant ops (their torch fallback on the CPU), the trace header and replay."""
    from functional_llm.kernels import invariant
    from functional_llm.model import llama
    from functional_llm.runtime import build
    from functional_llm.kernels.reference import ReferenceBackend
    monkeypatch.setattr(build, "check_invariant", lambda *a: None)
    monkeypatch.setattr(ReferenceBackend, "invariant", lambda self: self, raising=False)
    calls = {"linear": 0, "norm": 0}

    class Counting:
        def linear(*a):
            calls["linear"] += 1
            return invariant.linear(*a)

        def norm(*a):
            calls["norm"] += 1
            return invariant.norm(*a)
    monkeypatch.setattr(llama, "invariant", Counting)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = LLM(tiny, device="cpu").generate([[5, 6, 7]], sp, use_tqdm=False)[0].token_ids
    assert calls == {"linear": 0, "norm": 0}
    llm = LLM(tiny, device="cpu", batch_invariant=True, trace=str(tmp_path / "t.jsonl"))
    assert llm.generate([[5, 6, 7]], sp, use_tqdm=False)[0].token_ids == plain   # the same math
    assert tuple(_trace_tokens(tmp_path / "t.jsonl", 0)) == tuple(plain)
    layers = llm.model_config.num_layers
    assert calls["linear"] >= 6 * (4 * layers + 1) and calls["norm"] >= 6 * (2 * layers + 1)
    with pytest.raises(InvalidSamplingParams) as e:      # not covered yet: refused, not broken
        llm.generate([[5, 6, 7], [8, 9]], [sp, SamplingParams(top_p=0.9)], use_tqdm=False)
    assert e.value.parameter == "top_p" and not llm.has_unfinished_requests()
    assert llm.generate([[5, 6, 7]], SamplingParams(top_k=5, seed=1), use_tqdm=False)[0].token_ids
    llm.close()
    header = json.loads(open(tmp_path / "t.jsonl").readline())
    assert header["shell"]["determinism"]["batch_invariant"] is True
    from functional_llm.cli import main
    assert main(["replay", str(tmp_path / "t.jsonl"), "--model", tiny]) == 0


# -- on a GPU ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_shapes(tmp_path_factory):
    """Random bf16 weights at Qwen3-0.6B's shapes (8 of its 28 layers)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from throughput import QWEN3_06B, random_model
    return random_model(tmp_path_factory.mktemp("bi-q3"), {**QWEN3_06B, "num_hidden_layers": 8})


def _requests(n, seed):
    """n requests; the i-th is the same whatever n."""
    prompts, params = [], []
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        prompts.append([rng.randint(1, 9999) for _ in range(rng.randint(20, 400))])
        params.append(SamplingParams(temperature=rng.choice([0, 0.8]), seed=rng.randint(0, 99),
                                     max_tokens=rng.randint(8, 160), ignore_eos=True, logprobs=0))
    return prompts, params


def _watched(llm, prompts, params):
    """The first two requests' (token ids, logprobs of them) from one generate call."""
    outs = llm.generate(prompts, params, use_tqdm=False)[:2]
    return [(o.token_ids, [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)]) for o in outs]


def _check_batches(llm, sizes=(1, 7, 63, 255)):
    """Two watched requests (300-token prompts; greedy, and seeded at temperature 0.8; 128 tokens
    each) alone, then inside batches of `sizes` others: how many batches gave them other
    tokens or logprobs."""
    rng = random.Random(7)
    watched = [[rng.randint(1, 9999) for _ in range(300)] for _ in range(2)]
    wparams = [SamplingParams(temperature=t, seed=11, max_tokens=128, ignore_eos=True, logprobs=0)
               for t in (0, 0.8)]
    alone = [_watched(llm, [p], [s])[0] for p, s in zip(watched, wparams)]
    differ = 0
    for n in sizes:
        prompts, params = _requests(n, seed=n)
        differ += _watched(llm, watched + prompts, wparams + params) != alone
    return differ


@pytest.mark.gpu
@on_gpu
def test_alone_equals_in_any_batch_chunked_with_prefix_hits(real_shapes):
    llm = LLM(real_shapes, device="cuda", dtype="bfloat16", max_model_len=1024, batch_invariant=True,
              max_num_batched_tokens=512)
    assert llm.engine.runner.graphs.graphs          # the compiled step, replayed from graphs
    assert _check_batches(llm) == 0
    c = llm.counters
    assert c["chunked_prefills"] > 0 and c["cache_hit_tokens"] > 0


@pytest.mark.gpu
@on_gpu
def test_alone_equals_in_a_batch_with_preemption_and_the_traces_agree(real_shapes, tmp_path):
    runs = []
    for name, blocks, n in (("big", None, 63), ("tiny", 160, 31)):
        llm = LLM(real_shapes, device="cuda", dtype="bfloat16", max_model_len=1024, batch_invariant=True,
                  num_kv_blocks=blocks, trace=str(tmp_path / f"{name}.jsonl"), async_scheduling=False)
        prompts, params = _requests(n, seed=3)
        runs.append(_watched(llm, prompts, params))
        if blocks:
            assert llm.counters["preemptions"] > 0
        llm.close()
        del llm          # before the next LLM sizes its pool
    # the batches differ (63 others vs 31, a roomy pool vs a tiny one); the requests' tokens
    # and logprobs do not, nor their tokens as each trace recorded them
    assert runs[0] == runs[1]
    assert _trace_tokens(tmp_path / "big.jsonl", 1) == _trace_tokens(tmp_path / "tiny.jsonl", 1)



@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_ranks_are_batch_invariant_too(real_shapes):
    """tensor_parallel_size=2: each all-reduce adds two partial sums, one rounding either way."""
    with LLM(real_shapes, dtype="bfloat16", max_model_len=1024, batch_invariant=True,
             tensor_parallel_size=2, max_num_batched_tokens=512) as llm:
        assert _check_batches(llm, sizes=(7, 63)) == 0
        assert llm.counters["chunked_prefills"] > 0


@pytest.mark.gpu
@on_gpu
def test_an_fp8_cache_is_batch_invariant_too(real_shapes):
    """kv_cache_dtype='fp8': each (token, kv head) row is quantized on its own scale."""
    llm = LLM(real_shapes, device="cuda", dtype="bfloat16", max_model_len=1024, batch_invariant=True,
              kv_cache_dtype="fp8", max_num_batched_tokens=512)
    assert _check_batches(llm, sizes=(7, 63)) == 0
    assert llm.counters["chunked_prefills"] > 0

def _trace_tokens(path, index):
    """The tokens sampled for the index-th arriving request, read from a synchronous trace."""
    records = [json.loads(line) for line in open(path)]
    rid = [r["rid"] for r in records if r["kind"] == "arrive"][index]
    tokens = []
    for r in (r for r in records if r["kind"] == "step"):
        sampled = [x for x, s in zip(r["plan"]["rids"], r["plan"]["sample"]) if s]
        tokens += [t for x, t in zip(sampled, r["tokens"]) if x == rid]
    assert tokens
    return tokens


@pytest.mark.gpu
@on_gpu
def test_the_default_mode_is_not_batch_invariant(real_shapes):
    """The same check without the mode finds a difference: the test above can fail."""
    llm = LLM(real_shapes, device="cuda", dtype="bfloat16", max_model_len=1024, max_num_batched_tokens=512)
    assert _check_batches(llm, sizes=(63, 255)) > 0
