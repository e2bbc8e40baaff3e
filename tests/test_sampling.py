"""Sampling: greedy rows, the sampled distribution after each filter (chi-square), key
determinism and batch independence (I10), the hash itself, and a filter-survival property."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st_

from functional_llm.runtime.sampling import (
    _cumsum_rows, sample, sampling_from_blocks, uniform_bits,
)

MAX_SEED = 2**63 - 1


def make_sampling_tensors(temperature, top_k, top_p, min_p, seeds, positions, device,
                          banned=None):
    """Per-row host values (length B each) -> SamplingTensors, as staging builds them."""
    floats = np.array([temperature, top_p, min_p], dtype=np.float32)
    ints = np.array([top_k, seeds, positions], dtype=np.int64)
    if banned is None:
        banned = np.full((len(temperature), 1), -1, dtype=np.int64)
    return sampling_from_blocks(floats, ints, np.asarray(banned, dtype=np.int64), device)


def tensors(rows, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=0, positions=0):
    """SamplingTensors for `rows` rows; each argument is a scalar (broadcast) or a list."""
    def col(v):
        return list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v] * rows
    return make_sampling_tensors(col(temperature), col(top_k), col(top_p), col(min_p),
                                 col(seeds), col(positions), "cpu")


# ---------------------------------------------------------------- reference (float64)

def reference_probs(logits, temperature, top_k, top_p, min_p):
    """softmax(logits / T) after top-k, then top-p on what top-k left, then min-p; in float64.
    Only for logits without ties (the test vocabularies below)."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-x)
    s = x[order]
    vocab = len(s)
    n_k = top_k if 0 < top_k < vocab else vocab
    p = np.exp(s[:n_k] - s[0])
    p /= p.sum()
    mass_before = np.cumsum(p) - p
    n_p = int(np.sum(mass_before < top_p)) if top_p < 1 else n_k
    n_m = int(np.sum(s - s[0] >= math.log(min_p))) if min_p > 0 else vocab
    keep = order[:min(n_k, n_p, n_m)]
    probs = np.zeros(vocab)
    probs[keep] = np.exp(x[keep] - x.max())
    return probs / probs.sum()


# Upper 0.999 quantiles of chi-square with df degrees of freedom (tabulated; no scipy).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}

LOGITS6 = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0]   # softmax ~ .420 .255 .154 .094 .057 .021
DRAWS = 20_000

# (name, temperature, top_k, top_p, min_p, tokens that must survive). The logits were chosen
# so every cut sits well away from a threshold (see the margins in the comments).
DISTRIBUTION_CASES = [
    ("plain", 1.0, 0, 1.0, 0.0, 6),
    ("T=0.5", 0.5, 0, 1.0, 0.0, 6),
    ("top_k=3", 1.0, 3, 1.0, 0.0, 3),
    ("top_p=0.7", 1.0, 0, 0.7, 0.0, 3),       # mass before token 2: .674, before 3: .829
    ("min_p=0.2", 1.0, 0, 1.0, 0.2, 4),       # log .2 = -1.61; gaps -1.5 (kept), -2.0 (cut)
    # top_k drops token 5; top_p (.908 < .95 <= .970) drops token 4; min_p drops token 3
    # (log .15 = -1.90 vs gap -2.14); each filter does some of the cutting.
    ("combined", 0.7, 5, 0.95, 0.15, 3),
]


@pytest.mark.parametrize("name,temperature,top_k,top_p,min_p,num_kept", DISTRIBUTION_CASES,
                         ids=[c[0] for c in DISTRIBUTION_CASES])
def test_sampled_distribution_matches_filtered_softmax(name, temperature, top_k, top_p, min_p,
                                                       num_kept):
    expected = reference_probs(LOGITS6, temperature, top_k, top_p, min_p)
    kept = expected > 0
    assert kept.sum() == num_kept  # the reference itself cuts where the case says
    rng = np.random.default_rng(1234)
    seeds = rng.integers(0, MAX_SEED, DRAWS, endpoint=True)
    # Many (seed, position) keys in one batched call: each row is one independent draw.
    st = tensors(DRAWS, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 seeds=seeds, positions=np.arange(DRAWS) * 7 + 3)
    logits = torch.tensor(LOGITS6, dtype=torch.float32).expand(DRAWS, -1).contiguous()
    tokens = sample(logits, st).numpy()
    counts = np.bincount(tokens, minlength=len(LOGITS6))
    assert counts[~kept].sum() == 0, f"filtered tokens drawn: {counts}"
    want = expected[kept] * DRAWS
    chi2 = float(((counts[kept] - want) ** 2 / want).sum())
    assert chi2 < CHI2_999[int(kept.sum()) - 1], (
        f"{name}: chi2={chi2:.1f}, counts={counts[kept]}, expected={np.round(want)}")


