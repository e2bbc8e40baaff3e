"""The attention-backend interface.

Shape letters (STYLE.md): B batch (sequences in the step), T tokens in the step, H query heads,
K kv heads, D head dim, N pool blocks, S block size, M max blocks per sequence.

The KV pool for one layer is a pair of tensors `k_cache, v_cache`, each [N, S, K, D]; the whole
pool is one tensor `kv` [L, 2, N, S, K, D] that the step receives and returns (the only object
updated in place, like a donated buffer). Token t of a sequence lives in block
`block_table[t // S]` at row `t % S`; its flat slot is `block * S + t % S`.

With kv_cache_dtype "fp8" the pool is still one buffer (one donated object, one mutated op
argument), uint8 [L, 2, N, S*K*(D+4)]: each block holds its S*K*D float8 e4m3 values, then one
float32 scale per (token, kv head). `cache_views` gives the two as views [N, S, K, D] and
[N, S, K]. Why per (token, head): a token's scale is fixed when it is written (no block-wide
scale to requantize while the block fills) and one outlier token costs only its own precision;
4 bytes per 128-value row is 3% of the row. Within a block the keys lie [S, K, D] as in the
bf16 pool, the values [K, D, S] and the scales [K, S]: keys contiguous where attention sums
over them (the weights times V; kernels/triton_attn.py), so a tile of V or of scales loads in
16-byte pieces, with no byte gather feeding the tensor cores. A (kv head, dim) row of V is then
S bytes: below 32 it is part of a 32-byte memory sector and every sector is fetched twice. The
triton backend's fp8 pool defaults to 128-token blocks, so that a 128-key decode tile is one page
(TritonBackend.block_sizes; RESULTS.md has the measurements). The pool holds finite values only
(zeroed at start; a NaN is written as 0), so a kernel may read a page's slots past a sequence's
end and weigh them 0.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import attrs
import torch

from functional_llm.errors import InvalidConfig


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0            # the largest finite e4m3 value: a row's absmax maps to it


def block_bytes(kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, fp8: bool) -> int:
    """Bytes of one block of one layer's keys (or values) in the pool."""
    return block_size * kv_heads * (head_dim + 4 if fp8 else head_dim * dtype.itemsize)


def new_pool(layers: int, blocks: int, block_size: int, kv_heads: int, head_dim: int,
             dtype: torch.dtype, fp8: bool, device) -> torch.Tensor:
    """The zeroed pool (see the module docstring for the fp8 layout)."""
    row = ((block_bytes(kv_heads, head_dim, block_size, dtype, True),) if fp8
           else (block_size, kv_heads, head_dim))
    return torch.zeros(layers, 2, blocks, *row, dtype=torch.uint8 if fp8 else dtype, device=device)


def cache_views(kv: torch.Tensor, layer: int, which: int, kv_heads: int, head_dim: int) -> tuple:
    """(values [N, S, K, D], scales [N, S, K] float32 or None) of layer's keys (which 0) or
    values (1): views of kv, so writing them writes the pool."""
    cache = kv[layer, which]
    if kv.dtype != torch.uint8:
        return cache, None
    N, K, D = cache.shape[0], kv_heads, head_dim
    S = cache.shape[1] // (K * (D + 4))
    values = cache[:, :S * K * D].view(FP8)
    values = values.view(N, S, K, D) if which == 0 else values.view(N, K, D, S).permute(0, 3, 1, 2)
    return values, cache[:, S * K * D:].view(torch.float32).view(N, K, S).transpose(1, 2)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 values [..., D], float32 scales [...]): x ~ values * scale, each
    row scaled so its absmax lands on FP8_MAX (an all-zero row gets the smallest normal scale); a
    NaN is stored as 0, so the pool holds finite values only (the module docstring)."""
    x = x.float()
    scale = x.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
    return (x / scale[..., None]).nan_to_num(0.0).to(FP8), scale


@attrs.frozen(slots=True)
class AttnBatch:
    """Device-side description of one step's attention work, staged once per step.

    The tokens of the step are laid out sequence after sequence: sequence b owns rows
    cu_q[b]:cu_q[b+1] of q/k/v, at absolute positions seq_lens[b] - q_len_b ... seq_lens[b]-1.
    """

    slot_mapping: torch.Tensor   # [T] int64: flat pool slot where each new token's K/V goes
    cu_q: torch.Tensor           # [B+1] int32: prefix sums of per-sequence query lengths
    seq_lens: torch.Tensor       # [B] int32: tokens in KV after this step (cached + new)
    block_tables: torch.Tensor   # [B, M] int32: blocks of each sequence, padded with 0
    max_q: int                   # max query length in the step (host int, no sync needed)
    max_seq_len: int             # max of seq_lens (host int)
    extra: object = None         # backend-private data built by `prepare` (index tensors, ...)


class AttentionBackend(Protocol):
    """Optional attributes, read with getattr: capturable, compilable, fuses_rope (forward's
    docstring), fp8_kv (serves kv_cache_dtype="fp8"), block_sizes (the default block size for
    a bf16/fp32 pool and for an fp8 pool; 16 without it)."""
    name: str

    def prepare(self, batch: AttnBatch) -> AttnBatch:
        """Host side, once per step: return `batch` with `extra` filled in. Pure."""

    def check(self, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise InvalidConfig naming the parameter this backend cannot serve (before anything
        is built)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                layer: int, batch: AttnBatch, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, K, D], kv [L, 2, N, S, K, D] -> out [T, H, D]. Writes k/v into
        kv[layer] at batch.slot_mapping first (the pool is the one in-place object; it is
        passed whole so a compiled step mutates a graph input, not a view of one), then attends
        each query causally over its sequence's cached prefix plus the new tokens. A backend
        with `compilable = True` does both inside one registered op that torch.compile keeps
        as one node; its `prepare` then only adds device tensors to `extra`. A backend with
        `fuses_rope = True` also takes `rope=(cos, sin, q_norm, k_norm, eps)` and q/k as
        projected, and applies model.llama.qk_norm_rope's per-head norm and rotation itself,
        before the KV write."""


_REGISTRY: dict[str, str] = {
    "reference": "functional_llm.kernels.reference:ReferenceBackend",
    "flash": "functional_llm.kernels.flash:FlashBackend",
    "triton": "functional_llm.kernels.triton_attn:TritonBackend",
}
# best first: what `attention_backend=None` picks on a GPU (the CPU always gets "reference").
# Triton first: on an H100 its paged decode reads the KV at ~98% of copy bandwidth (flash-attn
# 4's at ~50%), and the headline runs at least as fast with it (benchmarks/RESULTS.md).
_PREFERENCE = ("triton", "flash", "reference")


def available_backends() -> list[str]:
    """The registered backends usable here (their kernels import)."""
    return [name for name in sorted(_REGISTRY) if _usable(name) is not None]


def get_backend(name: str) -> AttentionBackend:
    if name not in _REGISTRY:
        raise InvalidConfig("attention_backend", name, f"known backends: {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as e:
        raise InvalidConfig("attention_backend", name, f"not usable here: {e}") from e


def _usable(name: str):
    """get_backend(name), or None where it is not registered or its kernels do not import."""
    try:
        return get_backend(name)
    except InvalidConfig:
        return None


def default_backend(device_type: str, dtype: torch.dtype) -> AttentionBackend:
    """The best backend that loads on this machine and serves this dtype."""
    if device_type == "cuda":
        for name in _PREFERENCE:
            if name == "flash" and dtype == torch.float32:
                continue  # flash-attn computes in fp16/bf16 only
            if (backend := _usable(name)) is not None:
                return backend
    return get_backend("reference")
