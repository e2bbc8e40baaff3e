"""Gumbel-max sampling over the whole vocabulary on a GPU, in one pass by [B, chunks] programs.

runtime/sampling.py's unfiltered draw is argmax over the vocab of x / T + g, g = -log(-log(u)),
u from sampling's counter-based hash. Compiled by Inductor it was one program per row reducing
the whole row: at V = 152k that left the GPU mostly idle (two waves of programs at 256 rows,
32 busy SMs at 32 rows; benchmarks/RESULTS.md). Here each program takes one chunk of one row
and writes its best (score, column); the row's token is the first chunk's best among the
chunks' maxima, so ties go to the first column, as with torch's argmax. A greedy row (T = 0)
scores its raw logits. x / T is taken as x * (1 / T) (within an ulp; a division a column made the
kernel 1.2x slower). A row's banned ids (min_tokens) score -inf here, which saves
sampling.mask_banned's [B, V] copy of the logits. The hash is sampling.uniform_bits in uint32
arithmetic (wrapping multiplies, logical shifts: the same bits; tests). Unlike torch's argmax a
NaN never wins.
`gumbel_max` is a registered op (namespace functional_llm_sample, which the piecewise
compile does not cut at); the CPU runs sampling's torch code, and the tests run this one under
Triton's interpreter.
"""
from __future__ import annotations

from typing import Optional

import torch

from functional_llm.kernels.triton_attn import _jit, tl, triton   # triton None without it

CHUNK, BLOCK = 4096, 1024   # columns a program, columns a step of its loop


@_jit
def _mix32(x):
    """sampling._mix32 on uint32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x27D4EB2F
    return x ^ (x >> 16)


@_jit
def _gumbel_max(logits, temperature, lanes, banned, best, best_col, stride, V, chunks, W,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    b, c = tl.program_id(0), tl.program_id(1)
    t = tl.load(temperature + b)
    inv = tl.math.div_rn(1.0, tl.where(t == 0, 1.0, t))
    lane_a, lane_b = tl.load(lanes + 2 * b).to(tl.uint32), tl.load(lanes + 2 * b + 1).to(tl.uint32)
    top, at = tl.full([BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK], tl.int32)
    for start in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
        col = start + tl.arange(0, BLOCK)
        x = tl.load(logits + b.to(tl.int64) * stride + col, mask=col < V, other=float("-inf")).to(tl.float32)
        bits = _mix32((lane_a + col.to(tl.uint32) * 0x61C88647) ^ lane_b) >> 9
        u = (bits.to(tl.float32) + 0.5) * 1.1920928955078125e-07        # 2**-23
        score = tl.where(t == 0, x, x * inv - tl.log(-tl.log(u)))
        for w in range(W):     # the row's banned ids (-1: none) score -inf, as sampling.mask_banned
            score = tl.where(col == tl.load(banned + b * W + w), float("-inf"), score)
        won = score > top         # strictly: a lane keeps its first best column
        top, at = tl.where(won, score, top), tl.where(won, col, at)
    high = tl.max(top, 0)
    tl.store(best + b * chunks + c, high)
    tl.store(best_col + b * chunks + c, tl.min(tl.where(top == high, at, V), 0))


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, lanes: torch.Tensor,
                  banned: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (any float dtype), temperature [B] float32 (0 = greedy), lanes [B, 2] int64
    (sampling.row_lanes), banned [B, W] int64 ids never drawn (-1: none) -> tokens [B] int64."""
    (B, V), chunks = logits.shape, triton.cdiv(logits.shape[1], CHUNK)
    best = torch.empty(B, chunks, dtype=torch.float32, device=logits.device)
    best_col = torch.empty(B, chunks, dtype=torch.int32, device=logits.device)
    width, banned = (0, lanes) if banned is None else (banned.shape[1], banned.contiguous())  # lanes: unread
    _gumbel_max[(B, chunks)](logits, temperature, lanes, banned, best, best_col, logits.stride(0), V,
                             chunks, width, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4)
    return best_col.gather(1, best.argmax(dim=1, keepdim=True))[:, 0].long()


@torch.library.custom_op("functional_llm_sample::gumbel_max", mutates_args=())
def gumbel_max(logits: torch.Tensor, temperature: torch.Tensor, lanes: torch.Tensor,
               banned: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sample_tokens as one op of the compiled step."""
    return sample_tokens(logits, temperature, lanes, banned)


@gumbel_max.register_fake
def _(logits, temperature, lanes, banned=None):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)
