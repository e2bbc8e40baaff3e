"""The block pool as pure functions: allocate, acquire, free, match_prefix, register.

Every function takes a BlockPool and returns a new one; the argument is never changed.
Prefix caching: a full block whose KV is computed is registered under its chain hash
h_j = H(h_{j-1}, tokens of block j). A lookup is confirmed by comparing the block's tokens and
its parent link, so a hash collision can never serve wrong KV (invariant I4).
"""
from __future__ import annotations

from array import array
from typing import Callable, Optional, Sequence

import attrs
import xxhash
from pyrsistent import pvector

from functional_llm.core.records import BlockPool, CachedBlock


class PoolExhausted(Exception):
    """Internal: allocate() asked for more blocks than are free. Callers check first."""


def chain_hash(parent: Optional[int], tokens: Sequence[int]) -> int:
    """64-bit chained hash of one block: xxh3 of the token ids, seeded with the parent's hash."""
    return xxhash.xxh3_64_intdigest(array("q", tokens).tobytes(), 0 if parent is None else parent)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens tokens (ceil division)."""
    return -(-num_tokens // block_size)


def _live(pool: BlockPool, i: int) -> bool:
    b = pool.queue[i]
    return pool.ref[b] == 0 and pool.queued_at[b] == i


def allocate(pool: BlockPool, n: int) -> tuple[BlockPool, tuple]:
    """Take n free blocks (ref 0 -> 1), least recently freed first. A taken block that was
    still cached loses its hash (eviction). Raises PoolExhausted if n > pool.num_free."""
    if n > pool.num_free:
        raise PoolExhausted(n)
    if n == 0:
        return pool, ()
    ref, cached, by_hash = pool.ref.evolver(), pool.cached, pool.by_hash
    head, taken = pool.head, []
    while len(taken) < n:
        if _live(pool, head):
            b = pool.queue[head]
            taken.append(b)
            ref[b] = 1
            info = cached.get(b)
            if info is not None:  # evict: the KV is about to be overwritten
                cached = cached.delete(b)
                if by_hash.get(info.hash) == b:
                    by_hash = by_hash.delete(info.hash)
        head += 1
    pool = attrs.evolve(pool, ref=ref.persistent(), head=head, num_free=pool.num_free - n,
                        cached=cached, by_hash=by_hash)
    return _compact(pool), tuple(taken)


def _compact(pool: BlockPool) -> BlockPool:
    """Drop consumed and stale queue entries once they dominate the queue (amortised O(1))."""
    if pool.head < 1024 or pool.head * 2 < len(pool.queue):
        return pool
    live = [pool.queue[i] for i in range(pool.head, len(pool.queue)) if _live(pool, i)]
    queued_at = pool.queued_at.evolver()
    for i, b in enumerate(live):
        queued_at[b] = i
    return attrs.evolve(pool, queue=pvector(live), head=0, queued_at=queued_at.persistent())


def acquire(pool: BlockPool, blocks: Sequence[int]) -> BlockPool:
    """Add one reference to each block (prefix hits). A free cached block is revived: it
    leaves the free set, and its queue entry becomes stale."""
    ref, revived = pool.ref.evolver(), 0
    for b in blocks:
        revived += ref[b] == 0
        ref[b] += 1
    return attrs.evolve(pool, ref=ref.persistent(), num_free=pool.num_free - revived)


def free(pool: BlockPool, blocks: Sequence[int]) -> BlockPool:
    """Drop one reference from each block. Blocks reaching ref 0 join the free queue, the
    sequence's last block first (tails are the least likely to be shared), keeping their hash
    so a later request can still hit them until they are evicted."""
    ref, queue, queued_at, freed = pool.ref.evolver(), pool.queue, pool.queued_at.evolver(), 0
    for b in reversed([int(b) for b in blocks]):
        assert ref[b] > 0, f"free of unreferenced block {b}"
        ref[b] -= 1
        if ref[b] == 0:
            queued_at[b] = len(queue)
            queue = queue.append(b)
            freed += 1
    return attrs.evolve(pool, ref=ref.persistent(), queue=queue, queued_at=queued_at.persistent(),
                        num_free=pool.num_free + freed)


@attrs.frozen(slots=True)
class PrefixMatch:
    blocks: tuple = ()        # cached blocks serving the prefix, in order
    hashes: tuple = ()        # their chain hashes


def match_prefix(pool: BlockPool, tokens: Sequence[int], hash_fn: Callable = chain_hash) -> PrefixMatch:
    """Longest run of cached full blocks equal to tokens' leading blocks. At least one token is
    left uncached so the step that computes it can produce logits. Pure: the pool is unchanged
    (acquire() the result to use it)."""
    S = pool.block_size
    blocks, hashes, parent, h = [], [], None, None
    for j in range((len(tokens) - 1) // S):
        block_tokens = tuple(tokens[j * S:(j + 1) * S])
        h = hash_fn(h, block_tokens)
        b = pool.by_hash.get(h)
        info = pool.cached.get(b) if b is not None else None
        if info is None or info.tokens != block_tokens or info.parent != parent:
            break  # miss, collision or stale chain: stop at the first unconfirmed block
        blocks.append(b)
        hashes.append(h)
        parent = (b, info.epoch)
    return PrefixMatch(tuple(blocks), tuple(hashes))


def _valid_link(pool: BlockPool, info: CachedBlock) -> bool:
    """The block's parent (if any) is still indexed under the epoch the block recorded."""
    link = info.parent   # (parent block, its epoch when this block was registered)
    return link is None or getattr(pool.cached.get(link[0]), "epoch", None) == link[1]


def register(pool: BlockPool, block: int, h: int, tokens: tuple, parent_block: Optional[int]) -> BlockPool:
    """Index a full block whose KV has been computed under chain hash h. If h already names
    another block with a valid chain, the existing entry wins (identical content)."""
    assert len(tokens) == pool.block_size and pool.ref[block] > 0
    pinfo = None if parent_block is None else pool.cached.get(parent_block)
    if block in pool.cached or (parent_block is not None and pinfo is None):
        return pool  # indexed already, or its parent is not (so it is unreachable anyway)
    parent = None if parent_block is None else (parent_block, pinfo.epoch)
    if (other := pool.by_hash.get(h)) is not None and _valid_link(pool, pool.cached[other]):
        return pool
    info = CachedBlock(h, tokens, parent, pool.next_epoch)
    return BlockPool(pool.block_size, pool.ref, pool.queue, pool.head, pool.queued_at, pool.num_free,
                     pool.cached.set(block, info), pool.by_hash.set(h, block), pool.next_epoch + 1)
