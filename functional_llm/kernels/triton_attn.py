"""The `triton` backend: paged attention kernels written in Triton.

Kernels, all reading the pool [N, S, K, D] through the block tables:
* `_rope_write_kv`: one program per (new token, kv head) norms and rotates that kv head's G
  query heads and its key (Qwen3's per-head norm; RoPE) and writes its key and value row to
  the token's slot.
With an fp8 pool (kernels/base.py) the writes quantize each (token, kv head) row with its own
scale, and the attention kernels load the e4m3 values and multiply the scales into the
products (a key's scale into its column of scores, a value's into its column of weights):
nothing dequantizes the pool into a copy.
* `_decode`: rows with query length 1. One program per (sequence, kv head, split), started
  longest sequence first (prepare's order: the short ones then fill the last wave), loads each
  K/V tile once for all G query heads of that kv head (a [G, D] query tile, padded to 16 rows
  for tl.dot). With split-KV each split covers a disjoint key range of its sequence and writes
  a normalised partial output plus its log-sum-exp; `_combine` merges the splits.
* `_prefill`: rows with query length > 1, causal. The tile's M rows are (query token, head)
  pairs of one kv head, so K/V are again loaded once per G heads. Keys come from the pool
  (cached prefix + the chunk just written), so prefix hits and chunked prefill need nothing
  special: query i of a chunk of q tokens sits at position seq_len - q + i.
Every sequence takes both attention kernels, and each kernel skips the rows that are not its
kind: which rows are decodes is known only on the device, and reading it back would be a host
sync. So `forward` never syncs and its launch shapes follow from the tensor shapes alone
(T tokens, B rows): it can be captured in a CUDA graph for a padded bucket. Softmax is online,
in fp32, in base 2 (the scale is folded with log2 e).
`forward` is one registered operator, functional_llm::triton_attention (KV write + attention),
which takes the whole pool and mutates it: torch.compile keeps it one node of the compiled step
and, the pool being a graph input, writes it in place (a view would be copied back).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import attrs
import torch

from functional_llm.kernels.base import AttnBatch, cache_views

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
def _attend_tile(q, m, l, acc, k_cache, v_cache, k_scale, v_scale, table, kh, start, end, pos,
                 qk_scale, stride_n, stride_s, stride_h, scale_n, PAGE: tl.constexpr,
                 BLOCK_N: tl.constexpr, D: tl.constexpr, MASK_END: tl.constexpr,
                 CAUSAL: tl.constexpr, PREC: tl.constexpr, FP8: tl.constexpr):
    """One online-softmax step over keys start .. start+BLOCK_N-1 (those < end if MASK_END;
    those <= pos of each row if CAUSAL). Needs at least one visible key per real row in the
    first tile a row sees (m stays finite), which the callers' loop bounds guarantee. An fp8
    pool with bf16 queries takes its products in fp16 (|q| < 65504): e4m3 widens to fp16 in
    one instruction, to bf16 in several, and that made the fp8 decode 1.5x slower than bf16's.
    The fp8 pool keeps each page's V [K, D, S] and scales [K, S] (kernels/base.py): the product
    with the weights runs along the keys, and with the keys contiguous its V tile loads in
    16-byte pieces and feeds tl.dot without a byte gather; it loads whole pages unmasked, as
    masks varying along the keys would split those loads into bytes. Keys past `end` weigh 0
    (their scores -inf, their scales 0); their values need no mask, as the fp8 pool holds
    finite bytes only (zeroed at start, NaN written as 0): a masked V tile took a layout
    round trip through shared memory, 1.6x the instructions of an unmasked one."""
    if FP8 and q.dtype == tl.bfloat16:
        q = q.to(tl.float16)
    n, d = start + tl.arange(0, BLOCK_N), tl.arange(0, D)
    valid = n < end
    if PAGE % BLOCK_N == 0:   # the tile lies in one page: one scalar lookup, addresses from it
        page, o = tl.load(table + start // PAGE).to(tl.int64), start % PAGE + tl.arange(0, BLOCK_N)
    else:
        page, o = tl.load(table + n // PAGE, mask=valid, other=0).to(tl.int64), n % PAGE
    rows = page * stride_n + o * stride_s + kh * stride_h                    # [BLOCK_N]
    k = tl.load(k_cache + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    if FP8:   # whole pages unmasked (keys past the end weigh 0, above); the hints: runs of PAGE
        # keys, contiguous and PAGE-aligned, within one page
        at = tl.max_contiguous(tl.multiple_of(page * scale_n + kh * PAGE + o, PAGE), PAGE)
        v_at = (page * stride_n + kh * D * PAGE + o)[:, None] + d[None, :] * PAGE
        v = tl.load(v_cache + tl.max_contiguous(tl.multiple_of(v_at, [PAGE, 1]), [PAGE, 1]))
    else:
        v = tl.load(v_cache + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * qk_scale  # [M, BLOCK_N]
    if FP8:
        s = s * (tl.load(k_scale + at, mask=valid, other=0.0) if MASK_END else tl.load(k_scale + at))[None, :]
    if MASK_END:
        s = tl.where(valid[None, :], s, float("-inf"))
    if CAUSAL:
        s = tl.where(n[None, :] <= pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    if FP8:
        p = p * (tl.load(v_scale + at, mask=valid, other=0.0) if MASK_END else tl.load(v_scale + at))[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC)
    return m_new, l, acc


@_jit
def _store_kv(cache, scales, slot, h, d, x, stride_n, stride_s, stride_h, stride_d, scale_n,
              K, PAGE: tl.constexpr, FP8: tl.constexpr):
    """Rows x [R, D] of heads h [R] into the cache at `slot` (negative: not written); with FP8
    each row quantized as kernels.base.quantize does, its float32 scale stored in the page's
    [K, S] scales."""
    # tl.where, not `&`, joins a scalar condition to a block: the interpreter mistypes it
    rmask = tl.where(slot >= 0, h < K, False)
    dst = (slot // PAGE) * stride_n + (slot % PAGE) * stride_s + h[:, None] * stride_h + d[None, :] * stride_d
    if FP8:
        x = x.to(tl.float32)
        sc = tl.maximum(tl.max(tl.abs(x), 1), 1.1754943508222875e-38) / 448.0
        tl.store(scales + (slot // PAGE) * scale_n + h * PAGE + slot % PAGE, sc, mask=rmask)
        x = x / sc[:, None]
        x = tl.where(x == x, x, 0.0)   # NaN -> 0: the pool holds finite values only (_attend_tile)
    tl.store(cache + dst, x.to(cache.dtype.element_ty), mask=rmask[:, None])


@_jit
def _norm_rope(x, xp, w, d, partner, c, s, eps, NORM: tl.constexpr, ROPE: tl.constexpr, D: tl.constexpr):
    """Rows x [R, D] (and xp, the same rows at the partner columns) -> per-row RMSNorm with
    weight w (if NORM; rounded to the input dtype before the weight, as model.llama.rms_norm),
    then (if ROPE) rotated: x * cos + rotate_half(x) * sin, the sign folded into s. fp32 out."""
    dtype = x.dtype
    x, xp = x.to(tl.float32), xp.to(tl.float32)
    if NORM:
        r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        x = (x * r).to(dtype).to(tl.float32) * tl.load(w + d).to(tl.float32)[None, :]
        xp = (xp * r).to(dtype).to(tl.float32) * tl.load(w + partner).to(tl.float32)[None, :]
    if ROPE:
        x = x * c[None, :] + xp * s[None, :]
    return x


@_jit
def _rope_write_kv(q, k, v, q_out, k_cache, v_cache, k_scale, v_scale, slot_mapping, cos, sin,
                   q_norm, k_norm, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                   stride_vh, stride_n, stride_s, stride_h, cache_vs, cache_vh, cache_vd, scale_n, H, K, eps,
                   G: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr, BLOCK_G: tl.constexpr,
                   D: tl.constexpr, PAGE: tl.constexpr, FP8: tl.constexpr):
    """Token t, kv head kh: q/k per-head norm (Qwen3) and rope, kh's G query heads into q_out
    [T, H, D], its k and v into the pool at slot_mapping[t] (negative: not written). One kernel
    for what was three. Without NORM and ROPE: the plain KV write (q copied)."""
    t, kh, g, d = tl.program_id(0), tl.program_id(1), tl.arange(0, BLOCK_G), tl.arange(0, D)
    h = (kh * G + g)[:, None]
    partner = tl.where(d < D // 2, d + D // 2, d - D // 2)
    c = tl.load(cos + t * D + d).to(tl.float32)
    s = tl.load(sin + t * D + d).to(tl.float32) * tl.where(d < D // 2, -1.0, 1.0)
    rows = q + t * stride_qt + h * stride_qh
    qm = (g < G)[:, None] & (d[None, :] < D)
    x = _norm_rope(tl.load(rows + d[None, :], mask=qm, other=0.0),
                   tl.load(rows + partner[None, :], mask=qm, other=0.0), q_norm, d, partner,
                   c, s, eps, NORM, ROPE, D)
    tl.store(q_out + (t * H + h) * D + d[None, :], x.to(q_out.dtype.element_ty), mask=qm)
    slot = tl.load(slot_mapping + t)
    heads = kh + tl.arange(0, 1)
    km = tl.where(slot >= 0, d[None, :] < D, False)                   # [1, D]: kv head kh
    rows = k + t * stride_kt + heads[:, None] * stride_kh
    x = _norm_rope(tl.load(rows + d[None, :], mask=km, other=0.0),
                   tl.load(rows + partner[None, :], mask=km, other=0.0), k_norm, d, partner,
                   c, s, eps, NORM, ROPE, D)
    # k rounded to the model dtype first, as the unfused path stores (or quantizes) it
    _store_kv(k_cache, k_scale, slot, heads, d, x.to(q_out.dtype.element_ty), stride_n,
              stride_s, stride_h, 1, scale_n, K, PAGE, FP8)
    x = tl.load(v + t * stride_vt + heads[:, None] * stride_vh + d[None, :], mask=km, other=0.0)
    _store_kv(v_cache, v_scale, slot, heads, d, x, stride_n,  # V at its own strides (fp8: [K, D, S] a page)
              cache_vs, cache_vh, cache_vd, scale_n, K, PAGE, FP8)


@_jit
def _decode(q, k_cache, v_cache, out, part_out, part_lse, cu_q, seq_lens, block_tables, order,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_n, stride_s, stride_h, stride_bt,
            qk_scale, k_scale, v_scale, scale_n, num_splits, H, G: tl.constexpr,
            BLOCK_G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
            SPLIT: tl.constexpr, PREC: tl.constexpr, FP8: tl.constexpr, ORDERED: tl.constexpr):
    # programs start in the order of their ids, kv heads and splits of one sequence together,
    # sequences longest first (`order`): the short ones fill in the tail
    kh, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = tl.load(order + b).to(tl.int32) if ORDERED else b
    row = tl.load(cu_q + b)
    is_decode = tl.load(cu_q + b + 1) - row == 1
    num_keys = tl.where(is_decode, tl.load(seq_lens + b), 0)   # 0: not mine, loop is empty
    # equal shares rounded up to whole tiles; trailing splits of a short sequence may be empty
    share = tl.cdiv(tl.cdiv(num_keys, num_splits), BLOCK_N) * BLOCK_N
    lo = split * share
    hi = tl.minimum(lo + share, num_keys)

    g, d = tl.arange(0, BLOCK_G), tl.arange(0, D)
    heads = kh * G + g
    # a padding row's cu_q is T, one past the last query row: read nothing there
    q_tile = tl.load(q + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                     mask=tl.where(is_decode, (g < G)[:, None], False), other=0.0)
    m, l = tl.full([BLOCK_G], float("-inf"), tl.float32), tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    table = block_tables + b * stride_bt
    # fp8: whole tiles unmasked (see _attend_tile), then the rest; bf16 is faster all masked
    full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N if FP8 else lo
    for start in range(lo, full, BLOCK_N):
        m, l, acc = _attend_tile(q_tile, m, l, acc, k_cache, v_cache, k_scale, v_scale, table, kh,
                                 start, hi, g, qk_scale, stride_n, stride_s, stride_h, scale_n,
                                 PAGE, BLOCK_N, D, False, False, PREC, FP8)
    for start in range(full, hi, BLOCK_N):
        m, l, acc = _attend_tile(q_tile, m, l, acc, k_cache, v_cache, k_scale, v_scale, table, kh,
                                 start, hi, g, qk_scale, stride_n, stride_s, stride_h, scale_n,
                                 PAGE, BLOCK_N, D, True, False, PREC, FP8)
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
    s, d = tl.arange(0, BLOCK_SPLITS), tl.arange(0, D)
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
def _prefill(q, k_cache, v_cache, out, cu_q, seq_lens, block_tables, num_seqs, stride_qt,
             stride_qh, stride_ot, stride_oh, stride_n, stride_s, stride_h, stride_bt, qk_scale,
             k_scale, v_scale, scale_n, G: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
             PREC: tl.constexpr, BLOCK_B: tl.constexpr, FP8: tl.constexpr):
    # BLOCK_Q = BLOCK_M // G query tokens per tile; rows past BLOCK_Q * G are padding.
    # Program (pid, kh) takes the pid-th query tile over all prefill rows in order: the grid
    # is a bound fixed by the step's shapes (T and B), not by its row lengths, so a padded
    # step replays from one CUDA graph whatever its rows; programs past the last tile idle.
    pid, kh = tl.program_id(0), tl.program_id(1)
    bs = tl.arange(0, BLOCK_B)
    lo = tl.load(cu_q + bs, mask=bs < num_seqs, other=0)
    hi_q = tl.load(cu_q + bs + 1, mask=bs < num_seqs, other=0)
    tiles = tl.where(hi_q - lo > 1, (hi_q - lo + BLOCK_Q - 1) // BLOCK_Q, 0)  # decodes: none
    ends = tl.cumsum(tiles, 0)
    b = tl.minimum(tl.sum((ends <= pid).to(tl.int32), 0), num_seqs - 1)
    tile = pid - tl.sum(tl.where(bs == b, ends - tiles, 0), 0)   # past the end: an empty tile
    q_start = tl.load(cu_q + b)
    q_len = tl.load(cu_q + b + 1) - q_start
    seq_len = tl.load(seq_lens + b)
    mine = tl.where(q_len > 1, q_len, 0)                   # decode rows belong to _decode
    r, d = tl.arange(0, BLOCK_M), tl.arange(0, D)
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

    m, l = tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    table = block_tables + b * stride_bt
    for start in range(0, mid, BLOCK_N):
        m, l, acc = _attend_tile(q_tile, m, l, acc, k_cache, v_cache, k_scale, v_scale, table, kh,
                                 start, hi, pos, qk_scale, stride_n, stride_s, stride_h, scale_n,
                                 PAGE, BLOCK_N, D, False, False, PREC, FP8)
    for start in range(mid, hi, BLOCK_N):
        m, l, acc = _attend_tile(q_tile, m, l, acc, k_cache, v_cache, k_scale, v_scale, table, kh,
                                 start, hi, pos, qk_scale, stride_n, stride_s, stride_h, scale_n,
                                 PAGE, BLOCK_N, D, True, True, PREC, FP8)
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
class Tiles:
    """Launch configuration; 0 = the default for the shapes at hand (tests and tuning override)."""

    num_splits: int = 0
    decode_block_n: int = 0
    prefill_block_m: int = 0
    prefill_block_n: int = 0
    decode_warps: int = 4
    decode_stages: int = 3
    fp_fusion: int = 1      # 0: no a*b+c contracted to one FMA (kernels whose masks differ agree)
    decode_regs: int = 0    # registers a decode thread may use (0: 128 with an fp8 pool, else no cap)


class TritonBackend:
    """Tiles' fields may be given (tests, tuning); absent or None picks the default."""

    name = "triton"
    capturable = True   # no host sync; launch shapes fixed by the step's tensor shapes
    compilable = True   # forward is one registered op: torch.compile sees a single node
    fuses_rope = True   # forward takes q/k before their norm and rope (its `rope` argument)
    fp8_kv = True       # reads and writes the fp8 pool (kernels/base.py)
    # default block sizes (bf16/fp32 pool, fp8 pool): an fp8 decode tile of 128 keys is then one
    # page (one table lookup, addresses from one base; kernels/base.py, RESULTS.md)
    block_sizes = (16, 128)

    def __init__(self, **tiles: int | None):
        if triton is None:
            raise ImportError(f"the triton package is not installed ({_MISSING})")
        self.tiles = Tiles(**{name: n for name, n in tiles.items() if n is not None})
        self._tile_args = list(attrs.astuple(self.tiles))   # plain ints, for the op

    @staticmethod
    def check(block_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """The InvalidConfig a model or block size the kernels cannot serve would otherwise
        meet as an assertion on the first step."""
        from functional_llm.errors import InvalidConfig
        if block_size & (block_size - 1):
            raise InvalidConfig("block_size", block_size, "the triton backend needs a power of two")
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise InvalidConfig("head_dim", head_dim, "the triton backend needs a power of two "
                                ">= 16 (attention_backend='reference' serves any)")
        if num_heads % num_kv_heads or num_heads // num_kv_heads > 16:
            raise InvalidConfig("num_attention_heads", num_heads, f"the triton backend needs "
                                f"1-16 query heads per kv head ({num_kv_heads} kv heads)")

    def invariant(self) -> "TritonBackend":
        """The batch-invariant configuration (LLM(batch_invariant=True)): no split-KV, and
        decode and prefill rows in tiles of one shape (16 query rows, 64 keys, 4 warps), and no
        FMA contraction (which the compiler applies where no mask sits between a product and a
        sum, so masked and unmasked tiles would round apart), so a row's online softmax takes
        the same steps with the same instructions whether it decodes, sits at any offset of a
        prefill chunk, or shares its tile with any rows."""
        return TritonBackend(num_splits=1, decode_block_n=64, prefill_block_m=16, prefill_block_n=64,
                             fp_fusion=0)

    def prepare(self, batch: AttnBatch) -> AttnBatch:
        """extra: the sequences longest first (a device argsort, once per step), the order in
        which decode programs start."""
        return attrs.evolve(batch, extra=torch.argsort(batch.seq_lens, descending=True, stable=True))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                layer: int, batch: AttnBatch, scale: float, rope: tuple | None = None) -> torch.Tensor:
        """q [T, H, D], k/v [T, K, D], kv [L, 2, N, S, K, D] -> out [T, H, D]. Writes k/v into
        kv[layer] at batch.slot_mapping (negative = skip), then attends causally. rope: (cos,
        sin [T, D], q_norm, k_norm [D] or None, eps) for q/k not yet normed and rotated: one
        kernel norms and rotates both and writes the KV (fuses_rope)."""
        return torch.ops.functional_llm.triton_attention(
            q, k, v, kv, layer, batch.slot_mapping, batch.cu_q, batch.seq_lens,
            batch.block_tables, batch.max_seq_len, scale, self._tile_args, batch.extra, *(rope or ()))


