"""The triton backend against the reference backend (the oracle) on random paged batches.

Without a GPU the kernels run under Triton's CPU interpreter, which must be switched on before
triton or the kernels module is imported — hence `_use_the_interpreter` above the imports. It
runs only when there is no CUDA device: pytest imports every test module before running any,
so doing it on a GPU machine would make test_gpu.py's triton runs interpreted too. On a GPU
the same tiny cases run compiled, plus the `gpu`-marked cases at real sizes. Interpreter cases
use fp32 and fp16 only (it computes bf16 on the raw bits). Shapes are tiny and tiles are
overridden to 16 so that a few dozen keys still span several tiles, pages and splits.
"""
import math
import os
import sys

import torch


def _use_the_interpreter():
    """Switch the interpreter on for every triton.jit function defined from now on. Triton's
    own library functions (tl.cdiv, tl.max, ...) are jit functions made when triton.language is
    first imported; if a module collected earlier imported triton (transformers does), they are
    compiled-mode and the interpreter cannot call them. So drop triton's Python modules (not
    its C extension) and our kernels module: the imports below then rebuild them interpreted."""
    os.environ["TRITON_INTERPRET"] = "1"
    lang = sys.modules.get("triton.language")
    if lang is not None and type(lang.cdiv).__name__ != "InterpretedFunction":
        for name in [n for n in sys.modules if n.split(".")[0] == "triton"
                     and not n.startswith("triton._C")]:
            del sys.modules[name]
        for name in ("triton_attn", "invariant", "gumbel"):
            sys.modules.pop(f"functional_llm.kernels.{name}", None)


def _dot_row_by_row():
    """The interpreter's tl.dot is numpy's matmul, and BLAS may round a row differently by where
    it sits in the tile (it does on some CPUs), which a GPU's MMA does not: the batch-invariance
    tests below would fail for the interpreter's sake. So float dots run as einsum (its own
    loops, no BLAS: each element summed alone, in K order); 8-bit dots as before."""
    import numpy as np
    from triton.runtime import interpreter
    blas_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
            return blas_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = d.data.dtype
        out = np.einsum("...ik,...kj->...ij", a.data.astype(acc), b.data.astype(acc))
        return interpreter.TensorHandle(out + d.data, d.dtype.scalar)
    interpreter.InterpreterBuilder.create_dot = create_dot


if not torch.cuda.is_available():
    _use_the_interpreter()
    _dot_row_by_row()

import pytest  # noqa: E402

pytest.importorskip("triton")

from functional_llm.errors import InvalidConfig  # noqa: E402
from functional_llm.kernels import get_backend  # noqa: E402
from functional_llm.kernels.base import (FP8, AttnBatch, cache_views, new_pool,  # noqa: E402
                                         quantize)
from functional_llm.kernels.reference import ReferenceBackend  # noqa: E402
import functional_llm.kernels.invariant as invariant  # noqa: E402  (re-imported if dropped above)
import functional_llm.kernels.gumbel as gumbel  # noqa: E402  (likewise)
from functional_llm.kernels.triton_attn import TritonBackend, attend, choose_num_splits, rope_write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def _round_to_e4m3_as_the_gpu_does():
    """The interpreter rounds to e4m3 without the carry into the exponent (a value rounding up
    to 128 comes out 64): while this module's tests run, its conversion of fp32/fp16 to e4m3
    goes through torch's (round to nearest even, as the GPU's cvt.rn). On a GPU the kernels
    convert natively and nothing is patched."""
    if DEVICE != "cpu":
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    convert = interpreter._convert_float

    def fixed(x, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype in (tl.float32, tl.float16):
            wide = torch.from_numpy(np.ascontiguousarray(x).astype(np.float32))
            return wide.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(x.shape)
        return convert(x, input_dtype, output_dtype, rounding_mode)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter, "_convert_float", fixed)
        yield
SMALL_TILES = dict(decode_block_n=16, prefill_block_m=16, prefill_block_n=16)   # tl.dot minimum


