"""The Triton kernels compiled ahead of time for an H100/H200 (sm_90), without a GPU: Triton's
own ptxas turns them into machine code here, so a kernel that would fail to compile there (an
fp8 conversion, a tile shape) fails in CI instead. And the PTX shows which matrix instruction
each tile uses, which the batch-invariant mode depends on: a row must take the same
instruction whether it decodes or sits in a prefill chunk. The compiles run in a child process
(test_triton_attn.py switches this one's Triton to its interpreter). CI's Triton may be newer
than a GPU machine's.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _ptx(kernel, constexprs: dict, pointers: dict, warps: int = 4, stages: int = 2) -> str:
    """PTX of kernel for sm_90 (ptxas must accept it); arguments not named in `pointers` are
    i32, or fp32 for the scales."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {p.name: "constexpr" if p.is_constexpr else pointers.get(
        p.name, "fp32" if p.name in ("qk_scale", "eps") else "i32") for p in kernel.params}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"]
    return compiled.asm["ptx"]


def _report() -> dict:
    """{kernel: {"mma": instruction kinds, "e4m3": converts fp8}} for the attention kernels
    with a bf16 and an fp8 pool (Qwen3-0.6B heads: G = 2, head_dim 128, block 16), the
    invariant tiles and the default 64-row prefill tile, and the invariant GEMM and norm."""
    from functional_llm.kernels import invariant, triton_attn
    tiles = triton_attn.TritonBackend().invariant().tiles
    out = {}

    def note(name, code):
        out[name] = {"mma": sorted(k for k in ("wgmma", "mma.sync") if k in code), "e4m3": "e4m3" in code}
    for cache in ("bf16", "fp8e4nv"):
        p = {n: "*bf16" for n in ("q", "k", "v", "out", "q_out", "cos", "sin", "q_norm", "k_norm")}
        p.update({n: "*" + cache for n in ("k_cache", "v_cache")})
        p.update({n: "*fp32" for n in ("k_scale", "v_scale", "part_out", "part_lse")})
        p.update({n: "*i32" for n in ("cu_q", "seq_lens", "block_tables")}, slot_mapping="*i64", order="*i64")
        common = dict(D=128, PAGE=16, PREC=None, FP8=cache != "bf16")
        note(f"decode/{cache}", _ptx(triton_attn._decode, dict(
            common, G=2, BLOCK_G=16, BLOCK_N=tiles.decode_block_n, SPLIT=False, ORDERED=True), p,
            tiles.decode_warps, tiles.decode_stages))
        for block_m in (tiles.prefill_block_m, 64):
            note(f"prefill{block_m}/{cache}", _ptx(triton_attn._prefill, dict(
                common, G=2, BLOCK_M=block_m, BLOCK_Q=block_m // 2, BLOCK_N=tiles.prefill_block_n,
                BLOCK_B=256), p))
        note(f"write/{cache}", _ptx(triton_attn._rope_write_kv, dict(
            G=2, NORM=True, ROPE=True, BLOCK_G=2, D=128, PAGE=16, FP8=cache != "bf16"), p, warps=1))
    note("gemm", _ptx(invariant._matmul, dict(HAS_BIAS=True, BM=invariant.BLOCK_M, BN=invariant.BLOCK_N,
                                              BK=invariant.BLOCK_K, PREC=None),
                      {n: "*bf16" for n in ("x", "w", "bias", "out")}, 4, 3))
    note("norm", _ptx(invariant._rms_norm, dict(BLOCK=1024), {n: "*bf16" for n in ("x", "w", "out")}, 4, 1))
    out["tiles"] = [tiles.decode_block_n, tiles.prefill_block_n, tiles.prefill_block_m]
    return out


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90_and_fp8_pools_convert_e4m3(report):
    for name, r in report.items():
        if name != "tiles":
            assert r["e4m3"] == name.endswith("fp8e4nv"), name
    assert report["gemm"]["mma"] == ["wgmma"]        # tensor cores, one fixed tile


def test_invariant_tiles_give_decode_and_prefill_rows_one_instruction(report):
    """With the invariant tiles (same keys per tile; 16-row query tiles) decode and prefill
    take the same MMA instruction; the default 64-row prefill tile takes another (wgmma): one
    reason the default mode is not batch-invariant."""
    block_n, prefill_block_n, block_m = report["tiles"]
    assert block_n == prefill_block_n and block_m == 16
    for cache in ("bf16", "fp8e4nv"):
        assert report[f"decode/{cache}"]["mma"] == report[f"prefill16/{cache}"]["mma"] == ["mma.sync"]
        assert report[f"prefill64/{cache}"]["mma"] == ["wgmma"]


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    print(json.dumps(_report()))
