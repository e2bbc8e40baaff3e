"""The `triton` backend: paged attention kernels written in Triton.

Four kernels, all reading the pool [N, S, K, D] through the block tables:
* `_write_kv`: one program per new token copies its [K, D] keys and values to its slot.
* `_decode`: rows with query length 1. One program per (sequence, kv head, split) loads each
  K/V tile once for all G query heads of that kv head (a [G, D] query tile, padded to 16 rows
  for tl.dot). With split-KV each split covers a disjoint key range of its sequence and writes
  a normalised partial output plus its log-sum-exp; `_combine` merges the splits.
* `_prefill`: rows with query length > 1, causal. The tile's M rows are (query token, head)
  pairs of one kv head, so K/V are again loaded once per G heads. Keys come from the pool
  (cached prefix + the chunk just written), so prefix hits and chunked prefill need nothing
  special: query i of a chunk of q tokens sits at position seq_len - q + i.
Every sequence takes both attention kernels, and each kernel skips the rows that are not its
kind: which rows are decodes is known only on the device, and reading it back would be a host
sync. So `forward` never syncs and launches a fixed set of kernels: it can be captured in a
CUDA graph. Softmax is online, in fp32, in base 2 (the scale is folded with log2 e).
"""
from __future__ import annotations

import math

import attrs
import torch

from functional_llm.kernels.base import AttnBatch

try:
    import triton
    import triton.language as tl
    _jit = triton.jit
except ImportError as e:   # importing works; TritonBackend() raises (get_backend -> InvalidConfig)
    _MISSING = e
    triton, _jit = None, (lambda fn: fn)

    class tl:              # stand-in so the kernel signatures below parse; nothing runs them
        constexpr = None

MIN_SPLIT_KEYS = 256    # a split streams at least this many keys (else merging costs more)
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4     # decode programs wanted per SM before splitting stops


