"""Batch-invariant GEMM and RMSNorm, for LLM(batch_invariant=True).

A row's result must not depend on what else is in the step. cuBLAS picks its kernel (tiles,
split-K, stream-K) from the shapes, and torch's and Inductor's reductions pick theirs from the
row count, so the same row can be summed in another order inside another batch. These kernels
have one fixed configuration: `matmul` gives each output tile one program that walks K in
fixed BLOCK_K steps (no split-K), and `rms_norm` gives each row one program that reduces the
whole row at once. Either way a row is computed by the same instructions in the same order
whatever M is or where the row sits. Both are registered ops (namespace functional_llm_bi,
which the piecewise compile does not cut at). The mode needs a GPU; on the CPU the ops fall
back to torch (tests of the plumbing), and the tests run the Triton code under the interpreter.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError:       # the GPU path needs triton; the CPU path does not
    triton, _jit = None, (lambda fn: fn)

    class tl:
        constexpr = None

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64     # fixed: changing them changes the numerics


@_jit
def _matmul(x, w, bias, out, M, N, K, stride_xm, stride_wn, stride_om, HAS_BIAS: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    rm, rn = tl.program_id(0) * BM + tl.arange(0, BM), tl.program_id(1) * BN + tl.arange(0, BN)
    rk, acc = tl.arange(0, BK), tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(x + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(w + rn[None, :].to(tl.int64) * stride_wn + kk[:, None],
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rm[:, None].to(tl.int64) * stride_om + rn[None, :],
             acc.to(out.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@_jit
def _rms_norm(x, w, out, stride_x, E, eps, BLOCK: tl.constexpr):
    """Row r of x -> w * norm(row), rounded as model.llama.rms_norm (statistics in fp32,
    cast back to the input dtype before the weight)."""
    r = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK)
    h = tl.load(x + r * stride_x + e, mask=e < E, other=0.0)
    h32 = h.to(tl.float32)
    normed = (h32 * tl.rsqrt(tl.sum(h32 * h32, 0) / E + eps)).to(h.dtype).to(tl.float32)
    y = tl.load(w + e, mask=e < E, other=0.0).to(tl.float32) * normed
    tl.store(out + r * E + e, y.to(out.dtype.element_ty), mask=e < E)


def matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T (+ bias [N]) -> [M, N] in x's dtype, by the fixed-tile kernel."""
    (M, K), N = x.shape, w.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    assert w.stride(1) == 1
    out = x.new_empty(M, N)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _matmul[grid](x, w, bias if bias is not None else w, out, M, N, K, x.stride(0), w.stride(0),
                  out.stride(0), HAS_BIAS=bias is not None, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
                  PREC="ieee" if x.dtype == torch.float32 else None, num_warps=4, num_stages=3)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [M, E] -> rms_norm(x) [M, E], one program per row."""
    M, E = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    out = x.new_empty(M, E)
    _rms_norm[(M,)](x, weight, out, x.stride(0), E, eps, BLOCK=triton.next_power_of_2(E), num_warps=4)
    return out


@torch.library.custom_op("functional_llm_bi::linear", mutates_args=())
def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, batch-invariant on CUDA (model.llama with cfg.batch_invariant)."""
    return matmul(x, w, bias) if x.is_cuda else torch.nn.functional.linear(x, w, bias)


@linear.register_fake
def _(x, w, bias=None):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("functional_llm_bi::rms_norm", mutates_args=())
def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.llama.rms_norm over the last dim, batch-invariant on CUDA."""
    if x.is_cuda:
        return rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)
    x32 = x.float()              # model.llama.rms_norm's formula
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)
