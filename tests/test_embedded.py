"""The embedded default model through the public API: chat, stop strings, min_tokens, the CLI."""
import pytest

from functional_llm import LLM, SamplingParams
from functional_llm.errors import InvalidSamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=256)   # model=None: the embedded SmolLM2-135M-Instruct


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answers_correctly(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.model_config.eos_token_ids   # ended on EOS


def test_stop_string_excluded_and_request_finished(llm):
    full = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].text
    assert " is " in full
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32, stop=[" is "]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == full[:full.index(" is ")]
    assert len(out.token_ids) < len(llm.tokenizer.encode(full)) + 1
    assert llm.counters["blocks_in_use"] == 0


def test_min_tokens_keeps_generating_past_eos(llm):
    """Until min_tokens, EOS is masked from sampling (as in vLLM): the greedy answer runs as
    before up to where it would have ended, then goes on without an EOS inside."""
    base = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    n = len(base.token_ids)
    eos = set(llm.model_config.eos_token_ids)
    assert base.finish_reason == "stop" and base.token_ids[-1] in eos
    longer = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=n + 8, min_tokens=n + 4),
                      use_tqdm=False)[0]
    assert len(longer.token_ids) >= n + 4
    assert list(longer.token_ids[:n - 1]) == list(base.token_ids[:-1])
    assert not eos & set(longer.token_ids[:n + 4])


def test_max_model_len_ends_with_length(llm):
    prompt = llm.tokenizer.encode("Count: one two three four five six")
    small = LLM(max_model_len=len(prompt) + 5)
    out = small.generate(prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                         use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_string_and_batch_prompts_share_the_cache(llm):
    system = "You are a terse assistant. Answer in one word. " * 4
    prompts = [system + q for q in ("Capital of Italy?", "Capital of Spain?", "Capital of Japan?")]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [8, 8, 8]
    again = llm.generate(prompts[0], sp, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.token_ids == outs[0].token_ids
    with pytest.raises(InvalidSamplingParams):
        llm.generate(prompts, SamplingParams(stop=[""]), use_tqdm=False)


def test_cli_prints_the_answer(capsys):
    from functional_llm.cli import main
    assert main(["generate", "What is the capital of France?", "--max-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert main(["generate", "hi", "--model", "/nonexistent/folder"]) == 2
    assert "model" in capsys.readouterr().err


def _streamed(llm, prompts, params):
    """Run llm.stream: per prompt, the final output and the joined delta_text / delta_token_ids."""
    final, text, ids = {}, {}, {}
    for out in llm.stream(prompts, params):
        text[out.prompt] = text.get(out.prompt, "") + out.delta_text
        ids[out.prompt] = ids.get(out.prompt, ()) + out.delta_token_ids
        assert out.text == text[out.prompt] and out.token_ids == ids[out.prompt]
        if out.finished:
            final[out.prompt] = out
    return [final[p] for p in prompts], [text[p] for p in prompts]


def test_stream_equals_generate_greedy_and_seeded(llm):
    prompts = ["Écris trois mots français avec des accents :", "Write 'café' in Japanese katakana:",
               "List three emoji:"]      # multi-byte characters, split across byte-level tokens
    for params in (SamplingParams(temperature=0, max_tokens=24),
                   SamplingParams(temperature=0.9, seed=7, max_tokens=24)):
        want = llm.generate(prompts, params, use_tqdm=False)
        got, joined = _streamed(llm, prompts, params)
        assert [o.token_ids for o in got] == [w.token_ids for w in want]
        assert joined == [o.text for o in got] == [w.text for w in want]
        assert [o.finish_reason for o in got] == [w.finish_reason for w in want]
    assert any(ord(c) > 127 for w in want for c in w.text)   # the prompts did make them
    assert llm.counters["blocks_in_use"] == 0


def test_stream_holds_back_and_excludes_stop_strings(llm):
    params = SamplingParams(temperature=0, max_tokens=32, stop=[" is "])
    prompt = llm.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    want = llm.generate(prompt, params, use_tqdm=False)[0]
    (got,), (joined,) = _streamed(llm, [prompt], params)
    assert got.finish_reason == want.finish_reason == "stop" and " is" not in joined
    assert joined == got.text == want.text and got.token_ids == want.token_ids
    assert llm.counters["blocks_in_use"] == 0
