"""The `flash` backend: the flash-attn package over the paged pool, when it is importable.

Two generations of its API are served:
* flash-attn 4 (`flash_attn.cute.flash_attn_varlen_func`, Hopper/Blackwell): paged through
  `page_table` + `seqused_k`. Its fast paged path wants 128-token pages and reads whole pages,
  rows past a sequence's end included, which is why the pool is allocated zeroed.
* flash-attn 2.x (`flash_attn.flash_attn_varlen_func` with `block_table`): needs the keys'
  prefix sums instead of per-sequence lengths.
Both apply the causal mask bottom-right aligned: query row i of a sequence with q new tokens
and L keys sees keys 0 .. L - q + i, which is exactly "cached prefix + new tokens up to me".
"""
from __future__ import annotations

import attrs
import torch

from functional_llm.errors import InvalidConfig
from functional_llm.kernels.base import AttnBatch


def _load():
    """(generation, function) of the installed flash-attn, or raise ImportError."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
        return 4, flash_attn_varlen_func
    except ImportError:
        from flash_attn import flash_attn_varlen_func
        return 2, flash_attn_varlen_func


class FlashBackend:
    name = "flash"

    def __init__(self):
        self.generation, self._fn = _load()
        # capturable: flash-attn 4's forward reads only AttnBatch tensors (no host sync, fixed
        # launch shapes); 2.x needs cu_seqlens_k built in prepare
        self.capturable = self.generation == 4
        # default block sizes (any pool): 4's fast paged path reads whole 128-token pages; 2's
        # paged path needs multiples of 256 (check)
        self.block_sizes = (128, 128) if self.generation == 4 else (256, 256)

    def prepare(self, batch: AttnBatch) -> AttnBatch:
        if self.generation == 4:
            return batch
        cu_k = torch.zeros(len(batch.seq_lens) + 1, dtype=torch.int32, device=batch.seq_lens.device)
        torch.cumsum(batch.seq_lens, 0, out=cu_k[1:])
        return attrs.evolve(batch, extra=cu_k)

    def check(self, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        if self.generation == 2 and block_size % 256:
            raise InvalidConfig("block_size", block_size, "flash-attn 2's paged path needs a multiple of 256")
        if head_dim % 8 or head_dim > 256:
            raise InvalidConfig("head_dim", head_dim, "flash-attn needs a multiple of 8, <= 256")

    def forward(self, q, k, v, kv, layer: int, batch: AttnBatch, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv[layer, 0], kv[layer, 1]
        K, D = k.shape[1], k.shape[2]
        k_cache.view(-1, K, D).index_copy_(0, batch.slot_mapping, k)
        v_cache.view(-1, K, D).index_copy_(0, batch.slot_mapping, v)
        if self.generation == 4:
            out = self._fn(q, k_cache, v_cache, cu_seqlens_q=batch.cu_q, max_seqlen_q=batch.max_q,
                           seqused_k=batch.seq_lens, page_table=batch.block_tables,
                           softmax_scale=scale, causal=True)
        else:
            out = self._fn(q, k_cache, v_cache, batch.cu_q, batch.extra, batch.max_q, batch.max_seq_len,
                           softmax_scale=scale, causal=True, block_table=batch.block_tables)
        return out[0] if isinstance(out, tuple) else out