@_jit
def _attend_tile(q, m, l, acc, k_cache, v_cache, table, head_off, start, end, pos, qk_scale,
                 stride_n, stride_s, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                 MASK_END: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step over keys start .. start+BLOCK_N-1 (those < end if MASK_END;
    those <= pos of each row if CAUSAL). Needs at least one visible key per real row in the
    first tile a row sees (m stays finite), which the callers' loop bounds guarantee."""
    n = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    valid = n < end
    page = tl.load(table + n // PAGE, mask=valid, other=0).to(tl.int64)
    rows = page * stride_n + (n % PAGE) * stride_s + head_off                 # [BLOCK_N]
    k = tl.load(k_cache + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(v_cache + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale              # [M, BLOCK_N]
    if MASK_END:
        s = tl.where(valid[None, :], s, float("-inf"))
    if CAUSAL:
        s = tl.where(n[None, :] <= pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l, acc


@_jit
def _write_kv(k, v, k_cache, v_cache, slot_mapping, stride_kt, stride_kh, stride_vt, stride_vh,
              stride_n, stride_s, stride_h, K, PAGE: tl.constexpr, BLOCK_K: tl.constexpr,
              D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping + t)
    h = tl.arange(0, BLOCK_K)[:, None]
    d = tl.arange(0, D)[None, :]
    # a negative slot means "do not write". (tl.where, not `&`, joins a scalar condition to
    # a block: the interpreter mistypes block & scalar)
    mask = tl.where(slot >= 0, (h < K) & (d < D), False)
    dst = (slot // PAGE) * stride_n + (slot % PAGE) * stride_s + h * stride_h + d
    tl.store(k_cache + dst, tl.load(k + t * stride_kt + h * stride_kh + d, mask=mask), mask=mask)
    tl.store(v_cache + dst, tl.load(v + t * stride_vt + h * stride_vh + d, mask=mask), mask=mask)


@_jit
def _decode(q, k_cache, v_cache, out, part_out, part_lse, cu_q, seq_lens, block_tables,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_n, stride_s, stride_h, stride_bt,
            qk_scale, num_splits, H, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
            PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    b, kh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = tl.load(cu_q + b)
    is_decode = tl.load(cu_q + b + 1) - row == 1
    num_keys = tl.where(is_decode, tl.load(seq_lens + b), 0)   # 0: not mine, loop is empty
    # equal shares rounded up to whole tiles; trailing splits of a short sequence may be empty
    share = tl.cdiv(tl.cdiv(num_keys, num_splits), BLOCK_N) * BLOCK_N
    lo = split * share
    hi = tl.minimum(lo + share, num_keys)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kh * G + g
    q_tile = tl.load(q + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                     mask=(g < G)[:, None], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    table = block_tables + b * stride_bt
    for start in range(lo, hi, BLOCK_N):
        m, l, acc = _attend_tile(q_tile, m, l, acc, k_cache, v_cache, table, kh * stride_h, start,
                                 hi, g, qk_scale, stride_n, stride_s, PAGE, BLOCK_N, D,
                                 True, False, PREC)
    nonempty = l > 0
    safe_l = tl.where(nonempty, l, 1.0)
    res = acc / safe_l[:, None]                          # an empty split contributes zeros
    if SPLIT:
        at = (b * H + heads) * num_splits + split
        tl.store(part_out + at[:, None] * D + d[None, :], res, mask=(g < G)[:, None])
        tl.store(part_lse + at, tl.where(nonempty, m + tl.log2(safe_l), float("-inf")), mask=g < G)
    else:
        tl.store(out + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 res.to(out.dtype.element_ty), mask=tl.where(is_decode, (g < G)[:, None], False))


@_jit
def _combine(out, part_out, part_lse, cu_q, stride_ot, stride_oh, num_splits, H,
             BLOCK_SPLITS: tl.constexpr, D: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    row = tl.load(cu_q + b)
    is_decode = tl.load(cu_q + b + 1) - row == 1
    s = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, D)
    at = (b * H + h) * num_splits + s
    lse = tl.load(part_lse + at, mask=s < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))    # all -inf: not a decode row
    parts = tl.load(part_out + at[:, None] * D + d[None, :], mask=(s < num_splits)[:, None], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(w[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out + row * stride_ot + h * stride_oh + d, res.to(out.dtype.element_ty),
             mask=tl.where(is_decode, d < D, False))


@_jit
def _prefill(q, k_cache, v_cache, out, cu_q, seq_lens, block_tables, stride_qt, stride_qh,
             stride_ot, stride_oh, stride_n, stride_s, stride_h, stride_bt, qk_scale,
             G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
             D: tl.constexpr, PAGE: tl.constexpr, PREC: tl.constexpr):
    # BLOCK_Q = BLOCK_M // G query tokens per tile; rows past BLOCK_Q * G are padding
    tile, b, kh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q + b)
    q_len = tl.load(cu_q + b + 1) - q_start
    seq_len = tl.load(seq_lens + b)
    mine = tl.where(q_len > 1, q_len, 0)                   # decode rows belong to _decode
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    i = tile * BLOCK_Q + r // G                            # query index within the chunk
    heads = kh * G + r % G
    real = (r < BLOCK_Q * G) & (i < mine)
    pos = seq_len - q_len + i                              # absolute position of each row
    q_tile = tl.load(q + (q_start + i)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                     mask=real[:, None], other=0.0)
    first = tile * BLOCK_Q
    last = tl.minimum(first + BLOCK_Q, mine) - 1
    hi = tl.where(first < mine, seq_len - q_len + last + 1, 0)          # keys the tile sees
    # keys below the first row's position are visible to every row: no masks there
    mid = tl.minimum((seq_len - q_len + first + 1) // BLOCK_N * BLOCK_N, hi)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    table = block_tables + b * stride_bt
    for start in range(0, mid, BLOCK_N):
        m, l, acc = _attend_tile(q_tile, m, l, acc, k_cache, v_cache, table, kh * stride_h, start,
                                 hi, pos, qk_scale, stride_n, stride_s, PAGE, BLOCK_N, D,
                                 False, False, PREC)
    for start in range(mid, hi, BLOCK_N):
        m, l, acc = _attend_tile(q_tile, m, l, acc, k_cache, v_cache, table, kh * stride_h, start,
                                 hi, pos, qk_scale, stride_n, stride_s, PAGE, BLOCK_N, D,
                                 True, True, PREC)
    res = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out + (q_start + i)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             res.to(out.dtype.element_ty), mask=real[:, None])


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per sequence for decode: enough (sequence, kv head, split) programs to keep every
    SM busy (PROGRAMS_PER_SM each), but no split shorter than MIN_SPLIT_KEYS keys of the
    longest sequence, and at most MAX_SPLITS. Large batches get 1 (no combine kernel)."""
    wanted = -(-num_sms * PROGRAMS_PER_SM // (num_seqs * num_kv_heads))
    useful = -(-max_seq_len // MIN_SPLIT_KEYS)
    return max(1, min(wanted, useful, MAX_SPLITS))


@attrs.frozen(slots=True)
class _Plan:
    has_prefill: bool   # some row has query length > 1 (max_q > 1): launch _prefill
    num_seqs: int
    max_seq_len: int


class TritonBackend:
    """Tile sizes and num_splits may be overridden (tests, tuning); None picks the defaults."""

    name = "triton"
    capturable = True   # forward: no host sync, launch shapes fixed by host ints of the batch

    def __init__(self, num_splits: int | None = None, decode_block_n: int | None = None,
                 prefill_block_m: int | None = None, prefill_block_n: int | None = None,
                 decode_warps: int = 4, decode_stages: int = 3):
        if triton is None:
            raise ImportError(f"the triton package is not installed ({_MISSING})")
        self.num_splits, self.decode_block_n = num_splits, decode_block_n
        self.prefill_block_m, self.prefill_block_n = prefill_block_m, prefill_block_n
        self.decode_warps, self.decode_stages = decode_warps, decode_stages
        self.num_sms = 8      # the interpreter's stand-in; a GPU reports its own
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            self.num_sms = props.multi_processor_count

    def prepare(self, batch: AttnBatch) -> AttnBatch:
        """Host ints only (no device reads, so it may run inside a graph capture)."""
        return attrs.evolve(batch, extra=_Plan(batch.max_q > 1, batch.seq_lens.shape[0],
                                                batch.max_seq_len))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttnBatch,
                scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, K, D], k_cache/v_cache [N, S, K, D] -> out [T, H, D].
        Writes k/v into the caches at batch.slot_mapping, then attends causally."""
        write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        return self.attend(q, k_cache, v_cache, batch, scale)

    def attend(self, q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
        """Attention only (the caches already hold this step's K/V): out [T, H, D]."""
        plan: _Plan = batch.extra
        T, H, D = q.shape
        N, S, K, _ = k_cache.shape
        G = H // K
        assert H == K * G and 1 <= G <= 16, (H, K)
        assert D >= 16 and D & (D - 1) == 0, f"head_dim {D} must be a power of two >= 16"
        assert S & (S - 1) == 0, f"block size {S} must be a power of two"
        assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
        q = q if q.stride(2) == 1 else q.contiguous()
        out = q.new_empty(T, H, D)
        B = plan.num_seqs
        # fp32 inputs: exact fp32 products (the GPU default is TF32); 16-bit: the default
        prec = "ieee" if q.dtype == torch.float32 else None
        qk_scale = scale * math.log2(math.e)
        common = (batch.cu_q, batch.seq_lens, batch.block_tables, q.stride(0), q.stride(1),
                  out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
                  k_cache.stride(2), batch.block_tables.stride(0), qk_scale)
        wide = q.element_size() <= 2      # 16-bit inputs: twice the keys per tile
        splits = self.num_splits or choose_num_splits(B, K, plan.max_seq_len, self.num_sms)
        block_n = self.decode_block_n or min(128, (8192 if wide else 4096) // D)
        assert block_n >= 16, "tl.dot needs tiles of 16 or more"
        if splits == 1:
            part_out = part_lse = out     # unused
        else:
            part_out = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
            part_lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
        _decode[(B, K, splits)](q, k_cache, v_cache, out, part_out, part_lse, *common, splits, H,
                                G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, PAGE=S,
                                BLOCK_N=block_n, SPLIT=splits > 1, PREC=prec,
                                num_warps=self.decode_warps, num_stages=self.decode_stages)
        if splits > 1:
            _combine[(B, H)](out, part_out, part_lse, batch.cu_q, out.stride(0), out.stride(1),
                             splits, H, BLOCK_SPLITS=triton.next_power_of_2(splits), D=D,
                             num_warps=4)
        if plan.has_prefill:
            block_m = self.prefill_block_m or (128 if wide and G >= 4 else 64)
            block_n = self.prefill_block_n or (64 if wide else 32)
            assert block_m >= 16 and block_n >= 16, "tl.dot needs tiles of 16 or more"
            tiles = -(-batch.max_q // (block_m // G))
            _prefill[(tiles, B, K)](q, k_cache, v_cache, out, *common, G=G, BLOCK_M=block_m,
                                    BLOCK_Q=block_m // G, BLOCK_N=block_n, D=D, PAGE=S, PREC=prec,
                                    num_warps=8 if block_m >= 128 else 4, num_stages=2)
        return out


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k/v [T, K, D] into k_cache/v_cache [N, S, K, D] at slot_mapping [T] (flat slots;
    negative = skip). Mutates the caches only."""
    T, K, D = k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    _write_kv[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                    v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), K,
                    PAGE=k_cache.shape[1], BLOCK_K=triton.next_power_of_2(K), D=D, num_warps=4)
