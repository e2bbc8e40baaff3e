"""Token sampling with explicit keys: `sample(logits, st) -> tokens`, pure and sync-free.

Contract
--------
* Row b with temperature 0 gets argmax(logits[b]) of the raw logits.
* Any other row gets one draw from softmax(x_b) where x_b = logits[b] / T_b after three
  filters, applied over one descending sort of x_b (removed tokens get -inf):
    top-k  (k > 0):   keep the k largest;
    top-p  (p < 1):   on the distribution left by top-k, keep the smallest prefix of the
                      sorted tokens whose mass reaches p (the top token always stays);
    min-p  (m > 0):   drop tokens whose probability is below m x the top probability.
* The draw is Gumbel-max: argmax(x_b + g), g = -log(-log(u)), where u[v] is a pure integer
  hash of (seeds[b], positions[b], v). Nothing else enters the noise.
* Inputs are not modified; nothing is raised inside `sample`.
* On a GPU, a batch with no filters takes one Triton kernel (kernels/gumbel.py): the same
  hash and noise, x / T as x * (1 / T), NaN never drawn; the torch code below is the CPU's and
  the tests' reference.

Why counter-based noise (no torch.Generator, no global RNG)
-----------------------------------------------------------
* Batch independence (I10): a stateful generator hands out numbers in batch order, so a
  row's noise would depend on which other requests share the step, on its row index and
  on how many steps ran before. A hash of (seed, position, column) makes a request's token
  depend only on its own logits, seed and position: preemption, re-batching, chunking and
  replays give the same token.
* Capture safety: the noise is plain integer arithmetic on device tensors, with no host
  reads, no generator state to advance and no Python branching on tensor values, so the
  same code runs eagerly, under torch.compile, and replayed from a CUDA graph.
* Same function on CPU and GPU: only int64 adds, multiplies, shifts, xors and masks whose
  results stay below 2**63, so no backend-specific overflow behaviour can creep in.

Shape letters (STYLE.md): B batch (rows being sampled), V vocabulary.
"""
from __future__ import annotations

import math

import attrs
import numpy as np
import torch

from functional_llm.kernels import gumbel


_MASK32 = 0xFFFFFFFF
_UNIFORM_BITS = 23     # (bits + 0.5) / 2**23 is exact in float32 for every 23-bit value