# ------------------------------------------------------------------------------ greedy

def test_greedy_rows_are_argmax_of_raw_logits():
    torch.manual_seed(0)
    logits = torch.randn(12, 300) * 3
    greedy = sample(logits, tensors(12, temperature=0.0, seeds=list(range(12))))
    assert torch.equal(greedy, logits.argmax(dim=-1))
    # Mixed batch: greedy rows still argmax, whatever filters the row carries (they apply to
    # sampled rows only), and the noise of the sampled rows does not leak into them.
    temps = [0.0, 1.5] * 6
    st = tensors(12, temperature=temps, top_k=[0, 5, 2, 0] * 3, top_p=[0.5, 0.9, 1.0] * 4,
                 min_p=0.1, seeds=list(range(12)), positions=list(range(100, 112)))
    assert not st.greedy_only
    mixed = sample(logits, st)
    is_greedy = torch.tensor(temps) == 0
    assert torch.equal(mixed[is_greedy], logits.argmax(dim=-1)[is_greedy])
    assert not torch.equal(mixed[~is_greedy], logits.argmax(dim=-1)[~is_greedy])


def test_sample_leaves_logits_unchanged():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    before = logits.clone()
    sample(logits, tensors(4, temperature=0.7, top_k=10, top_p=0.8, min_p=0.05))
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- keys and batch shape

def _rows(num_rows, vocab=512, seed=0):
    """num_rows random logit rows with per-row params, seeds and positions (as lists)."""
    rng = np.random.default_rng(seed)
    return dict(
        logits=torch.from_numpy(rng.normal(0, 1.0, (num_rows, vocab)).astype(np.float32)),
        temperature=rng.choice([0.0, 0.6, 1.0, 1.3], num_rows).tolist(),
        top_k=rng.choice([0, 0, 20, 200], num_rows).tolist(),
        top_p=rng.choice([1.0, 0.95, 0.8], num_rows).tolist(),
        min_p=rng.choice([0.0, 0.0, 0.02], num_rows).tolist(),
        seeds=rng.integers(0, MAX_SEED, num_rows, endpoint=True).tolist(),
        positions=rng.integers(0, 5000, num_rows).tolist(),
    )


def _sample_rows(rows, index):
    """Sample the rows `index` of `rows` as one batch, in that order."""
    index = list(index)
    params = {k: [v[i] for i in index] for k, v in rows.items() if k != "logits"}
    return sample(rows["logits"][index], tensors(len(index), **params))


def test_token_depends_only_on_row_not_on_batch():
    rows = _rows(24)
    full = _sample_rows(rows, range(24))
    perm = np.random.default_rng(5).permutation(24)
    assert torch.equal(_sample_rows(rows, perm), full[perm])
    assert torch.equal(_sample_rows(rows, reversed(range(24))), full.flip(0))
    for i in (0, 7, 23):
        assert torch.equal(_sample_rows(rows, [i]), full[i:i + 1])
    # Each row sampled again inside a bigger batch of strangers, at another row index.
    others = _rows(40, seed=9)
    mixed = {k: others[k] + rows[k] if k != "logits" else torch.cat([others[k], rows[k]])
             for k in rows}
    assert torch.equal(_sample_rows(mixed, range(40, 64)), full)
    assert torch.equal(_sample_rows(mixed, range(64))[40:], full)


def _sequence(seed, num_positions=64, vocab=1000, start=0):
    """Tokens drawn from uniform logits at positions start..start+n-1 with one seed."""
    logits = torch.zeros(num_positions, vocab)
    st = tensors(num_positions, seeds=seed, positions=list(range(start, start + num_positions)))
    return sample(logits, st)


def test_same_seed_same_tokens_different_seeds_differ():
    a = _sequence(42)
    assert torch.equal(a, _sequence(42))
    assert len(set(a.tolist())) > 50          # positions are mixed in, not ignored
    # Seeds differing in the low half, the high half only, and the extreme seed.
    for other in (43, 42 + 2**32, 42 + 2**62, MAX_SEED, 0):
        b = _sequence(other)
        assert int((a != b).sum()) >= 56, other  # uniform over 1000: ~0.06 equal of 64
    # Large positions are still fine and differ from small ones.
    far = _sequence(42, start=2**40)
    assert torch.equal(far, _sequence(42, start=2**40))
    assert int((far != a).sum()) >= 56