@torch.library.custom_op("functional_llm::triton_attention", mutates_args=("kv",))
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                  layer: int, slot_mapping: torch.Tensor, cu_q: torch.Tensor,
                  seq_lens: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int,
                  scale: float, tiles: list[int], order: Optional[torch.Tensor] = None,
                  cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                  q_norm: Optional[torch.Tensor] = None, k_norm: Optional[torch.Tensor] = None,
                  eps: float = 0.0) -> torch.Tensor:
    """The KV write (with q/k norm and rope first, when cos is given) and attention of one
    layer as one operator: torch.compile keeps it a single node and writes kv in place (the
    pool is the one mutated input)."""
    (k_cache, k_scale), (v_cache, v_scale) = (cache_views(kv, layer, i, *k.shape[1:]) for i in (0, 1))
    scales = (k_scale, v_scale)
    q = rope_write_kv(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, q_norm, k_norm, eps, scales)
    return attend(q, k_cache, v_cache, cu_q, seq_lens, block_tables, max_seq_len, scale,
                  Tiles(*tiles), scales, order)


@_attention_op.register_fake
def _(q, k, v, kv, layer, slot_mapping, cu_q, seq_lens, block_tables, max_seq_len, scale, tiles,
      order=None, cos=None, sin=None, q_norm=None, k_norm=None, eps=0.0):
    return q.new_empty(q.shape)


