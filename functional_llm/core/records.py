"""Every record of the formal core, in one file. All are immutable (attrs frozen + slots).

Why persistent containers: a decode step touches every running sequence, so a record that
copied its token list per step would cost O(total tokens) host time. Token lists are
pyrsistent vectors (append shares structure, O(1) amortised, in C); the block pool's sparse
maps are `immutables` HAMTs (C, ~0.5 us per update; pyrsistent's map is pure Python); dense per-step mappings are fresh dicts behind a read-only proxy
(copying 256 entries costs microseconds, far less than a persistent map's per-key update).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping, Optional

import attrs
import immutables
import numpy as np
from pyrsistent import PVector, pvector

from functional_llm.errors import InvalidSamplingParams


def _to_tuple(value):
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return () if value is None else (value,)   # one item (validation names a wrong one)
    return tuple(value)


MAX_LOGPROBS = 20
MAX_BANNED = 8      # EOS + stop ids a request can mask while under min_tokens


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)   # True is an int to Python


def _optional_int(value, top) -> bool:
    return value is None or (_is_int(value) and 0 <= value <= top)


# SamplingParams' checks, in order: (fields, ok(value, params), why; `{p}` names the params).
# Every type first, so a wrong one is this error, never a TypeError from a comparison.
_SAMPLING_CHECKS = (
    (("temperature", "top_p", "min_p"), lambda v, p: _is_int(v) or isinstance(v, float),
     "must be a number (int or float)"),
    (("top_k", "max_tokens", "min_tokens"), lambda v, p: _is_int(v), "must be an int"),
    (("temperature",), lambda v, p: v >= 0, "must be >= 0 (0 = greedy)"),   # also rejects NaN
    (("top_p",), lambda v, p: 0 < v <= 1, "must be in (0, 1]"),
    (("top_k",), lambda v, p: v >= 0, "must be >= 0 (0 = off)"),
    (("min_p",), lambda v, p: 0 <= v <= 1, "must be in [0, 1]"),
    (("max_tokens",), lambda v, p: v >= 1, "must be >= 1"),
    (("min_tokens",), lambda v, p: 0 <= v <= p.max_tokens, "must be in [0, max_tokens={p.max_tokens}]"),
    (("seed",), lambda v, p: _optional_int(v, 2**63 - 1), "must be None or an int in [0, 2**63)"),
    (("stop",), lambda v, p: all(isinstance(s, str) and s for s in v), "stop strings must be non-empty str"),
    (("stop_token_ids",), lambda v, p: all(_is_int(t) and t >= 0 for t in v), "must be non-negative ints"),
    (("ignore_eos",), lambda v, p: isinstance(v, bool), "must be a bool"),
    (("logprobs", "prompt_logprobs"), lambda v, p: _optional_int(v, MAX_LOGPROBS),
     f"must be None or an int in [0, {MAX_LOGPROBS}]"),
)


@attrs.frozen(slots=True)
class SamplingParams:
    """How to sample one request. Validated on construction (InvalidSamplingParams)."""

    temperature: float = 1.0
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 1.0 = off
    min_p: float = 0.0              # 0.0 = off
    max_tokens: int = 16
    min_tokens: int = 0             # EOS / stop ids do not end a request before this many tokens
    seed: Optional[int] = None      # None: derived from (engine seed, request id)
    stop: tuple = attrs.field(default=(), converter=_to_tuple)
    stop_token_ids: tuple = attrs.field(default=(), converter=_to_tuple)
    ignore_eos: bool = False
    logprobs: Optional[int] = None         # per generated token: its logprob and the top-k
    prompt_logprobs: Optional[int] = None  # the same per prompt token (skips prefix-cache hits)

    def __attrs_post_init__(self):
        for names, ok, why in _SAMPLING_CHECKS:
            for name in names:
                if not ok(getattr(self, name), self):
                    raise InvalidSamplingParams(name, getattr(self, name), why.format(p=self))


@attrs.frozen(slots=True)
class Request:
    """What a user submitted, after tokenisation: built and validated once by the shell and
    handed to the engine as is; only `admit` stamps its arrival."""

    rid: str
    prompt: tuple                   # prompt token ids
    params: SamplingParams
    seed: int                       # the sampling key's seed (explicit or derived)
    arrival: Optional[int] = None   # admission order (Counters.arrivals), stamped by admit
    # the sampler's per-row values, gathered once here instead of on every step; the last is
    # the position before which EOS and stop ids are masked (min_tokens)
    knobs: tuple = attrs.field(init=False, eq=False, repr=False, default=attrs.Factory(
        lambda self: (self.params.temperature, self.params.top_p, self.params.min_p, self.params.top_k,
                      self.seed, len(self.prompt) + self.params.min_tokens), takes_self=True))


def block_array(ids) -> np.ndarray:
    """A read-only int32 array of block ids. Block tables are arrays because the runtime stages
    all of them every step: one concatenate instead of thousands of int conversions."""
    a = np.array(ids, dtype=np.int32).reshape(-1)
    a.flags.writeable = False
    return a


NO_BLOCKS = block_array(())


@attrs.frozen(slots=True)
class Seq:
    """A request's evolving state. tokens = prompt + generated; KV of tokens[:num_computed]
    is in the blocks of block_table; block_hashes[j] is the chain hash of full block j
    (only for blocks whose KV is computed)."""

    req: Request
    tokens: PVector
    num_computed: int = 0
    block_table: np.ndarray = NO_BLOCKS   # read-only int32 array (block_array)
    block_hashes: tuple = ()
    num_cached: Optional[int] = None  # prompt tokens served by the prefix cache at first admission

    @property
    def rid(self) -> str:
        return self.req.rid

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.req.prompt)


@attrs.frozen(slots=True)
class CachedBlock:
    """What the prefix index knows about one full, computed block. `parent` is the
    (block id, epoch) of the previous block of the chain, so a hit confirms the whole prefix
    token by token, not only by hash."""

    hash: int
    tokens: tuple
    parent: Optional[tuple]
    epoch: int


@attrs.frozen(slots=True)
class BlockPool:
    """Reference-counted KV blocks with a prefix index.

    Free blocks (ref 0) sit in `queue` in eviction order (least recently freed first). An
    entry `queue[i] == b` is live iff ref[b] == 0 and queued_at[b] == i; reviving a cached block
    (prefix hit) or re-freeing it leaves a stale entry behind, skipped lazily on allocation.
    """

    block_size: int
    ref: PVector                    # [N] reference counts
    queue: PVector                  # free-block queue (with stale entries)
    head: int                       # first queue index not yet consumed
    queued_at: PVector              # [N] queue index of each block's live entry
    num_free: int
    cached: immutables.Map          # block id -> CachedBlock (full, computed, hashed)
    by_hash: immutables.Map         # chain hash -> block id
    next_epoch: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.ref)


def new_pool(num_blocks: int, block_size: int) -> BlockPool:
    ids = range(num_blocks)
    return BlockPool(block_size, pvector([0] * num_blocks), pvector(ids), 0, pvector(ids),
                     num_blocks, immutables.Map(), immutables.Map())


@attrs.frozen(slots=True)
class SchedConfig:
    """Static scheduling limits (validated by the shell before the engine starts)."""

    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    eos_token_ids: tuple = ()
    enable_prefix_caching: bool = True
    hash_fn: Optional[Callable] = None  # chain hash override (tests inject a weak one)


@attrs.frozen(slots=True)
class Counters:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    chunked_prefills: int = 0       # prefill pieces that stopped short of the prompt's end
    preemptions: int = 0
    cache_hit_tokens: int = 0
    arrivals: int = 0               # requests admitted so far: the next Request.arrival


@attrs.frozen(slots=True)
class SchedState:
    waiting: tuple                  # request ids, in admission order (preempted ones first)
    running: tuple                  # request ids, oldest first (victims come from the end)
    seqs: Mapping                   # rid -> Seq, a read-only view of a fresh dict
    pool: BlockPool
    counters: Counters = Counters()

    @property
    def blocks_in_use(self) -> int:
        return self.pool.num_blocks - self.pool.num_free


def new_state(cfg: SchedConfig) -> SchedState:
    return SchedState((), (), MappingProxyType({}), new_pool(cfg.num_blocks, cfg.block_size))


@attrs.frozen(slots=True)
class Plan:
    """One step's work, struct-of-arrays: row i schedules tokens[starts[i]:starts[i]+counts[i]]
    of sequence rids[i]; sample[i] says whether the step samples its next token (the chunk
    reaches the end of the known tokens). preempted lists the victims of this step."""

    rids: tuple = ()
    starts: tuple = ()
    counts: tuple = ()
    sample: tuple = ()
    preempted: tuple = ()

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)

    def without(self, gone) -> tuple["Plan", tuple]:
        """The plan with the rows of the rids in `gone` dropped, and for each sampling row of
        this plan whether it is kept (to filter its sampled tokens alike)."""
        if not gone:   # the usual step: nothing ended while it was in flight
            return self, (True,) * sum(self.sample)
        keep = [rid not in gone for rid in self.rids]
        rows = [r for r, k in zip(zip(self.rids, self.starts, self.counts, self.sample), keep) if k]
        cols = tuple(map(tuple, zip(*rows))) if rows else ((), (), (), ())
        return Plan(*cols, self.preempted), tuple(k for k, s in zip(keep, self.sample) if s)


@attrs.frozen(slots=True)
class Delta:
    """What one request gained in one transition: new tokens and, if it ended, why."""

    rid: str
    new_tokens: tuple = ()
    finish_reason: Optional[str] = None   # 'stop' | 'length' | 'abort' | None


@attrs.frozen(slots=True)
class TokenLogprobs:
    """One position's log-probabilities under the model (before temperature and filters):
    the token's own, its rank (1 = most likely) and the top-k as (id, logprob) pairs."""

    token: int
    logprob: float
    rank: int
    top: tuple = ()


@attrs.frozen(slots=True)
class Deltas:
    """A step's deltas, struct-of-arrays: sampled token per row, then the finished rows.
    Everything the shell needs (outputs.apply): it never reads the engine's state."""

    rids: tuple = ()
    tokens: tuple = ()
    finished: Mapping = MappingProxyType({})   # rid -> finish reason
    num_cached: Mapping = MappingProxyType({})  # rid -> Seq.num_cached, for every rid with a row
    # filled by the engine for requests that ask: rid -> TokenLogprobs of its new token, and
    # rid -> tuple of TokenLogprobs of the prompt tokens this step's chunk predicts
    logprobs: Mapping = MappingProxyType({})
    prompt_logprobs: Mapping = MappingProxyType({})

    def __iter__(self):
        for rid, tok in zip(self.rids, self.tokens):
            yield Delta(rid, (tok,), self.finished.get(rid))
