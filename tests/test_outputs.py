"""outputs.apply without a model: a byte-level fake decode (properties/fake_text.py) splits
multi-byte characters across tokens; stop strings span tokens, sit at the start, are held back
while they may begin, and released at the end; aborts; generate's decode-once path."""
import immutables
import pytest

from functional_llm.core.records import Request, SamplingParams
from functional_llm.outputs import REPLACEMENT, Emitted, RequestOutput, apply, start
from properties.fake_text import EURO, GRIN_HEAD, decode, deltas, tokens


def new(rid="r", stream=True, **params):
    req = Request(rid=rid, prompt=(1, 2), params=SamplingParams(**params), seed=0)
    return immutables.Map({rid: start(req, "hi", stream)})


def feed(outputs, steps, rid="r", last="length", decode_fn=decode):
    """steps: token lists, one per step; the last one finishes with `last` (unless a stop string
    ended the request before). Returns every emitted output and the final map."""
    seen = []
    for i, toks in enumerate(steps):
        if rid not in outputs:
            break
        outputs, em = apply(outputs, deltas(rid, toks, last if i == len(steps) - 1 else None), decode_fn)
        seen += em.outputs
    return seen, outputs


def one_per_step(text):
    return [[t] for t in tokens(text)]


def test_multibyte_characters_split_across_tokens_come_out_whole():
    text = "aé€😀 b"
    outs, left = feed(new(), one_per_step(text))
    assert "".join(o.delta_text for o in outs) == text == outs[-1].text
    assert all(REPLACEMENT not in o.delta_text for o in outs)
    assert [o.delta_text for o in outs if o.delta_text] == ["a", "é", "€", "😀", " ", "b"]
    assert outs[-1].token_ids == tuple(tokens(text)) and outs[-1].finish_reason == "length"
    assert not left                                   # a finished request leaves the map
    # a character whose bytes never complete is flushed at the end as U+FFFD, like decode gives
    outs, _ = feed(new(), [[ord("a")], [GRIN_HEAD]])
    assert outs[-1].text == decode([ord("a"), GRIN_HEAD]) == "a" + REPLACEMENT


def test_stop_string_spanning_tokens_is_excluded_never_streamed_and_reported():
    steps = one_per_step("hello STOP world")
    outs, left = feed(new(stop=["STOP"]), steps)
    final = outs[-1]
    assert final.text == "hello " and final.finish_reason == "stop" and not left
    assert final.token_ids == tuple(tokens("hello STOP"))   # up to the token that completed it
    assert "".join(o.delta_text for o in outs) == "hello "
    assert all("S" not in o.delta_text for o in outs)       # held back, then cut
    _, em = apply(new(stop=["STOP"]), deltas("r", tokens("xSTOP"), None), decode)
    assert em.stops == ("r",)                             # the engine still runs it: shell ends it
    _, em = apply(new(stop=["STOP"]), deltas("r", tokens("xSTOP"), "length"), decode)
    assert em.stops == () and em.outputs[0].finish_reason == "stop"   # already ended in the engine


def test_stop_inside_one_delta_drops_the_tokens_after_it():
    _, em = apply(new(stop=["b"]), deltas("r", tokens("aabcc"), None), decode)
    out = em.outputs[0]
    assert (out.text, out.token_ids, out.delta_token_ids) == ("aa", tuple(tokens("aab")), tuple(tokens("aab")))


def test_stop_at_the_start_and_the_earliest_of_several():
    outs, _ = feed(new(stop=["ab"]), [[ord("a")], [ord("b")], [ord("c")]])
    assert outs[-1].text == "" and outs[-1].finish_reason == "stop" and len(outs[-1].token_ids) == 2
    outs, _ = feed(new(stop=["cd", "bcd", "€"]), one_per_step("abcd€"))
    assert outs[-1].text == "a"
    outs, _ = feed(new(stop=["€x", "€"]), [[ord("a")], [EURO]])   # a multi-byte stop string
    assert outs[-1].text == "a" and outs[-1].finish_reason == "stop"


def test_held_back_text_is_released_when_the_request_ends_without_the_stop():
    outs, _ = feed(new(stop=["abc"]), one_per_step("xyzab"))
    assert [o.delta_text for o in outs] == ["x", "y", "z", "", "ab"]
    assert outs[-1].text == "xyzab" and outs[-1].finish_reason == "length"
    outs, _ = feed(new(stop=["aab"]), one_per_step("aaab"))   # overlapping candidates
    assert outs[-1].text == "a" and outs[-1].finish_reason == "stop"


def test_abort_after_k_tokens_gives_those_tokens_output():
    outputs = new(stop=["zz"])
    for t in tokens("hi é z"):
        outputs, _ = apply(outputs, deltas("r", [t]), decode)
    outputs, em = apply(outputs, deltas("r", [], "abort"), decode)
    (out,) = em.outputs
    assert (out.text, out.finish_reason, out.delta_text) == ("hi é z", "abort", "z")
    assert out.token_ids == tuple(tokens("hi é z")) and out.delta_token_ids == () and not outputs


def test_generate_path_decodes_once_and_emits_only_the_final_output():
    calls = []

    def counting(ids):
        calls.append(len(ids))
        return decode(ids)

    outs, _ = feed(new(stream=False), one_per_step("aé€b"), decode_fn=counting)
    assert len(outs) == 1 and calls == [len(tokens("aé€b"))]
    (out,) = outs
    assert out.text == out.delta_text == "aé€b" and out.delta_token_ids == out.token_ids
    outs, _ = feed(new(stream=False, stop=["€"]), one_per_step("aé€b"))  # stops: text per step
    assert len(outs) == 1 and outs[0].text == "aé" and outs[0].delta_text == "aé"


def test_several_requests_num_cached_and_outputs_equality():
    outputs = new("a").set("b", new("b")["b"])
    d = deltas("a", [ord("x")], None, num_cached=16)
    d2 = deltas("b", [ord("y")], "length", num_cached=0)
    both = type(d)(rids=d.rids + d2.rids, tokens=d.tokens + d2.tokens,
                   finished=d2.finished, num_cached={**d.num_cached, **d2.num_cached})
    outputs, em = apply(outputs, both, decode)
    assert isinstance(em, Emitted) and [o.request_id for o in em.outputs] == ["a", "b"]
    assert em.outputs[0].num_cached_tokens == 16 and list(outputs) == ["a"]
    assert em.outputs[1].finished and not em.outputs[0].finished
    same = RequestOutput(request_id="b", prompt="hi", prompt_token_ids=(1, 2), finish_reason="length",
                         num_cached_tokens=0, delta_text="y", delta_token_ids=(ord("y"),),
                         token_ids=(ord("y"),), text_parts=("y",))
    assert em.outputs[1] == same and "text='y'" in repr(same)
    with pytest.raises(KeyError):
        apply(outputs, deltas("gone", [1]), decode)
