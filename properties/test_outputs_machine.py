"""outputs.apply as properties (I18-I20), with the byte-level fake decode of
properties/fake_text.py: token lists that split multi-byte characters (and hold invalid bytes),
stop strings that occur, and every way of cutting the tokens into deltas."""
from __future__ import annotations

import immutables
from hypothesis import given, settings
from hypothesis import strategies as st

from functional_llm.core.records import Request, SamplingParams
from functional_llm.outputs import apply, start
from properties.fake_text import AB, BA, E_ACUTE, EURO, EURO_HEAD, GRIN_HEAD, decode, deltas
from properties.profiles import budget

TOKENS = st.sampled_from([ord(c) for c in "abc "] + [0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF]
                         + [AB, BA, E_ACUTE, EURO, EURO_HEAD, GRIN_HEAD])
STOPS = st.lists(st.sampled_from(["ab", "b", "ca", "é", "a€", "€c", "bab", "c a", "abcab"]),
                 max_size=3, unique=True)


@st.composite
def runs(draw):
    """(tokens, stop strings, stream?, cut points)."""
    toks = draw(st.lists(TOKENS, min_size=1, max_size=24))
    cuts = sorted(draw(st.sets(st.integers(1, len(toks) - 1), max_size=len(toks) - 1))) if len(toks) > 1 else []
    return toks, tuple(draw(STOPS)), draw(st.booleans()), cuts


def run(toks, stops, stream, cuts, finish="length", apart=False):
    """Feed toks in the deltas the cuts make, the last with `finish` (apart: in a delta of its
    own, as the shell's aborts come); stop when the request ends. -> every output, in order."""
    req = Request(rid="r", prompt=(1,), params=SamplingParams(stop=stops, max_tokens=64), seed=0)
    outputs, seen = immutables.Map(r=start(req, None, stream)), []
    bounds = [0, *cuts, len(toks)]
    steps = [(toks[lo:hi], None if apart or hi < len(toks) else finish) for lo, hi in zip(bounds, bounds[1:])]
    for toks_i, why in steps + ([([], finish)] if apart else []):
        outputs, em = apply(outputs, deltas("r", toks_i, why), decode)
        seen += em.outputs
        if "r" not in outputs:
            break
    assert "r" not in outputs and seen[-1].finished, "the request did not end"
    return seen


def final(outs):
    return outs[-1].text, outs[-1].token_ids, outs[-1].finish_reason


@settings(max_examples=budget(300))
@given(runs())
def test_I18_any_split_into_deltas_gives_the_one_delta_output(case):
    toks, stops, stream, cuts = case
    assert final(run(toks, stops, stream, cuts)) == final(run(toks, stops, stream, [])), \
        "I18: the output depends on how the tokens were cut into deltas"


@settings(max_examples=budget(200))
@given(runs(), st.data())
def test_I18_abort_after_k_tokens_gives_the_output_of_those_k(case, data):
    toks, stops, stream, cuts = case
    k = data.draw(st.integers(1, len(toks)))
    aborted = run(toks[:k], stops, stream, [c for c in cuts if c < k], finish="abort", apart=True)
    ended = final(run(toks[:k], stops, stream, [], finish="length"))
    assert final(aborted) == (*ended[:2], "stop" if ended[2] == "stop" else "abort"), \
        "I18: an abort after k tokens does not give the output of those k tokens"


@settings(max_examples=budget(300))
@given(runs())
def test_I19_streamed_deltas_join_to_the_final_output_and_never_show_a_stop(case):
    toks, stops, _, cuts = case
    outs = run(toks, stops, True, cuts)
    text, ids, _ = final(outs)
    assert "".join(o.delta_text for o in outs) == text, "I19: joined delta_text != final text"
    assert tuple(t for o in outs for t in o.delta_token_ids) == ids, "I19: joined delta_token_ids != token_ids"
    shown = ""
    for o in outs:
        shown += o.delta_text
        assert o.text == shown, "I19: text is not the join of the deltas so far"
        assert not any(s in shown for s in stops), "I19: a stop string was streamed"


@settings(max_examples=budget(300))
@given(runs())
def test_I20_text_is_the_decode_of_the_tokens_cut_before_the_first_stop(case):
    toks, stops, stream, cuts = case
    text, ids, why = final(run(toks, stops, stream, cuts))
    full = decode(list(ids))
    hits = [i for i in (full.find(s) for s in stops) if i >= 0]
    if why == "length":
        assert ids == tuple(toks) and text == full and not hits, \
            "I20: without a stop string the text is not the decode of all the tokens"
    else:
        assert why == "stop" and hits and text == full[:min(hits)], \
            "I20: the text does not end right before the earliest stop string"
        before = decode(list(ids[:-1]))
        assert not any(s in before.rstrip("\ufffd") for s in stops), \
            "I20: the request went on past a token that completed a stop string"
