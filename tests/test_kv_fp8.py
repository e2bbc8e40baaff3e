"""The 8-bit KV cache (kv_cache_dtype="fp8") on the CPU, reference backend: the pool really
holds float8 e4m3 values with a scale per (token, kv head); they change the logits (a cache
that never quantizes fails), a little; prefix-cache hits and recompute preemption give the
same tokens as a run without either; the pool holds more blocks in the same memory; the trace
records the cache dtype; a backend without fp8 support refuses it before anything loads; the
triton backend gives an fp8 pool 128-token blocks by default.
(Accuracy on real weights: benchmarks/kv_fp8_accuracy.py.)"""
from __future__ import annotations

import json

import pytest
import torch

from functional_llm import LLM, SamplingParams
from functional_llm.cli import main
from functional_llm.errors import InvalidConfig
from functional_llm.kernels.base import FP8, cache_views, quantize
from functional_llm.kernels.reference import ReferenceBackend

from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(make_tiny_model("qwen3", tmp_path_factory.mktemp("fp8"), init_std=0.1))


PROMPTS = [list(range(3, 43)), list(range(3, 35)) + [200, 201], list(range(90, 130))]


def prompt_logprobs(llm):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return torch.tensor([d[i].logprob for o, p in zip(outs, PROMPTS)
                         for d, i in zip(o.prompt_logprobs[1:], p[1:])])


def test_pool_is_float8_and_changes_logits_a_little(folder):
    kw = dict(device="cpu", block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
    full, fp8 = LLM(folder, **kw), LLM(folder, kv_cache_dtype="fp8", **kw)
    values, scales = cache_views(fp8.engine.runner.kv, 0, 0, 2, 32)
    assert values.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert values.shape == (64, 4, 2, 32) and scales.shape == (64, 4, 2)
    a, b = prompt_logprobs(full), prompt_logprobs(fp8)      # chunks of 16: later ones read the cache
    assert scales.abs().sum() > 0 and values.float().abs().sum() > 0      # it was written
    diff = (a - b).abs()
    assert diff.max() > 1e-4                 # quantized: not the fp32 cache's numbers
    assert diff.mean() < 0.05 * a.abs().mean()


def test_quantize_round_trip():
    x = torch.randn(5, 3, 32) * torch.tensor([1e-3, 1.0, 300.0])[None, :, None]
    values, scales = quantize(x)
    assert values.dtype == FP8 and scales.shape == (5, 3)
    back = values.float() * scales[..., None]
    assert ((back - x).abs() <= x.abs().amax(-1, keepdim=True) * 2 ** -4).all()   # e4m3: 3 bits
    assert torch.equal(quantize(torch.zeros(2, 8))[0].float(), torch.zeros(2, 8))


def test_preemption_and_prefix_hits_give_the_same_tokens(folder):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [list(range(3, 40))] * 2 + [list(range(3, 40)) + [7, 8], list(range(60, 90))]
    plain = LLM(folder, device="cpu", block_size=4, num_kv_blocks=200, kv_cache_dtype="fp8",
                enable_prefix_caching=False)
    tight = LLM(folder, device="cpu", block_size=4, num_kv_blocks=24, kv_cache_dtype="fp8")
    want = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    got = [o.token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.counters["preemptions"] > 0 and tight.counters["cache_hit_tokens"] > 0
    assert got == want


def test_more_blocks_in_the_same_memory_and_recorded_in_the_trace(folder, tmp_path):
    full = LLM(folder, device="cpu", dtype="float32")
    fp8 = LLM(folder, device="cpu", kv_cache_dtype="fp8_e4m3", trace=str(tmp_path / "t.jsonl"))
    # fp32 rows of 32 values: 128 bytes; fp8: 32 values + a 4-byte scale
    assert fp8.engine.sched.num_blocks == pytest.approx(full.engine.sched.num_blocks * 128 / 36, rel=1e-3)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    tokens = [[o.token_ids for o in m.generate(PROMPTS, greedy, use_tqdm=False)] for m in (full, fp8)]
    assert tokens[0] != tokens[1]          # so a replay on an fp32 cache would fail
    fp8.engine.trace.close()
    with open(tmp_path / "t.jsonl") as f:
        assert json.loads(f.readline())["shell"]["kv_cache_dtype"] == "fp8"
    # the replay rebuilds the LLM from the header: with an fp32 cache its tokens would differ
    assert main(["replay", str(tmp_path / "t.jsonl"), "--model", folder]) == 0


def test_refused_by_name(folder, monkeypatch):
    with pytest.raises(InvalidConfig, match="kv_cache_dtype"):
        LLM(folder, device="cpu", kv_cache_dtype="int4")
    monkeypatch.setattr(ReferenceBackend, "fp8_kv", False)
    with pytest.raises(InvalidConfig, match="kv_cache_dtype='fp8'.*reference backend"):
        LLM(folder, device="cpu", kv_cache_dtype="fp8")


def test_an_fp8_pool_on_the_triton_backend_defaults_to_128_token_blocks(folder):
    """The triton backend's fp8 decode tile (128 keys) is one page at 128 tokens a block (one
    table lookup; benchmarks/RESULTS.md): its fp8 pool defaults to 128;
    bf16 pools and the other backends keep 16, and an explicit block_size wins."""
    pytest.importorskip("triton")
    from functional_llm.model import load_config
    from functional_llm.runtime.build import device_spec
    cfg = load_config(folder)

    def block_size(backend, kv_cache_dtype, given=None):
        spec, _ = device_spec(folder, cfg, torch.device("cpu"), "float32", backend, False,
                              max_model_len=None, max_num_seqs=8, max_num_batched_tokens=None,
                              block_size=given, num_kv_blocks=None, tensor_parallel_size=1,
                              kv_cache_dtype=kv_cache_dtype)
        return spec.block_size
    assert block_size("triton", "fp8") == block_size("triton", "fp8_e4m3") == 128
    assert block_size("triton", "auto") == block_size("reference", "fp8") == 16
    assert block_size("triton", "fp8", given=16) == 16
