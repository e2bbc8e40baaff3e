"""A byte-level vocabulary for testing outputs.apply without a model: token ids are bytes (as in
GPT-2-style byte-level BPE: ids 0-255 one byte each, a few longer pieces above), so a multi-byte
character can be split across tokens, and decode shows an unfinished one as U+FFFD."""
from __future__ import annotations

from types import MappingProxyType

from functional_llm.core.records import Deltas

PIECES = tuple(bytes([b]) for b in range(256)) + (
    b"ab", b"ba", "é".encode(), "€".encode(), b"\xe2\x82", "😀".encode()[:3])
AB, BA, E_ACUTE, EURO, EURO_HEAD, GRIN_HEAD = range(256, 262)


def decode(ids) -> str:
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def tokens(text: str) -> list:
    """One token per UTF-8 byte: every multi-byte character is split."""
    return list(text.encode())


def deltas(rid: str, toks, finish=None, num_cached: int = 0) -> Deltas:
    """One request's delta (several rows when several tokens)."""
    return Deltas(rids=(rid,) * len(toks), tokens=tuple(toks),
                  finished=MappingProxyType({rid: finish} if finish else {}),
                  num_cached=MappingProxyType({rid: num_cached} if toks else {}))