def test_tiny_logit_changes_keep_the_token():
    """Noise is attached to vocab ids, not sort ranks: logits that differ by far less than
    the noise (as GPU reductions in different batch shapes do, I10) give the same token even
    when the sort order of near-ties flips."""
    rng = np.random.default_rng(11)
    num_rows, vocab = 64, 256
    st = tensors(num_rows, seeds=rng.integers(0, MAX_SEED, num_rows).tolist(),
                 positions=list(range(num_rows)))
    base = torch.from_numpy(rng.normal(0, 1e-3, (num_rows, vocab)).astype(np.float32))
    jitter = torch.from_numpy(rng.normal(0, 1e-5, (num_rows, vocab)).astype(np.float32))
    assert not torch.equal(base.argsort(dim=-1), (base + jitter).argsort(dim=-1))
    assert torch.equal(sample(base, st), sample(base + jitter, st))


# ------------------------------------------------------------------------ the hash

MASK = 0xFFFFFFFF


def _mix32_py(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK
    x ^= x >> 15
    x = (x * 0x27D4EB2F) & MASK
    return x ^ (x >> 16)


def _uniform_bits_py(seed, position, column):
    """The hash written again over Python's unbounded ints: if the torch version overflowed
    int64 anywhere, the two would disagree."""
    s_lo, s_hi = seed & MASK, seed >> 32
    p_lo, p_hi = position & MASK, position >> 32
    a = _mix32_py(s_lo ^ 0x243F6A88)
    b = _mix32_py(s_hi ^ 0x13198A2E)
    for word, salt in ((s_hi, 0x03707344), (p_lo, 0x299F31D0), (p_hi, 0x082EFA98)):
        a = _mix32_py(a ^ word)
        b = _mix32_py(b ^ word ^ salt)
    b = _mix32_py(b ^ s_lo)
    x = ((a + column * 0x61C88647) & MASK) ^ b
    return _mix32_py(x) >> 9


def test_hash_matches_unbounded_integer_reference():
    rng = np.random.default_rng(3)
    seeds = [0, 1, MAX_SEED, 2**32 - 1, 2**32] + rng.integers(0, MAX_SEED, 11).tolist()
    positions = [0, 1, 2**31, 2**40 + 5] + rng.integers(0, 2**20, 12).tolist()
    columns = [0, 1, 151_935, 2**24 + 3] + rng.integers(0, 2**17, 4).tolist()
    got = uniform_bits(torch.tensor(seeds), torch.tensor(positions),
                       torch.tensor(columns).expand(len(seeds), -1))
    want = [[_uniform_bits_py(s, p, c) for c in columns] for s, p in zip(seeds, positions)]
    assert got.tolist() == want


def test_hash_bits_are_uniform_along_each_input():
    """23-bit outputs bucketed by their top 6 bits: chi-square (63 df, 0.999 quantile 103.4)
    along columns, positions, low seed words and high seed words."""
    n = 8192
    ar = torch.arange(n)
    zeros = torch.zeros(n, dtype=torch.long)
    streams = {
        "column": uniform_bits(torch.tensor([7]), torch.tensor([11]), ar[None, :]),
        "position": uniform_bits(torch.full((n,), 7), ar, zeros[:, None]),
        "seed_lo": uniform_bits(ar, zeros, zeros[:, None]),
        "seed_hi": uniform_bits(ar << 32, zeros, zeros[:, None]),
    }
    for name, bits in streams.items():
        counts = np.bincount((bits.flatten() >> 17).numpy(), minlength=64)
        chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
        assert chi2 < 103.4, (name, chi2)


@pytest.mark.parametrize("vocab", [6, 4096, 4097, 151_936])
def test_chunked_row_cumsum_matches_cumsum(vocab):
    x = torch.rand(3, vocab, dtype=torch.float64)
    assert torch.allclose(_cumsum_rows(x), x.cumsum(dim=-1), rtol=1e-12, atol=1e-9)


def test_sample_traces_without_graph_breaks():
    """fullgraph=True fails on .item(), data-dependent Python branches or other host syncs."""
    compiled = torch.compile(sample, fullgraph=True, backend="eager")
    rows = _rows(6, vocab=64)
    params = {k: v for k, v in rows.items() if k != "logits"}
    st = tensors(6, **params)
    assert torch.equal(compiled(rows["logits"], st), sample(rows["logits"], st))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_noise_and_tokens_on_gpu():
    rows = _rows(32, vocab=4096)
    params = {k: v for k, v in rows.items() if k != "logits"}
    cpu = sample(rows["logits"], tensors(32, **params))
    gpu_st = make_sampling_tensors(*(params[k] for k in
                                     ("temperature", "top_k", "top_p", "min_p", "seeds",
                                      "positions")), "cuda")
    assert torch.equal(sample(rows["logits"].cuda(), gpu_st).cpu(), cpu)
    # no filters (the GPU's one-kernel draw), each row banning its own winner or nothing
    free = [params["temperature"], [0] * 32, [1.0] * 32, [0.0] * 32, params["seeds"], params["positions"]]
    cpu = sample(rows["logits"], make_sampling_tensors(*free, "cpu"))
    banned = [[t, -1] if i % 3 else [-1, -1] for i, t in enumerate(cpu.tolist())]
    want = sample(rows["logits"], make_sampling_tensors(*free, "cpu", banned))
    got = sample(rows["logits"].cuda(), make_sampling_tensors(*free, "cuda", banned)).cpu()
    assert torch.equal(got, want) and (want != cpu).sum() >= 15
    cols = torch.arange(4096).expand(32, -1)
    assert torch.equal(uniform_bits(gpu_st.seeds, gpu_st.positions, cols.cuda()).cpu(),
                       uniform_bits(torch.tensor(params["seeds"]),
                                    torch.tensor(params["positions"]), cols))


# ------------------------------------------------------------------------- errors

def allowed_tokens(logits_row, temperature, top_k, top_p, min_p):
    """Tokens a correct sampler may return for one row. Scaled logits are computed in
    float32 exactly as the sampler does, so ranks agree; the top-p and min-p cuts get a
    little slack for float32 rounding; tokens tied with the last kept value are allowed,
    since which of a tie survives is the sort's choice."""
    row = np.asarray(logits_row, dtype=np.float32)
    if temperature == 0:
        return set(np.flatnonzero(row == row.max()).tolist())
    x = (row / np.float32(temperature)).astype(np.float64)
    s = np.sort(x)[::-1]
    vocab = len(s)
    n_k = top_k if 0 < top_k < vocab else vocab
    p = np.exp(s[:n_k] - s[0])
    p /= p.sum()
    n_p = int(np.sum(np.cumsum(p) - p < top_p + 1e-4)) if top_p < 1 else n_k
    slack = 1e-5 * (1 + abs(s[0]))
    n_m = int(np.sum(s - s[0] >= math.log(min_p) - slack)) if min_p > 0 else vocab
    cut = s[min(n_k, n_p, n_m) - 1]
    return set(np.flatnonzero(x >= cut).tolist())


@st_.composite
def sampling_rows(draw):
    vocab = draw(st_.integers(2, 40))
    num_rows = draw(st_.integers(1, 6))
    # Half-integers make ties common; uniform floats make near-ties.
    value = st_.one_of(st_.integers(-16, 16).map(lambda v: v / 2.0),
                       st_.floats(-8, 8, allow_nan=False, width=32))
    row = dict(
        logits=draw(st_.lists(st_.lists(value, min_size=vocab, max_size=vocab),
                              min_size=num_rows, max_size=num_rows)),
        temperature=draw(st_.lists(st_.sampled_from([0.0, 0.05, 0.5, 1.0, 2.5]),
                                   min_size=num_rows, max_size=num_rows)),
        top_k=draw(st_.lists(st_.integers(0, vocab + 2), min_size=num_rows, max_size=num_rows)),
        top_p=draw(st_.lists(st_.one_of(st_.just(1.0), st_.floats(0.01, 1.0)),
                             min_size=num_rows, max_size=num_rows)),
        min_p=draw(st_.lists(st_.one_of(st_.just(0.0), st_.floats(0.0, 1.0)),
                             min_size=num_rows, max_size=num_rows)),
        seeds=draw(st_.lists(st_.integers(0, MAX_SEED), min_size=num_rows, max_size=num_rows)),
        positions=draw(st_.lists(st_.integers(0, 2**40), min_size=num_rows,
                                 max_size=num_rows)),
    )
    return row


DRAWS_PER_ROW = 64


@settings(max_examples=40, deadline=None)
@given(sampling_rows())
def test_sampled_token_survives_every_filter(rows):
    # Each row is drawn at DRAWS_PER_ROW consecutive positions, so a token that a broken
    # filter lets through is drawn even when its probability is only a few percent.
    num_rows = len(rows["logits"])
    rep = {k: [v for v in vals for _ in range(DRAWS_PER_ROW)] for k, vals in rows.items()}
    rep["positions"] = [p + j for p in rows["positions"] for j in range(DRAWS_PER_ROW)]
    params = {k: v for k, v in rep.items() if k != "logits"}
    st = tensors(num_rows * DRAWS_PER_ROW, **params)
    # top_p and min_p reach the sampler as float32: judge against the same values.
    top_p32, min_p32 = st.top_p.tolist(), st.min_p.tolist()
    tokens = sample(torch.tensor(rep["logits"], dtype=torch.float32), st).view(num_rows, -1)
    for b in range(num_rows):
        i = b * DRAWS_PER_ROW
        ok = allowed_tokens(rows["logits"][b], rows["temperature"][b], rows["top_k"][b],
                            top_p32[i], min_p32[i])
        drawn = set(tokens[b].tolist())
        assert drawn <= ok, (b, sorted(drawn - ok), sorted(ok))


def test_unfiltered_fast_path_draws_the_same_tokens_as_the_sorted_path():
    """With no top-k/top-p/min-p the sampler skips the sort; the noise is keyed by vocab id,
    so both paths must pick the same token for every row."""
    import attrs
    g = torch.Generator().manual_seed(0)
    B, V = 64, 500
    logits = torch.randn(B, V, generator=g) * 3
    st = make_sampling_tensors(temperature=[0.7] * (B - 1) + [0.0], top_k=[0] * B, top_p=[1.0] * B,
                               min_p=[0.0] * B, seeds=list(range(B)), positions=[5] * B, device="cpu")
    assert st.unfiltered
    fast = sample(logits, st)
    slow = sample(logits, attrs.evolve(st, unfiltered=False))
    assert torch.equal(fast, slow)
    assert len(set(fast.tolist())) > B // 2          # really sampled, not a constant


def test_16_bit_logits_sample_as_their_float32_widening():
    """The step hands the sampler the head's bf16 logits (a float32 copy would be a [B, V]
    write every step): greedy, Gumbel-max and filtered rows, banned ids or not, give the tokens
    of the same logits widened to float32."""
    g, B = torch.Generator().manual_seed(5), 512     # enough rows for near ties bf16 math would flip
    logits = (torch.randn(B, 300, generator=g) * 3).to(torch.bfloat16)
    banned = [[7, -1], [-1, -1], [3, 4], [-1, -1]] * (B // 4)
    for temperature, top_k, top_p in ((0.0, 0, 1.0), (0.7, 0, 1.0), (0.9, 20, 0.9)):
        st = make_sampling_tensors([temperature] * B, [top_k] * B, [top_p] * B, [0.0] * B,
                                   list(range(B)), [3] * B, "cpu", banned)
        tokens = sample(logits, st)
        assert torch.equal(tokens, sample(logits.float(), st))
        assert temperature == 0 or len(set(tokens.tolist())) > 50     # really drawn


def test_banned_ids_are_never_sampled_and_other_rows_untouched():
    """min_tokens masking: a row's banned ids (EOS, stop ids) get -inf before any sampling
    path; a row banning nothing (-1s) samples as without the mask, bit for bit."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    logits[:, 7] = 30.0                       # token 7 would win every row
    banned = [[7, 3, -1], [-1, -1, -1], [7, -1, -1], [7, 8, 9]]
    for temperature, top_k in ((0.0, 0), (1.0, 0), (0.8, 10)):
        plain = make_sampling_tensors([temperature] * 4, [top_k] * 4, [1.0] * 4, [0.0] * 4,
                                      [1, 2, 3, 4], [5] * 4, "cpu")
        masked = make_sampling_tensors([temperature] * 4, [top_k] * 4, [1.0] * 4, [0.0] * 4,
                                       [1, 2, 3, 4], [5] * 4, "cpu", banned)
        free, got = sample(logits, plain), sample(logits, masked)
        assert free.tolist() == [7, 7, 7, 7]
        assert got[1] == free[1]                          # nothing banned: same draw
        for row in (0, 2, 3):
            assert int(got[row]) not in banned[row]
