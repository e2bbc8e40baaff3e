"""Chain hashing (I13): block j's chain hash is equal for two token lists exactly when their
first j+1 blocks are equal, and it is the same number in every process. (Weak hashes, where
the "only if" fails on purpose, are exercised by the machines' weak-hash variants: I4.)"""
from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from functional_llm.core.blocks import chain_hash
from properties.profiles import budget


def chain_hashes(tokens, block_size, hash_fn=chain_hash) -> list:
    out, h = [], None
    for j in range(len(tokens) // block_size):
        h = hash_fn(h, tuple(tokens[j * block_size:(j + 1) * block_size]))
        out.append(h)
    return out


token_ids = st.one_of(st.integers(0, 3), st.integers(0, 2**31 - 1))  # collisions, then real ids


@st.composite
def two_token_lists(draw):
    """Two lists that often share a prefix: b is a's head, then its own tail."""
    a = draw(st.lists(token_ids, max_size=20))
    cut = draw(st.integers(0, len(a)))
    return a, a[:cut] + draw(st.lists(token_ids, max_size=12))


@settings(max_examples=budget(300))
@given(lists=two_token_lists(), block_size=st.integers(1, 4))
def test_I13_equal_prefixes_iff_equal_chain_hashes(lists, block_size):
    a, b = lists
    ha, hb = chain_hashes(a, block_size), chain_hashes(b, block_size)
    for j in range(min(len(ha), len(hb))):
        same_prefix = a[:(j + 1) * block_size] == b[:(j + 1) * block_size]
        # "only if" covers equal blocks under different parents: they must hash apart
        assert (ha[j] == hb[j]) == same_prefix, f"I13: block {j}"
    assert all(0 <= h < 2**64 for h in ha + hb)


def test_I13_chain_hash_stable_across_processes():
    tokens = list(range(1, 40)) + [2**31 - 1, 0, 7]
    here = chain_hashes(tokens, 3)
    code = ("from functional_llm.core.blocks import chain_hash\n"
            "h, out = None, []\n"
            f"for j in range({len(tokens) // 3}):\n"
            f"    h = chain_hash(h, tuple({tokens}[j * 3:(j + 1) * 3])); out.append(h)\n"
            "print(out)")
    for seed in ("0", "12345"):   # Python's own hash() would change with PYTHONHASHSEED
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout
        assert out.strip() == str(here), "I13: chain hash differs in another process"
