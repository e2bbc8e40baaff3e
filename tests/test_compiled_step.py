"""The compiled step, checked on the CPU.

On GPUs the whole device step (forward, logits, sampler) is one torch.compile'd function with
fullgraph=True, replayed from CUDA graphs whose inputs are padded to buckets. Compiling is
GPU-only, so a graph break would never show in CI: here every step of a real generate run
(prefill chunks, mixed steps, decodes; greedy, seeded, top-k rows) is also traced with
torch.compile(backend="eager", fullgraph=True), and also run on the padded static inputs the
graphs read (runtime/graphs.py), and both must give the eager step's tokens and KV writes.
(TP: tests/test_sharding.py traces the forward the same way on two gloo ranks.)
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from functional_llm import LLM, SamplingParams
from functional_llm.runtime.runner import device_step
from functional_llm.runtime.graphs import StepGraphs, decode_buckets, mixed_buckets

from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))
    return LLM(str(folder), device="cpu", max_num_batched_tokens=24, max_num_seqs=8,
               num_kv_blocks=64, block_size=4)


def test_buckets_hold_every_step():
    assert decode_buckets(256)[:3] == [2, 4, 8] and decode_buckets(256)[-1] == 256
    assert decode_buckets(1) == [2]
    tops = mixed_buckets(8192, 256)
    assert tops[0] == 16 and tops[-1] == 8192 and 1024 in tops and 1536 in tops
    # a step of T tokens in B <= T rows needs T_b >= max(T, B + 1): the top bucket holds
    # the worst case, T = B = max tokens, when max_seqs allows it
    assert mixed_buckets(24, 8)[-1] == 24 and mixed_buckets(24, 64)[-1] == 25


def test_every_step_traces_whole_and_pads_exactly(llm, monkeypatch):
    runner, sched = llm.engine.runner, llm.engine.sched
    traced = torch.compile(functools.partial(device_step, runner.model), backend="eager",
                           fullgraph=True)
    scratch = torch.zeros_like(runner.kv[:, :, :1])
    graphs = StepGraphs(None, sched.max_num_seqs, sched.max_num_batched_tokens,
                        -(-sched.max_model_len // sched.block_size), sched.num_blocks,
                        sched.block_size, sched.max_model_len, "cpu")
    eager_launch, kinds = runner.launch, []

    def launch(host, feed=None):
        before = runner.kv.clone()
        out = eager_launch(host, feed)
        tokens = out.tokens
        kv = before.clone()
        inputs = runner._prepared(_device_inputs(host))
        assert torch.equal(traced(kv, inputs)[0], tokens)
        assert torch.equal(kv, runner.kv)
        padded_kv = torch.cat([before, scratch], dim=2)      # + the scratch block pads write
        decode, size, unfiltered = graphs.stage(host)
        kinds.append((decode, unfiltered))
        padded = device_step(runner.model, padded_kv,
                             runner._prepared(graphs.inputs(decode, size, unfiltered)))
        assert torch.equal(padded[0][:len(host.sample_rows)], tokens)
        # a GEMM over more rows may sum in another order (batch-variant kernels): the last bits
        torch.testing.assert_close(padded_kv[:, :, :-1], runner.kv, rtol=1e-5, atol=1e-5)
        return out

    monkeypatch.setattr(runner, "launch", launch)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 250, n).tolist() for n in (30, 5, 17, 9, 3, 40)]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=5, seed=4, max_tokens=7, ignore_eos=True)] * 2
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [6, 5, 7, 6, 5, 7]
    # the run went through both bucket kinds and both sampler modes, chunks included
    assert {k[0] for k in kinds} == {True, False} and {k[1] for k in kinds} == {True, False}
    assert llm.counters["chunked_prefills"] > 0


def _device_inputs(host):
    from functional_llm.runtime.staging import to_device
    return to_device(host, "cpu")