@attrs.frozen(slots=True)
class SamplingTensors:
    """Per-row sampling parameters on the logits' device (staging: sampling_from_blocks)."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor        # [B] int64, 0 = off
    top_p: torch.Tensor        # [B] float32 in (0, 1], 1.0 = off
    min_p: torch.Tensor        # [B] float32 in [0, 1], 0 = off
    seeds: torch.Tensor        # [B] int64 in [0, 2**63)
    positions: torch.Tensor    # [B] int64 >= 0: absolute position of the token being sampled
    greedy_only: bool          # host flag: every temperature is 0, so no sort and no noise
    unfiltered: bool = False   # host flag: no top-k/top-p/min-p in the batch, so no sort
    banned: torch.Tensor | None = None   # [B, W] int64 ids never sampled (min_tokens), -1 = none


def sampling_rows(st: SamplingTensors) -> tuple:
    """The per-row tensors of st."""
    return st.temperature, st.top_k, st.top_p, st.min_p, st.seeds, st.positions, st.banned


def sampling_from_blocks(floats: np.ndarray, ints: np.ndarray, banned: np.ndarray, device) -> SamplingTensors:
    """floats [3, B] float32 (temperature, top_p, min_p), ints [3, B] int64 (top_k, seed,
    position), banned [B, W] int64, already validated -> SamplingTensors. The per-step path:
    three copies, no checks."""
    temperature, top_p, min_p = torch.from_numpy(floats).to(device, non_blocking=True).unbind(0)
    top_k, seeds, positions = torch.from_numpy(ints).to(device, non_blocking=True).unbind(0)
    return SamplingTensors(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
        positions=positions, greedy_only=bool(np.all(floats[0] == 0)),
        unfiltered=bool(np.all(ints[0] == 0) and np.all(floats[1] >= 1) and np.all(floats[2] <= 0)),
        banned=torch.from_numpy(banned).to(device, non_blocking=True))


def gumbel_argmax(scaled: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """scaled [B, V] -> argmax over the vocab of scaled + Gumbel noise: [B] int64. The hot
    part of unfiltered sampling; in the compiled step one fused kernel instead of ~25 passes
    over B x V."""
    columns = torch.arange(scaled.shape[-1], device=scaled.device).expand_as(scaled)
    return (scaled + gumbel_noise(seeds, positions, columns)).argmax(dim=-1)


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits [B, V] float32, or 16-bit (scaled in float32) -> tokens [B] int64 (see the module
    docstring). Pure.

    No profiler range in here: record_function is dropped (with a warning) under
    torch.compile, so the caller's step labels this region "sample"."""
    if st.unfiltered and not st.greedy_only and logits.is_cuda and gumbel.triton is not None:
        lanes = torch.stack(row_lanes(st.seeds, st.positions), 1)   # one pass, bans included
        return gumbel.gumbel_max(logits, st.temperature, lanes, st.banned)  # (kernels/gumbel.py)
    if st.banned is not None:
        logits = mask_banned(logits, st.banned)
    if st.greedy_only:  # host flag, fixed per captured graph: no tensor value is read
        return logits.argmax(dim=-1)
    greedy, is_greedy = logits.argmax(dim=-1), st.temperature == 0
    # Greedy rows are scaled by 1 only to keep the arithmetic finite; their draw is
    # discarded by the final where.
    temperature = torch.where(is_greedy, torch.ones_like(st.temperature), st.temperature)
    scaled = logits.float() / temperature[:, None]
    if st.unfiltered:  # the filters would keep everything: Gumbel-max over the vocab, no sort
        return torch.where(is_greedy, greedy, gumbel_argmax(scaled, st.seeds, st.positions))
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    keep = filter_mask(sorted_logits, st.top_k, st.top_p, st.min_p)
    filtered = sorted_logits.masked_fill(~keep, -math.inf)
    # Noise is keyed by the vocab id, not the sorted rank, so it can be computed in
    # sorted order directly; no scatter back to vocab order is needed.
    noise = gumbel_noise(st.seeds, st.positions, sorted_ids)
    pick = (filtered + noise).argmax(dim=-1, keepdim=True)
    drawn = sorted_ids.gather(-1, pick).squeeze(-1)
    return torch.where(is_greedy, greedy, drawn)


def mask_banned(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with -inf at each row's banned ids [B, W] (-1 = none, listed first-to-
    last, so a row's first entry is -1 only when it bans nothing). Sync-free, fixed shapes:
    the -1 entries rewrite the row's first banned id (-inf again) or, in a row that bans
    nothing, column 0 with its own value, so no two writes to one place disagree."""
    first = banned[:, :1]
    cols = torch.where(banned >= 0, banned, first).clamp(min=0)
    keep = logits.gather(1, cols)
    values = torch.where(first >= 0, torch.full_like(keep, -math.inf), keep)
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None].expand_as(cols)
    return logits.index_put((rows, cols), values)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, k: int) -> tuple:
    """logits [B, V], ids [B] -> the model's log-probabilities (before temperature and
    filters): of ids [B], their ranks [B] (1 = most likely), the top-k [B, k] and their ids."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, ids[:, None])
    top = logp.topk(k, dim=-1)
    return chosen[:, 0], (logp > chosen).sum(dim=-1) + 1, top.values, top.indices


