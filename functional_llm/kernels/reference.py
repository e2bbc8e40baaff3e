"""Pure-torch attention over the paged KV pool: runs anywhere and is the oracle in tests.

`prepare` builds, once per step, padded query rows, causal masks and block tables per group of
sequences; `forward` then does, per layer, one scatter (the new K/V) plus, per group, one K/V
gather and one batched attention. Sequences are split into two groups: decodes (query length
1) and the rest (prefill chunks), so a long prefill does not pad every decode to its length.
Shape letters: b sequences of a group, Q padded query length, P padded key length,
M block-table columns, G query heads per kv head (H = K * G).
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from functional_llm.kernels.base import AttnBatch, cache_views, quantize


@attrs.frozen(slots=True)
class _Group:
    q_rows: torch.Tensor     # [b, Q] int64: row of each query in the step's q (0 where padded)
    tables: torch.Tensor     # [b, M] int64: the group's block tables
    key_pos: torch.Tensor    # [P] int64: 0..P-1
    key_valid: torch.Tensor  # [b, P] bool: key index < seq_len
    mask: torch.Tensor       # [b, 1, Q, P] bool: query may attend to key (causal and valid)
    out_index: torch.Tensor  # [R] int64: flat positions in [b*Q] holding real queries
    out_rows: torch.Tensor   # [R] int64: their rows in the step's output


def _group(batch: AttnBatch, seqs: list[int], q_lens: list[int], seq_lens: list[int]) -> _Group:
    dev = batch.cu_q.device
    idx = torch.tensor(seqs, dtype=torch.int64, device=dev)
    ql = torch.tensor([q_lens[b] for b in seqs], dtype=torch.int64, device=dev)      # [b]
    sl = torch.tensor([seq_lens[b] for b in seqs], dtype=torch.int64, device=dev)    # [b]
    ar_q = torch.arange(max(q_lens[b] for b in seqs), device=dev)                   # [Q]
    ar_k = torch.arange(max(seq_lens[b] for b in seqs), device=dev)                 # [P]

    q_valid = ar_q[None, :] < ql[:, None]                                      # [b, Q]
    q_rows = torch.where(q_valid, batch.cu_q.long()[idx][:, None] + ar_q[None, :], 0)
    key_valid = ar_k[None, :] < sl[:, None]                                    # [b, P]
    # query i of a chunk sits at absolute position seq_len - q_len + i and sees keys 0..pos.
    # Padded query rows see every valid key, so no softmax row is empty (their output is
    # dropped).
    pos = (sl - ql)[:, None] + ar_q[None, :]                                   # [b, Q]
    causal = ar_k[None, None, :] <= pos[:, :, None]                            # [b, Q, P]
    mask = (causal | ~q_valid[:, :, None]) & key_valid[:, None, :]
    out_index = q_valid.flatten().nonzero().squeeze(1)
    return _Group(q_rows=q_rows, tables=batch.block_tables.long()[idx], key_pos=ar_k, key_valid=key_valid,
                  mask=mask[:, None], out_index=out_index, out_rows=q_rows.flatten()[out_index])


class ReferenceBackend:
    name = "reference"
    fp8_kv = True      # reads and writes the fp8 pool (kernels/base.py)

    def prepare(self, batch: AttnBatch) -> AttnBatch:
        """Host side, once per step: returns `batch` with `extra` holding its groups (a tuple
        of _Group: gather indices and masks). Reads cu_q and seq_lens back to the host (a sync
        if they live on a GPU)."""
        cu_q, seq_lens = batch.cu_q.tolist(), batch.seq_lens.tolist()
        q_lens = [cu_q[b + 1] - cu_q[b] for b in range(len(seq_lens))]
        decode = [b for b, n in enumerate(q_lens) if n == 1]
        chunks = [b for b, n in enumerate(q_lens) if n > 1]
        groups = tuple(_group(batch, part, q_lens, seq_lens) for part in (decode, chunks) if part)
        return attrs.evolve(batch, extra=groups)

    @staticmethod
    def check(block_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Serves any block size and head shape."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                layer: int, batch: AttnBatch, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, K, D], kv [L, 2, N, S, K, D] (or the fp8 pool) -> out [T, H, D].
        Writes k/v into kv[layer] at batch.slot_mapping (quantized, with an fp8 pool), then
        attends causally over the stored (dequantized) keys and values."""
        (T, H, D), K = q.shape, k.shape[1]
        G = H // K
        (k_cache, k_scales), (v_cache, v_scales) = (cache_views(kv, layer, i, K, D) for i in (0, 1))
        S = k_cache.shape[1]
        at = (batch.slot_mapping // S, batch.slot_mapping % S)
        for cache, scales, x in ((k_cache, k_scales, k), (v_cache, v_scales, v)):
            if scales is None:
                cache[at] = x
            else:
                cache[at], scales[at] = quantize(x)

        out = q.new_empty(T, H, D)
        for group in batch.extra:
            (b, Q), P = group.q_rows.shape, group.key_valid.shape[1]
            slots = _key_slots(group, S).view(-1)                                  # [b*P]
            at = (slots // S, slots % S)
            keys, vals = (_read(c, sc, at, q.dtype).view(b, P, K, D).transpose(1, 2)  # [b,K,P,D]
                          for c, sc in ((k_cache, k_scales), (v_cache, v_scales)))
            # GQA without copying K/V: query head h = kv_head * G + g (HF's repeat_kv order),
            # so the G heads of one kv head are stacked along the query axis
            queries = q[group.q_rows].view(b, Q, K, G, D).permute(0, 2, 3, 1, 4)
            queries = queries.reshape(b, K, G * Q, D)                              # [b,K,GQ,D]
            mask = group.mask.expand(b, G, Q, P).reshape(b, 1, G * Q, P)
            att = F.scaled_dot_product_attention(queries, keys, vals, attn_mask=mask,
                                                 scale=scale)                      # [b,K,GQ,D]
            att = att.view(b, K, G, Q, D).permute(0, 3, 1, 2, 4).reshape(b * Q, H, D)
            out.index_copy_(0, group.out_rows, att[group.out_index])
        return out


def _read(cache: torch.Tensor, scales, at: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The stored rows at (blocks, offsets), dequantized when the pool is fp8."""
    rows = cache[at]
    return rows if scales is None else (rows.float() * scales[at][..., None]).to(dtype)


def _key_slots(group: _Group, block_size: int) -> torch.Tensor:
    """Flat pool slot of every key of the group, [b, P]. Built per layer because the block
    size is known only from the pool's shape; integer work on [b, P] is cheap next to the
    K/V gather it indexes. Padded keys point at the sequence's own token 0: always written
    and finite, so the masked-out product 0 * value stays 0 (an unwritten slot may be NaN)."""
    b, P = group.key_valid.shape
    columns = (group.key_pos // block_size).expand(b, P)
    slots = group.tables.gather(1, columns) * block_size + group.key_pos % block_size
    return torch.where(group.key_valid, slots, slots[:, :1])
