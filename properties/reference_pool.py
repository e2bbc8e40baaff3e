"""A deliberately naive block pool, the model the real one (core/blocks.py) is compared with.

Mutable, plain lists and dicts, no hashes, no epochs, no lazy queue: a cached block is known
by the whole token prefix it ends, and evicting a block forgets its descendants at once.
Everything is a linear scan. Same policy as the real pool: allocation takes the least
recently freed block first; a sequence's blocks are freed last block first; a block is
indexed only if its parent is, and only if no indexed block ends the same prefix.
"""
from __future__ import annotations

from functional_llm.core.blocks import PoolExhausted


class NaivePool:
    def __init__(self, num_blocks: int, block_size: int):
        self.S = block_size
        self.ref = [0] * num_blocks
        self.free_order = list(range(num_blocks))   # next to allocate first
        self.cached = {}                            # block -> (token prefix it ends, parent)

    def allocate(self, n: int) -> list:
        if n > len(self.free_order):
            raise PoolExhausted(n)
        taken, self.free_order = self.free_order[:n], self.free_order[n:]
        for b in taken:
            self.ref[b] = 1
            self._forget(b)
        return taken

    def _forget(self, block: int) -> None:
        if self.cached.pop(block, None) is not None:
            for child in [c for c, (_, parent) in self.cached.items() if parent == block]:
                self._forget(child)

    def acquire(self, blocks) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                self.free_order.remove(b)
            self.ref[b] += 1

    def free(self, blocks) -> None:
        for b in reversed(list(blocks)):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_order.append(b)

    def match(self, tokens) -> list:
        """Longest run of indexed blocks ending tokens' leading block prefixes, leaving at
        least one token unmatched."""
        out = []
        for j in range((len(tokens) - 1) // self.S):
            prefix = tuple(tokens[:(j + 1) * self.S])
            hits = [b for b, (p, _) in self.cached.items() if p == prefix]
            assert len(hits) <= 1, "naive model indexed one prefix twice"
            if not hits:
                break
            out.append(hits[0])
        return out

    def register(self, block: int, prefix: tuple, parent) -> None:
        if block in self.cached or (parent is not None and parent not in self.cached):
            return
        if any(p == prefix for p, _ in self.cached.values()):
            return
        self.cached[block] = (prefix, parent)