def filter_mask(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor) -> torch.Tensor:
    """sorted_logits [B, V] (descending) -> keep [B, V] bool; column 0 is always kept
    when top_p > 0 and min_p <= 1. Each filter keeps a prefix, so their AND is a prefix."""
    vocab = sorted_logits.shape[-1]
    rank = torch.arange(vocab, device=sorted_logits.device)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    keep_k = rank[None, :] < k[:, None]

    # top-p works on the distribution top-k leaves behind. A token stays while the mass
    # strictly before it is below p, which keeps exactly the smallest prefix reaching p.
    probs = sorted_logits.masked_fill(~keep_k, -math.inf).softmax(dim=-1)
    mass_before = _cumsum_rows(probs) - probs
    keep_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)

    # p_i < m * p_max  <=>  x_i - x_max < log(m); renormalising by the other filters does
    # not change the ratio, so min-p can be tested on the raw scaled logits. log(0) = -inf
    # keeps everything.
    keep_min = (sorted_logits - sorted_logits[:, :1]) >= torch.log(min_p)[:, None]
    return keep_k & keep_p & keep_min


_SCAN_CHUNK = 1024


def _cumsum_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] -> cumsum over V, as a scan within chunks plus a scan of chunk totals.

    Why not x.cumsum(-1): Inductor (torch 2.11, CUDA) fails to generate code when a long
    row scan (its split scan, V ~ 150k) has the softmax fused into it; scans of <= 1024
    elements compile. V is static under torch.compile, so the shape branch is free."""
    num_rows, vocab = x.shape
    if vocab <= 4 * _SCAN_CHUNK:
        return x.cumsum(dim=-1)
    padded = torch.nn.functional.pad(x, (0, (-vocab) % _SCAN_CHUNK))
    within = padded.view(num_rows, -1, _SCAN_CHUNK).cumsum(dim=-1)
    totals = within[..., -1]
    before_chunk = totals.cumsum(dim=-1) - totals
    return (within + before_chunk[..., None]).view(num_rows, -1)[:, :vocab]


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """seeds [B], positions [B], columns [B, V] int64 -> Gumbel noise [B, V] float32.

    Finite everywhere: the uniform u = (bits + 0.5) / 2**23 lies in [2**-24, 1 - 2**-24] and is
    exact in float32 (24 significant bits), up to its largest values near 1, where -log(u) makes
    the large, winning noise; float32's log is accurate there."""
    u = (uniform_bits(seeds, positions, columns).float() + 0.5) * 2.0 ** -_UNIFORM_BITS
    return -torch.log(-torch.log(u))


def uniform_bits(seeds: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The counter-based hash: seeds [B], positions [B], columns [B, V] int64 (all >= 0)
    -> [B, V] int64 in [0, 2**23), a pure function of (seed, position, column).

    Two independent 32-bit lanes absorb the 64-bit seed and the position per row (cheap,
    [B]); the column is then mixed with both lanes, so a row key is 64 bits wide and two
    requests collide only with probability ~2**-64 per position."""
    lane_a, lane_b = row_lanes(seeds, positions)
    # Weyl step over the column (odd multiplier < 2**31), then one full mixing round (a Weyl
    # sequence through an avalanche mixer, as splitmix): the one [B, V] part of sampling
    x = ((lane_a[:, None] + columns * 0x61C88647) & _MASK32) ^ lane_b[:, None]
    return _mix32(x) >> (32 - _UNIFORM_BITS)


def row_lanes(seeds: torch.Tensor, positions: torch.Tensor) -> tuple:
    """uniform_bits' per-row part: seeds [B], positions [B] -> two [B] int64 lanes in [0, 2**32)."""
    seed_lo, seed_hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    pos_lo, pos_hi = positions & _MASK32, (positions >> 32) & _MASK32
    lane_a, lane_b = _mix32(seed_lo ^ 0x243F6A88), _mix32(seed_hi ^ 0x13198A2E)
    for word, salt in ((seed_hi, 0x03707344), (pos_lo, 0x299F31D0), (pos_hi, 0x082EFA98)):
        lane_a = _mix32(lane_a ^ word)
        lane_b = _mix32(lane_b ^ word ^ salt)
    return lane_a, _mix32(lane_b ^ seed_lo)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit avalanche mixer on int64 tensors holding values in [0, 2**32).

    Multipliers are odd and below 2**31, so every product is below 2**63: no signed
    overflow on any backend, and masking to 32 bits makes it arithmetic mod 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x27D4EB2F) & _MASK32
    return x ^ (x >> 16)
