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
import shutil

import attrs
import numpy as np
import pytest
import torch

from functional_llm import LLM, SamplingParams
from functional_llm.kernels.reference import ReferenceBackend
from functional_llm.runtime.runner import compile_step, device_step, piecewise
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


# The reference backend behind a registered op, as the triton backend's attention is: the
# compiled step's graph is cut there. The op reads the step's prepared plan from _PLAN
# (host data no op argument can carry; the test sets it before each call).
_PLAN = [None]


@torch.library.custom_op("functional_llm::reference_attention_for_tests", mutates_args=("kv",))
def _reference_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                  layer: int, scale: float) -> torch.Tensor:
    return ReferenceBackend().forward(q, k, v, kv, layer, _PLAN[0], scale)


@_reference_op.register_fake
def _(q, k, v, kv, layer, scale):
    return torch.empty_like(q)


class OpBackend(ReferenceBackend):
    def forward(self, q, k, v, kv, layer, batch, scale):
        return torch.ops.functional_llm.reference_attention_for_tests(q, k, v, kv, layer, scale)


@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor's CPU code needs a C++ compiler")
def test_no_residual_add_is_folded_into_a_gemm(tmp_path):
    """Inductor (on a GPU, wherever the sum has a non-pointwise use, as the next residual add
    folded the same way) turns x + mm(...) into addmm(x, ...), which copies x into its output
    first: a device copy per residual add. model.llama.residual keeps the adds unfolded in the
    compiled forward (Inductor on the CPU, bf16, folds whenever it can: x + delta written plainly
    gives 2 addmm a layer here) and the result the eager one's."""
    from torch._inductor.utils import run_and_get_code
    from functional_llm.kernels.base import AttnBatch
    from functional_llm.model.llama import forward
    llm = LLM(str(make_tiny_model("qwen3", tmp_path)), device="cpu", dtype="bfloat16", block_size=4,
              num_kv_blocks=16)
    model, kv, T = llm.engine.runner.model, llm.engine.runner.kv, 4
    batch = AttnBatch(slot_mapping=torch.arange(T), cu_q=torch.tensor([0, T], dtype=torch.int32),
                      seq_lens=torch.tensor([T], dtype=torch.int32), max_q=T, max_seq_len=T,
                      block_tables=torch.tensor([[0]], dtype=torch.int32))
    batch = model.backend.prepare(batch)

    def step(ids, positions):
        return forward(model.params, model.cfg, ids, positions, batch, kv, model.backend)
    args = (torch.arange(T) + 5, torch.arange(T))
    out, code = run_and_get_code(torch.compile(step, fullgraph=True), *args)
    assert code and "extern_kernels.mm(" in "".join(code)          # the GEMMs are there
    assert "addmm" not in "".join(code)
    torch.testing.assert_close(out, step(*args), rtol=5e-2, atol=1e-1)      # bf16: a few ulps


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_piecewise_compile_cuts_at_attention_and_repeats_pieces(tmp_path, monkeypatch, batch_invariant):
    """The compiled step's backend (runner.piecewise) on a 3-layer model: every step of a
    generate, compiled piece by piece, gives the eager step's tokens and KV; each sampler mode
    compiles 4 pieces around 3 ops; the post-AOT graphs Inductor caches on are the same for
    the two middle pieces (layer to layer) and, but the last, for the two modes. With
    batch_invariant the GEMMs and norms are the functional_llm_bi ops (in the pieces, not
    cut at)."""
    from torch._dynamo.backends.common import aot_autograd
    folder = make_tiny_model("qwen3", tmp_path, num_layers=3)
    llm = LLM(str(folder), device="cpu", max_num_batched_tokens=24, max_num_seqs=8,
              num_kv_blocks=64, block_size=4)
    runner, sched = llm.engine.runner, llm.engine.sched
    codes = []

    def record(piece, example_inputs):            # AOT-trace the piece, then run it as is
        def keep(gm, _):
            codes.append(gm.code)
            return gm
        return aot_autograd(fw_compiler=keep)(piece, example_inputs)

    model = attrs.evolve(runner.model, backend=OpBackend(),
                         cfg=attrs.evolve(runner.model.cfg, batch_invariant=batch_invariant))
    compiled = compile_step(model, backend=functools.partial(piecewise, compiler=record))
    graphs = StepGraphs(None, sched.max_num_seqs, sched.max_num_batched_tokens,
                        -(-sched.max_model_len // sched.block_size), sched.num_blocks,
                        sched.block_size, sched.max_model_len, "cpu", mark_dynamic=True)
    scratch = torch.zeros_like(runner.kv[:, :, :1])
    eager_launch, modes = runner.launch, []

    def launch(host, feed=None):
        kv = torch.cat([runner.kv, scratch], dim=2)
        out = eager_launch(host, feed)
        decode, size, unfiltered = graphs.stage(host)
        inputs = graphs.inputs(decode, size, unfiltered)
        _PLAN[0] = ReferenceBackend().prepare(inputs.attn)
        tokens = compiled(kv, inputs)[0]
        assert torch.equal(tokens[:len(host.sample_rows)], out.tokens)
        torch.testing.assert_close(kv[:, :, :-1], runner.kv, rtol=1e-5, atol=1e-5)
        modes.append(unfiltered)
        return out

    monkeypatch.setattr(runner, "launch", launch)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, 250, n).tolist() for n in (30, 5, 17, 9)]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=5, seed=4, max_tokens=7, ignore_eos=True)] * 2
    llm.generate(prompts, params, use_tqdm=False)
    assert set(modes) == {True, False} and len(modes) > 5
    assert len(codes) == 8                         # 2 modes x (3 layers + 1) pieces, no recompile
    assert ("functional_llm_bi.linear" in codes[1]) == batch_invariant
    first, second = codes[:4], codes[4:]
    assert first[1] == first[2] and first[0] != first[1]
    assert first[:3] == second[:3] and first[3] != second[3]