def _scale_args(scales: tuple, cache: torch.Tensor) -> tuple:
    """(k_scale, v_scale, their block stride) for the kernels, and whether the pool is fp8;
    without scales the cache stands in for the unused pointers. The kernels take the fp8 pool's
    layout within a page as kernels.base.cache_views lays it out (scales [K, S])."""
    k_scale, v_scale = scales
    if k_scale is None:
        return (cache, cache, 0), False
    assert k_scale.stride() == v_scale.stride() and k_scale.stride()[1:] == (1, cache.shape[1])
    return (k_scale, v_scale, k_scale.stride(0)), True


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """The device's SM count (8 stands in for it under the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_q: torch.Tensor,
           seq_lens: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int, scale: float,
           tiles: Tiles = Tiles(), scales: tuple = (None, None),
           order: torch.Tensor | None = None) -> torch.Tensor:
    """Attention only (the caches already hold this step's K/V): q [T, H, D] -> out [T, H, D].
    Launch shapes depend on T, B and max_seq_len only: rows of query length 1 take _decode,
    longer ones _prefill, and rows of length 0 (padding) neither. scales: the fp8 pool's
    (k_scale, v_scale) [N, S, K] (kernels.base.cache_views), the caches then e4m3. order [B]
    int64: the rows in the order their decode programs should start (prepare's; None: as
    they come)."""
    T, H, D = q.shape
    N, S, K, _ = k_cache.shape
    B, G = seq_lens.shape[0], H // K
    assert H == K * G and 1 <= G <= 16, (H, K)
    assert D >= 16 and D & (D - 1) == 0, f"head_dim {D} must be a power of two >= 16"
    assert S & (S - 1) == 0, f"block size {S} must be a power of two"
    q = q if q.stride(2) == 1 else q.contiguous()
    out = q.new_empty(T, H, D)
    # fp32 inputs: exact fp32 products (the GPU default is TF32); 16-bit: the default
    prec, qk_scale = ("ieee" if q.dtype == torch.float32 else None), scale * math.log2(math.e)
    scale_args, fp8 = _scale_args(scales, k_cache)     # an fp8 pool's V is [K, D, S] in a page:
    assert k_cache.stride(3) == 1 and v_cache.stride()[1:] == ((1, S * D, S) if fp8 else k_cache.stride()[1:])
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0),
               k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), qk_scale, *scale_args)
    wide = q.element_size() <= 2      # 16-bit inputs: twice the keys per tile
    splits = tiles.num_splits or choose_num_splits(B, K, max_seq_len, _num_sms(q.device))
    block_n = tiles.decode_block_n or min(128, ((16384 if fp8 else 8192) if wide else 4096) // D)
    assert block_n >= 16, "tl.dot needs tiles of 16 or more"
    # the splits' partials (unused with one split)
    part_out, part_lse = (torch.empty(B, H, splits, *d, dtype=torch.float32, device=q.device)
                          for d in ((D,), ())) if splits > 1 else (out, out)
    common = dict(G=G, D=D, PAGE=S, PREC=prec, FP8=fp8, enable_fp_fusion=bool(tiles.fp_fusion))
    # fp8: capped registers let 4 programs share an SM (benchmarks/RESULTS.md); bf16 is faster
    # uncapped. The interpreter takes no cap.
    regs = dict(maxnreg=tiles.decode_regs or 128) if (fp8 or tiles.decode_regs) and q.is_cuda else {}
    _decode[(K, splits, B)](q, k_cache, v_cache, out, part_out, part_lse, cu_q, seq_lens, block_tables,
                            cu_q if order is None else order, *strides, splits, H, BLOCK_N=block_n,
                            BLOCK_G=max(16, triton.next_power_of_2(G)), SPLIT=splits > 1,
                            ORDERED=order is not None, num_warps=tiles.decode_warps,
                            num_stages=tiles.decode_stages, **common, **regs)
    if splits > 1:
        _combine[(B, H)](out, part_out, part_lse, cu_q, out.stride(0), out.stride(1), splits, H,
                         BLOCK_SPLITS=triton.next_power_of_2(splits), D=D, num_warps=4)
    if T > B:   # some row has more than one query token (padded steps always launch)
        block_m = tiles.prefill_block_m or (128 if wide and G >= 4 else 64)
        block_n = tiles.prefill_block_n or (64 if wide else 32)
        assert block_m >= 16 and block_n >= 16, "tl.dot needs tiles of 16 or more"
        block_q = block_m // G
        # each row with q tokens has ceil(q / block_q) <= q / block_q + 1 tiles
        bound = -(-T // block_q) + min(B, T)
        _prefill[(bound, K)](q, k_cache, v_cache, out, cu_q, seq_lens, block_tables, B,
                             *strides, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
                             BLOCK_B=triton.next_power_of_2(B), num_warps=8 if block_m >= 128 else 4,
                             num_stages=2, **common)
    return out


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor | None, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                  eps: float, scales: tuple = (None, None)) -> torch.Tensor:
    """q [T, H, D], k/v [T, K, D] as projected -> q normed and rotated [T, H, D]; k normed,
    rotated and v written into the caches at slot_mapping (model.llama.qk_norm_rope's math).
    cos None: no rotation (q comes back as it was)."""
    (T, H, D), K = q.shape, k.shape[1]
    rope, norm, q_out = cos is not None, q_norm is not None, q.new_empty(T, H, D)
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1
    assert not rope or cos.is_contiguous() and sin.is_contiguous()
    (k_scale, v_scale, scale_n), fp8 = _scale_args(scales, k_cache)
    cos, sin = (cos, sin) if rope else (q, q)       # unread without ROPE
    strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *k_cache.stride()[:3],
               *v_cache.stride()[1:], scale_n)
    _rope_write_kv[(T, K)](q, k, v, q_out, k_cache, v_cache, k_scale, v_scale, slot_mapping, cos, sin,
                           q_norm if norm else cos, k_norm if norm else cos, *strides, H, K, eps, G=H // K,
                           NORM=norm, ROPE=rope, BLOCK_G=triton.next_power_of_2(H // K), D=D,
                           PAGE=k_cache.shape[1], FP8=fp8, num_warps=1)
    return q_out
