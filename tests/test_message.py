"""The tensor-parallel step message (runtime/message.py): decode(encode(step)) gives back every
array (dtype, shape, values) and int of the host inputs and the feed, for any sizes, empty
arrays included."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from functional_llm.runtime.runner import Feed
from functional_llm.runtime.message import HEADER_LEN, STEP, decode, encode
from functional_llm.runtime.staging import HostInputs


@st.composite
def steps(draw):
    T, B, Bs, M = (draw(st.integers(0, 9)) for _ in range(4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def ints(shape, dtype):
        return rng.integers(-2**31, 2**31, size=shape).astype(dtype)

    host = HostInputs(ids=ints(T, np.int64), positions=ints(T, np.int64), slots=ints(T, np.int64),
                      cu_q=ints(B + 1, np.int32), seq_lens=ints(B, np.int32),
                      tables=ints((B, M), np.int32), sample_rows=ints(Bs, np.int64),
                      floats=rng.standard_normal((3, Bs)).astype(np.float32),
                      ints=ints((3, Bs), np.int64), max_q=draw(st.integers(0, 2**40)),
                      banned=ints((Bs, 8), np.int64), logprobs_k=draw(st.integers(-1, 20)),
                      prompt_k=draw(st.integers(-1, 20)), prompt_rows=ints(T, np.int64),
                      prompt_ids=ints(T, np.int64))
    feed = None
    if draw(st.booleans()):
        F = draw(st.integers(0, 5))
        feed = Feed(ints(F, np.int64), None, ints(F, np.int64))
    return host, feed


@settings(max_examples=200, deadline=None)
@given(steps())
def test_decode_inverts_encode(step):
    host, feed = step
    header, payload = encode(host, feed)
    assert header.shape == (HEADER_LEN,) and header[0] == STEP and payload.dtype == np.uint8
    # what a worker receives: fresh copies of the two buffers
    back, dst, index = decode(header.copy(), payload.copy())
    for name in ("ids", "positions", "slots", "cu_q", "seq_lens", "tables", "sample_rows",
                 "floats", "ints", "banned", "prompt_rows", "prompt_ids"):
        want, got = getattr(host, name), getattr(back, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert (back.max_q, back.logprobs_k, back.prompt_k) == (host.max_q, host.logprobs_k, host.prompt_k)
    if feed is None:
        assert dst is None and index is None
    else:
        np.testing.assert_array_equal(dst, feed.dst)
        np.testing.assert_array_equal(index, feed.index)