def make_case(cached, q_lens, S, K, G, D, dtype, device=DEVICE, seed=0):
    """Sequences with `cached` tokens already in the pool and `q_lens` new ones, on randomly
    permuted pages. Pool rows nobody wrote stay NaN, so any unmasked read shows in the output.
    Returns q, k, v, k_cache, v_cache, batch."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(cached, q_lens)]
    pages = [-(-n // S) for n in seq_lens]
    N = sum(pages) + 2
    perm = torch.randperm(N, generator=g).tolist()
    tables = [perm[sum(pages[:b]):sum(pages[:b + 1])] for b in range(len(pages))]
    M = max(pages)
    block_tables = torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    k_cache = torch.full((N, S, K, D), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    for b, n in enumerate(cached):
        for t in range(n):
            k_cache[tables[b][t // S], t % S] = rand(K, D)
            v_cache[tables[b][t // S], t % S] = rand(K, D)
    T = sum(q_lens)
    q, k, v = rand(T, K * G, D), rand(T, K, D), rand(T, K, D)
    slots = [tables[b][t // S] * S + t % S for b in range(len(cached))
             for t in range(cached[b], seq_lens[b])]
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    batch = AttnBatch(slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device),
                      cu_q=cu_q.to(device),
                      seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device),
                      block_tables=block_tables.to(device), max_q=max(q_lens),
                      max_seq_len=max(seq_lens))
    return (*(x.to(device) for x in (q, k, v, k_cache, v_cache)), batch)


def pool(k_cache, v_cache):
    """A one-layer pool [1, 2, N, S, K, D] holding copies of the caches."""
    return torch.stack([k_cache, v_cache])[None].clone()


def fp8_pool(k_cache, v_cache):
    """The fp8 pool (kernels/base.py) holding the caches quantized. Rows nobody wrote get NaN
    scales and random finite e4m3 values (the pool holds finite values only): any weight a
    kernel gave such a row would show in its output."""
    N, S, K, D = k_cache.shape
    kv = new_pool(1, N, S, K, D, k_cache.dtype, True, k_cache.device)
    junk = (torch.rand(N, S, K, D, generator=torch.Generator().manual_seed(1)) * 896 - 448).to(FP8)
    for i, cache in enumerate((k_cache, v_cache)):
        values, scales = cache_views(kv, 0, i, K, D)
        values[:], scales[:] = quantize(cache)
        unwritten = cache.isnan().any(-1)
        values[unwritten] = junk.to(values.device)[unwritten]
    return kv


def run_both(case, triton_backend, scale=None, make_pool=pool):
    """(reference out, k_cache, v_cache), (triton out, k_cache, v_cache) on copies of the pool."""
    q, k, v, k_cache, v_cache, batch = case
    scale = scale or q.shape[-1] ** -0.5
    results = []
    for backend in (ReferenceBackend(), triton_backend):
        kv = make_pool(k_cache, v_cache)
        out = backend.forward(q, k, v, kv, 0, backend.prepare(batch), scale)
        results.append((out, kv[0, 0], kv[0, 1]))
    return results


def check(case, triton_backend, tol):
    (ref, ref_k, ref_v), (out, k_cache, v_cache) = run_both(case, triton_backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(k_cache, ref_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, ref_v, rtol=0, atol=0, equal_nan=True)


FP32, FP16 = (torch.float32, 1e-5), (torch.float16, 1e-2)

# (cached, q_lens, S, K, G, D, (dtype, tol), backend overrides)
CASES = {
    # three splits: sequence 2 (one key) leaves two empty; 41 and 62 keys end mid-page
    "decode-split-gqa4": ([40, 7, 0, 61], [1, 1, 1, 1], 8, 2, 4, 32, FP32, dict(num_splits=3)),
    "decode-one-split-mqa": ([40, 3], [1, 1], 16, 1, 8, 32, FP16, dict(num_splits=1)),
    "decode-block4-gqa3": ([21, 9], [1, 1], 4, 2, 3, 16, FP32, dict(num_splits=2)),
    # keys 0..31 need no causal mask (phase 1), 32..42 do; 11 pages of 4
    "prefix-then-chunk": ([37], [6], 4, 2, 2, 16, FP32, {}),
    "fresh-prefill-mha": ([0, 0], [11, 3], 8, 2, 1, 64, FP16, {}),
    "mixed-gqa3": ([20, 5, 33, 0, 9], [1, 6, 1, 9, 1], 8, 2, 3, 32, FP32, dict(num_splits=2)),
    "mixed-gqa8-fp16": ([20, 5, 33, 0], [1, 7, 1, 4], 16, 1, 8, 64, FP16, dict(num_splits=2)),
    "mixed-gqa2-fp16": ([18, 3, 30], [1, 5, 1], 8, 2, 2, 32, FP16, dict(num_splits=4)),
    # pages of 32, tiles of 32 keys; writes at page rows past 16
    "mixed-page32": ([50, 5, 70], [1, 14, 1], 32, 2, 2, 16, FP32,
                     dict(num_splits=2, decode_block_n=32, prefill_block_n=32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    cached, q_lens, S, K, G, D, (dtype, tol), overrides = CASES[name]
    case = make_case(cached, q_lens, S, K, G, D, dtype)
    check(case, TritonBackend(**{**SMALL_TILES, **overrides}), tol)


def same_quantization(kv, ref_kv, K, D, which=(0, 1), steps=0):
    """The two fp8 pools hold the same scales and e4m3 values (NaN where unwritten); steps > 0:
    values up to that many e4m3 steps apart and scales to 1e-5 (inputs unequal in the last bit)."""
    for i in which:
        (values, scales), (ref_values, ref_scales) = (cache_views(p, 0, i, K, D) for p in (kv, ref_kv))
        torch.testing.assert_close(scales, ref_scales, rtol=1e-5 if steps else 0, atol=0, equal_nan=True)
        a, b = values.float(), ref_values.float()
        apart = (values.view(torch.uint8).int() - ref_values.view(torch.uint8).int()).abs()
        off = (apart > steps) & (a != b) & ~(a.isnan() & b.isnan())
        assert not off.any(), off.nonzero()[:5]


@pytest.mark.parametrize("name", ["decode-split-gqa4", "decode-block4-gqa3", "prefix-then-chunk",
                                  "mixed-gqa3", "decode-one-split-mqa", "mixed-page32"])
def test_fp8_pool_matches_reference(name):
    """With the fp8 pool: the new K/V quantized as the reference quantizes them (values and
    scales), and attention over the e4m3 values and scales as the reference's over its
    dequantized copy. Unwritten rows hold junk and NaN scales (fp8_pool): a weight given to one
    would show. decode-one-split-mqa: tiles of one page (one table lookup a tile)."""
    cached, q_lens, S, K, G, D, (dtype, tol), overrides = CASES[name]
    q, k, v, k_cache, v_cache, batch = make_case(cached, q_lens, S, K, G, D, dtype)
    backend, reference, scale = TritonBackend(**{**SMALL_TILES, **overrides}), ReferenceBackend(), D ** -0.5
    kv, ref_kv = fp8_pool(k_cache, v_cache), fp8_pool(k_cache, v_cache)
    ref = reference.forward(q, k, v, ref_kv, 0, reference.prepare(batch), scale)
    out = backend.forward(q, k, v, kv, 0, batch, scale)
    same_quantization(kv, ref_kv, K, D)
    assert not torch.equal(kv, fp8_pool(k_cache, v_cache))           # the new K/V were written
    # attention alone over the pool the reference wrote
    (kc, ks), (vc, vs) = (cache_views(ref_kv, 0, i, K, D) for i in (0, 1))
    read = attend(q, kc, vc, batch.cu_q, batch.seq_lens, batch.block_tables, batch.max_seq_len,
                  scale, backend.tiles, (ks, vs))
    assert torch.isfinite(read).all()
    torch.testing.assert_close(read, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # attention really reads the quantized values: the full-precision caches give another answer
    exact = backend.forward(q, k, v, pool(k_cache, v_cache), 0, batch, scale)
    assert not torch.allclose(read, exact, rtol=tol, atol=tol)


def test_default_tiles_and_heuristic_splits():
    """The tile sizes and num_splits a real run picks (here head_dim 128, fp32 tiles)."""
    backend = TritonBackend()
    assert choose_num_splits(2, 2, 300, 8) == 2     # 8 SMs: the interpreter's stand-in
    check(make_case([299, 0, 40], [1, 20, 1], 16, 2, 2, 128, torch.float32), backend, 1e-5)


def test_decode_programs_start_longest_first_and_give_the_same_bits():
    """prepare orders the rows longest first (ties in row order); decode programs started in that
    order give bit for bit what programs started in row order give (the order only changes
    which programs fill an SM's tail: benchmarks/RESULTS.md)."""
    q, k, v, k_cache, v_cache, batch = make_case([40, 7, 90, 7, 2], [1, 1, 1, 1, 3], 8, 2, 2, 16,
                                                 torch.float32)
    backend = TritonBackend(**SMALL_TILES)
    prepared = backend.prepare(batch)
    assert prepared.extra.tolist() == [2, 0, 1, 3, 4]          # seq_lens 41, 8, 91, 8, 5
    ordered = backend.forward(q, k, v, pool(k_cache, v_cache), 0, prepared, 1.0)
    unordered = backend.forward(q, k, v, pool(k_cache, v_cache), 0, batch, 1.0)
    assert torch.isfinite(ordered).all() and torch.equal(ordered, unordered)


def test_num_splits_heuristic():
    assert choose_num_splits(256, 8, 850, 132) == 1           # big batch: no combine step
    assert choose_num_splits(1, 8, 850, 132) == 4             # limited by 256 keys a split
    assert choose_num_splits(1, 8, 40960, 132) == 64          # limited by the split cap
    assert choose_num_splits(4, 2, 10_000, 132) == 40         # 4 programs per SM
    assert choose_num_splits(1, 1, 1, 132) == 1


def test_negative_slot_is_not_written():
    _, k, v, k_cache, v_cache, batch = make_case([5, 0], [1, 2], 8, 2, 2, 16, torch.float32)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    rope_write_kv(k, k, v, k_cache, v_cache, torch.full_like(batch.slot_mapping, -1), None, None, None,
                  None, 0.0)     # the plain KV write (no norm, no rope)
    torch.testing.assert_close(k_cache, before_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, before_v, rtol=0, atol=0, equal_nan=True)


def test_registry_and_missing_triton(monkeypatch):
    import importlib.util
    import sys
    import types
    assert get_backend("triton").name == "triton"
    name = "functional_llm.kernels.triton_attn"
    without = importlib.util.module_from_spec(importlib.util.find_spec(name))
    monkeypatch.setitem(sys.modules, "triton", None)          # `import triton` now fails
    # the copy must not re-register functional_llm::triton_attention: later tests would then
    # call the triton-less copy's kernels through the op
    monkeypatch.setattr(torch.library, "custom_op", lambda *a, **k: lambda fn: types.SimpleNamespace(
        register_fake=lambda fake: fake))
    without.__spec__.loader.exec_module(without)               # ...but the module imports
    monkeypatch.setitem(sys.modules, name, without)
    with pytest.raises(InvalidConfig, match="triton"):
        get_backend("triton")


def test_fp8_writes_store_finite_values_only():
    """A NaN in a new K or V row is written to the fp8 pool as 0, by the triton write as by the
    reference's quantize: the pool holds finite values only, so the attention kernels may read
    a page's slots past a sequence's end and weigh them 0 (kernels/base.py)."""
    q, k, v, k_cache, v_cache, batch = make_case([5, 3], [1, 2], 8, 2, 2, 16, torch.float32)
    k[0, 1, 3] = v[2, 0, 7] = float("nan")
    for backend in (ReferenceBackend(), TritonBackend(**SMALL_TILES)):
        kv = fp8_pool(k_cache, v_cache)
        backend.forward(q, k, v, kv, 0, backend.prepare(batch), 0.25)
        assert not torch.equal(kv, fp8_pool(k_cache, v_cache))
        for i in (0, 1):
            assert cache_views(kv, 0, i, 2, 16)[0].float().isfinite().all(), (backend.name, i)


# ---- at real sizes, on a GPU only -----------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("S", [16, 128])
@pytest.mark.parametrize("num_splits", [None, 7])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_real_sizes_bf16(S, num_splits, mixed, fp8):
    """64 sequences x ~1000 keys, Qwen3-0.6B heads (16 q, 8 kv, head_dim 128), bf16, against
    the reference run in fp32 on the same bf16 inputs. `mixed`: every 8th row is a 100-token
    chunk after a cached prefix of ~900, the rest decode. num_splits None: the heuristic.
    fp8: both on the fp8 pool; the new K/V quantized bit for bit as the reference does."""
    g = torch.Generator().manual_seed(S)
    ctx = torch.randint(900, 1100, (64,), generator=g).tolist()
    q_lens = [100 if mixed and b % 8 == 0 else 1 for b in range(64)]
    cached = [c - n for c, n in zip(ctx, q_lens)]
    q, k, v, k_cache, v_cache, batch = make_case(cached, q_lens, S, 8, 2, 128, torch.bfloat16,
                                                 device="cuda", seed=S)
    reference = ReferenceBackend()
    ref_kv = fp8_pool(k_cache, v_cache) if fp8 else pool(k_cache, v_cache).float()
    ref = reference.forward(q.float(), k.float(), v.float(), ref_kv, 0,
                            reference.prepare(batch), 128 ** -0.5)
    backend = TritonBackend(num_splits=num_splits)
    kv = (fp8_pool if fp8 else pool)(k_cache, v_cache)
    out = backend.forward(q, k, v, kv, 0, backend.prepare(batch), 128 ** -0.5)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    if fp8:
        same_quantization(kv, ref_kv, 8, 128)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_does_not_sync_and_replays_in_a_graph():
    q, k, v, k_cache, v_cache, batch = make_case([500] * 6, [1] * 6, 16, 8, 2, 128, torch.bfloat16,
                                                 device="cuda")
    backend = TritonBackend()
    prepared = backend.prepare(batch)
    kv = pool(k_cache, v_cache)
    eager = backend.forward(q, k, v, kv, 0, prepared, 0.1)       # compiles
    torch.cuda.set_sync_debug_mode("error")
    try:
        backend.forward(q, k, v, kv, 0, backend.prepare(batch), 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = backend.forward(q, k, v, kv, 0, backend.prepare(batch), 0.1)
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


def test_shapes_the_kernels_cannot_serve_are_typed_before_anything_starts(tmp_path, monkeypatch):
    """A block size or head shape the kernels would assert on at the first step is an
    InvalidConfig naming the parameter when the LLM is built, before any weight is loaded."""
    with pytest.raises(InvalidConfig) as e:
        TritonBackend.check(12, 4, 2, 32)
    assert e.value.parameter == "block_size"
    with pytest.raises(InvalidConfig) as e:
        TritonBackend.check(16, 4, 2, 24)
    assert e.value.parameter == "head_dim"
    with pytest.raises(InvalidConfig) as e:
        TritonBackend.check(16, 34, 2, 32)                 # 17 query heads per kv head
    assert e.value.parameter == "num_attention_heads"
    TritonBackend.check(16, 32, 2, 128)                    # what it serves passes

    from functional_llm import LLM
    from functional_llm.runtime import build
    from tiny_models import make_tiny_model
    folder = make_tiny_model("llama", tmp_path)
    built, real = [], build.build_runner
    monkeypatch.setattr("functional_llm.llm.build_runner", lambda *a, **k: built.append(1) or real(*a, **k))
    with pytest.raises(InvalidConfig) as e:
        LLM(str(folder), device="cpu", attention_backend="triton", block_size=12)
    assert e.value.parameter == "block_size" and not built


@pytest.mark.parametrize("q_lens", [[1, 7, 3], [1, 1, 1]])
@pytest.mark.parametrize("norms,dtype,tol,fp8", [(True, torch.float32, 1e-5, False), (False, torch.float32, 1e-5, False),
                                                 (True, torch.float16, 2e-2, False), (True, torch.float32, 1e-5, True)])
def test_fused_norm_rope_kv_write_matches_reference(norms, dtype, tol, fp8, q_lens):
    """The triton backend given q/k as projected plus `rope` (one kernel: q/k per-head norm,
    rotation, KV write) against model.llama.qk_norm_rope followed by the reference backend,
    for a mixed step and a step of decodes only."""
    from functional_llm.model.llama import qk_norm_rope, rope_cos_sin
    q, k, v, k_cache, v_cache, batch = make_case([20, 0, 9], q_lens, 8, 2, 3, 32, dtype, seed=3)
    positions = torch.cat([torch.arange(s - n, s) for s, n in
                           zip(batch.seq_lens.tolist(), q_lens)]).to(DEVICE)
    cos, sin = rope_cos_sin(positions, 32, 1e4, dtype)
    g = torch.Generator().manual_seed(5)
    weights = [(1 + 0.3 * torch.randn(32, generator=g)).to(dtype).to(DEVICE) for _ in "qk"] if norms else [None, None]
    results = []
    for fused in (False, True):
        kv = (fp8_pool if fp8 else pool)(k_cache, v_cache)
        if fused:
            out = TritonBackend(**SMALL_TILES).forward(q, k, v, kv, 0, batch, 32 ** -0.5,
                                                       rope=(cos, sin, *weights, 1e-6))
        else:
            qr, kr = qk_norm_rope(q, k, *weights, cos, sin, 1e-6)
            out = ReferenceBackend().forward(qr, kr, v, kv, 0, ReferenceBackend().prepare(batch), 32 ** -0.5)
        results.append((out, kv))
    (ref, ref_kv), (out, kv) = results
    assert torch.isfinite(out).all()
    if fp8:      # quantized as the unfused path quantizes (out: see test_fp8_pool_matches_reference)
        same_quantization(kv, ref_kv, 2, 32, which=(1,))
        same_quantization(kv, ref_kv, 2, 32, which=(0,), steps=1)   # rotation: last-bit differences
        assert not torch.equal(kv, fp8_pool(k_cache, v_cache))
        return
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(kv.float(), ref_kv.float(), rtol=tol, atol=tol, equal_nan=True)
    assert not torch.equal(kv[0, 0], pool(k_cache, v_cache)[0, 0])     # keys really written


def test_fp8_kv_through_the_llm_gives_the_reference_tokens(tmp_path):
    """LLM(kv_cache_dtype='fp8') on the triton backend: the reference backend's fp8 tokens,
    with prefills chunked so later chunks and decodes read the quantized prefix back; and
    logprobs unlike the full-precision cache's (the cache really quantizes)."""
    from functional_llm import LLM, SamplingParams
    from tiny_models import make_tiny_model
    folder = str(make_tiny_model("qwen3", tmp_path, seed=2))
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(1, 250, (n,), generator=g).tolist() for n in (37, 9, 50)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    out = {}
    for backend, kv_dtype in (("reference", "fp8"), ("triton", "fp8"), ("triton", "auto")):
        llm = LLM(folder, device=DEVICE, dtype="float32", attention_backend=backend,
                  block_size=16, max_num_batched_tokens=32, kv_cache_dtype=kv_dtype)
        outs = llm.generate(ps, sp, use_tqdm=False)
        out[backend, kv_dtype] = ([o.token_ids for o in outs],
                                  [[lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)] for o in outs])
        assert llm.counters["chunked_prefills"] >= 2
    assert out["triton", "fp8"][0] == out["reference", "fp8"][0]
    torch.testing.assert_close(out["triton", "fp8"][1], out["reference", "fp8"][1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.tensor(out["triton", "fp8"][1]), torch.tensor(out["triton", "auto"][1]),
                              rtol=1e-4, atol=1e-4)


# -- batch-invariant mode (kernels/invariant.py, TritonBackend.invariant) ----------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_invariant_gemm_and_norm_rows_are_bitwise_the_same_for_any_m(dtype):
    """Each row of the fixed-tile GEMM (with bias) and of the one-program-per-row RMSNorm is
    bit for bit the same whatever the row count (1 ... 256) and wherever the row sits; both
    agree with F.linear / model.llama.rms_norm to rounding."""
    from functional_llm.model.llama import rms_norm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 96, generator=g).to(dtype).to(DEVICE)
    w, b = torch.randn(80, 96, generator=g).to(dtype).to(DEVICE), torch.randn(80, generator=g).to(dtype).to(DEVICE)
    nw = (1 + 0.2 * torch.randn(96, generator=g)).to(dtype).to(DEVICE)
    full, normed = invariant.matmul(x, w, b), invariant.rms_norm(x, nw, 1e-6)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(full.float(), torch.nn.functional.linear(x.float(), w.float(), b.float()), **tol)
    torch.testing.assert_close(normed.float(), rms_norm(x, nw, 1e-6).float(), **tol)
    for m in (1, 2, 7, 63, 64, 65, 129, 255):
        assert torch.equal(invariant.matmul(x[:m], w, b), full[:m]), m
        assert torch.equal(invariant.rms_norm(x[:m], nw, 1e-6), normed[:m]), m
    perm = torch.randperm(256, generator=g).to(DEVICE)
    assert torch.equal(invariant.matmul(x[perm], w, b), full[perm])
    assert torch.equal(invariant.matmul(x[perm[:5]], w, b), full[perm[:5]])


def _attend_rows(backend, q, k_cache, v_cache, table, steps, S):
    """Run one sequence's query rows through `attend` as the given steps; each step is a
    list of (first, last+1) query ranges of the sequence (several ranges: the same sequence
    written as separate rows in one step, a stand-in for other sequences sharing it), each
    row seeing keys 0 .. its position. Returns {position: out row}."""
    rows = {}
    for ranges in steps:
        idx = torch.cat([torch.arange(a, b) for a, b in ranges])
        cu = torch.tensor([0] + [b - a for a, b in ranges]).cumsum(0).to(torch.int32)
        seq_lens = torch.tensor([b for _, b in ranges], dtype=torch.int32)
        tables = table[None].expand(len(ranges), -1).contiguous()
        out = attend(q[idx.to(DEVICE)], k_cache, v_cache, cu.to(DEVICE), seq_lens.to(DEVICE), tables.to(DEVICE),
                     int(seq_lens.max()), 0.125, backend.tiles)
        for i, pos in enumerate(idx.tolist()):
            rows.setdefault(pos, []).append(out[i])
    return rows


def test_invariant_attention_gives_a_row_the_same_bits_in_decode_and_any_prefill_chunk():
    """TritonBackend.invariant(): the output for the token at position p is bit for bit the
    same whether p is decoded alone, decoded beside other rows, or sits anywhere in a prefill
    chunk starting at any offset (chunked prefill, prefix hits, recompute after preemption).
    The default configuration (split-KV, decode tiles of other sizes) fails the same check."""
    S, K, G, D, P = 8, 2, 3, 32, 150
    g = torch.Generator().manual_seed(1)
    N = P // S + 2
    perm = torch.randperm(N, generator=g)
    table = perm[:-(-P // S)].to(torch.int32)
    k_cache, v_cache = (torch.randn(N, S, K, D, generator=g).to(DEVICE) for _ in "kv")
    q = torch.randn(P, K * G, D, generator=g).to(DEVICE)
    steps = ([[(0, 150)]], [[(0, 37)], [(37, 100)], [(100, 150)]],       # whole, chunked
             [[(0, 5), (5, 70), (70, 71)], [(71, 150), (120, 121), (149, 150)]],   # with others
             [[(p, p + 1)] for p in (0, 36, 63, 64, 99, 130, 149)],     # decodes alone
             [[(p, p + 1), (3, 90)] for p in (64, 149)])                # decodes in a mixed step

    def spread(backend):
        rows = {}
        for sched in steps:
            for pos, outs in _attend_rows(backend, q, k_cache, v_cache, table, sched, S).items():
                rows.setdefault(pos, []).extend(outs)
        assert len(rows) == P and sum(len(v) > 2 for v in rows.values()) >= 9
        return sum(not all(torch.equal(o, outs[0]) for o in outs) for outs in rows.values())
    assert spread(TritonBackend().invariant()) == 0
    assert spread(TritonBackend(num_splits=3)) > 0


# -- the GPU sampler's Gumbel-max (kernels/gumbel.py) against runtime/sampling.py's torch code --

@pytest.mark.parametrize("vocab", [4096 * 2 + 37, 20_000])
def test_gumbel_kernel_samples_the_torch_samplers_tokens(vocab):
    """Sampled and greedy rows, ties (logits rounded to a coarse grid: the first column must
    win across lanes and chunks), -inf columns, banned ids (each row's winner, in some rows)
    and a width the chunks do not divide: the kernel's tokens are the torch sampler's, and the
    sampled rows really are noisy."""
    from functional_llm.runtime.sampling import gumbel_argmax, mask_banned, row_lanes
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(12, vocab, generator=gen) * 2).round()
    logits[4] = 1.0                                   # a greedy row of ties: column 0 wins
    logits[:, 5::7] = -math.inf
    temperature = torch.tensor([0.0, 0.7, 1.0, 2.5] * 3)
    seeds, positions = torch.arange(12) * 977 + 2**40, torch.arange(12) + 300
    lanes = torch.stack(row_lanes(seeds, positions), 1)

    def want(logits):
        greedy = logits.argmax(dim=-1)
        scaled = logits / torch.where(temperature == 0, 1.0, temperature)[:, None]
        return torch.where(temperature == 0, greedy, gumbel_argmax(scaled, seeds, positions))
    got = gumbel.sample_tokens(*(t.to(DEVICE) for t in (logits, temperature, lanes))).cpu()
    assert torch.equal(got, want(logits))
    assert (got != logits.argmax(dim=-1))[temperature > 0].sum() >= 6 and (got >= 4096).any()
    banned = torch.stack([got, torch.full_like(got, 3), torch.full_like(got, -1)], 1)
    banned[::3] = -1                                  # rows 0, 3, 6, 9 ban nothing
    now = gumbel.sample_tokens(*(t.to(DEVICE) for t in (logits, temperature, lanes, banned))).cpu()
    assert torch.equal(now, want(mask_banned(logits, banned)))
    assert torch.equal(now == got, banned[:, 0] < 0)     # a winner banned moves; the rest stay
