"""An abort in the middle of a chunked prefill frees every block: a direct engine test (the
random machines in properties/ cover it only by chance)."""
import pytest

from functional_llm import LLM, SamplingParams
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("abort"), seed=1)


@pytest.mark.parametrize("pipeline", [False, True])
def test_abort_mid_chunked_prefill_frees_every_block(qwen3, pipeline):
    llm = LLM(str(qwen3), block_size=4, num_kv_blocks=6, max_num_batched_tokens=6,
              async_scheduling=pipeline)
    shared = list(range(10, 30))
    rid = llm.add_request(shared, SamplingParams(max_tokens=4))
    llm.step()                               # the first 6 of 20 prompt tokens: one chunk
    counters = llm.counters
    assert counters["chunked_prefills"] == 1 and counters["prefill_tokens"] == 6
    assert counters["blocks_in_use"] == 2    # ceil(6 / 4) blocks hold the chunk's KV
    llm.abort(rid)
    assert llm.counters["blocks_in_use"] == 0
    while llm.has_unfinished_requests():     # pipelined: the chunk's step still in flight
        assert llm.step() == []
    assert llm.counters["blocks_in_use"] == 0 and not llm.engine.state.seqs
    # the pool is whole: a request needing all 6 blocks runs, and the aborted chunk's one full
    # computed block may serve it from the prefix cache
    out = llm.generate(shared, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 4 and out.num_cached_tokens in (0, 4)
    assert llm.counters["blocks_in_use"] == 0
