"""The OpenAI-compatible server, through the official `openai` client (and raw httpx where the
client would hide the status): a real uvicorn server on 127.0.0.1 in a background thread,
over a tiny random model with a character tokenizer. Outputs equal offline LLM.generate;
disconnects free everything; every error status is produced and checked."""
import asyncio
import contextlib
import functools
import json
import os
import signal
import random
import re
import socket
import threading
import time

import attrs
import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from functional_llm import LLM, AsyncLLM, SamplingParams  # noqa: E402
from functional_llm.serve.app import ServeConfig, build_app  # noqa: E402
from functional_llm.serve.engine_process import EngineProcess  # noqa: E402
from tests.test_async_llm import slow_steps  # noqa: E402
from tests.tiny_models import add_char_tokenizer, make_tiny_model  # noqa: E402

SMALL = dict(block_size=4, num_kv_blocks=1024)
NAME = "tiny"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(add_char_tokenizer(make_tiny_model("qwen3", tmp_path_factory.mktemp("q3"), seed=1)))


@pytest.fixture(scope="module")
def offline(model):
    return LLM(model, **SMALL)


class Served:
    """A running server: its base url, engine, app, and an openai client (api_key: the key)."""

    def __init__(self, url, engine, app, api_key):
        self.url, self.engine, self.app = url, engine, app
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0)

    def post(self, path, body=None, **kwargs):
        return httpx.post(self.url + path, json=body, **{"timeout": 30, **kwargs})

    def metrics(self) -> dict:
        """The /metrics samples, by name (labels included)."""
        text = httpx.get(self.url + "/metrics").text
        return {m.group(1): float(m.group(2))
                for m in re.finditer(r"^(functional_llm:\S+) (\S+)$", text, re.M)}

    def wait_idle(self, timeout=5.0) -> dict:
        """/metrics once nothing runs, waits or holds a block (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["functional_llm:num_requests_running"], m["functional_llm:num_requests_waiting"],
                    m["functional_llm:kv_cache_usage_perc"]) == (0, 0, 0)
            if idle or time.monotonic() > deadline:
                assert idle, m
                return m
            time.sleep(0.01)

    def on_loop(self, fn):
        self.app.state.loop.call_soon_threadsafe(fn)


def slow_child_steps(seconds, llm):
    """EngineProcess's child_setup (in the child): each step takes at least `seconds`."""
    real = llm.step

    def step():
        time.sleep(seconds)
        return real()
    llm.step = step


def failing_child_steps(after, llm):
    """EngineProcess's child_setup (in the child): steps after the first `after` raise."""
    real, calls = llm.step, []

    def step():
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("injected device failure")
        return real()
    llm.step = step


MODES = ["thread", "process"]   # AsyncLLM in the server's process, or EngineProcess (the CLI's default)


@contextlib.contextmanager
def serving(model, api_key=None, max_waiting=None, step_delay=0.0, mode="thread", child_setup=None, **config):
    if mode == "process":
        if step_delay:
            child_setup = functools.partial(slow_child_steps, step_delay)
        engine = EngineProcess(model, max_waiting=max_waiting, child_setup=child_setup, **SMALL)
    else:
        engine = AsyncLLM(model, max_waiting=max_waiting, **SMALL)
        if step_delay:
            slow_steps(engine, step_delay)
    app = build_app(engine, AutoTokenizer.from_pretrained(model),
                    ServeConfig(model_name=NAME, api_key=api_key, **config))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.005)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, app, api_key)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()


@pytest.fixture(scope="module", params=MODES)
def served(model, request):
    with serving(model, mode=request.param) as s:
        yield s


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


# -- outputs ------------------------------------------------------------------------------------
def test_completions_equal_offline_generate(served, offline):
    prompts = ["Hello there", "The cat sat", [5, 6, 7, 8]]
    for prompt in prompts:
        want = offline.generate(prompt, greedy(12), use_tqdm=False)[0]
        got = served.client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(want.prompt_token_ids),
                                                                           len(want.token_ids))
    wants = offline.generate(prompts[:2], greedy(6), use_tqdm=False)
    got = served.client.completions.create(model=NAME, prompt=prompts[:2], max_tokens=6, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [w.text for w in wants]
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in wants)


def test_chat_equals_offline_chat(served, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want = offline.chat(messages, greedy(10), use_tqdm=False)[0]
    got = served.client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    got = served.client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=10,
                                                temperature=0)
    assert got.choices[0].message.content == want.text


def test_sampling_fields_reach_the_engine(served, offline):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, min_p=0.3, seed=11, max_tokens=20,
                            min_tokens=5, ignore_eos=True)
    stop = offline.generate("Once upon", params, use_tqdm=False)[0].text[10:12]   # it will stop there
    want = offline.generate("Once upon", attrs.evolve(params, stop=[stop]), use_tqdm=False)[0]
    got = served.client.completions.create(
        model=NAME, prompt="Once upon", temperature=0.9, top_p=0.9, seed=11, max_tokens=20, stop=stop,
        extra_body=dict(top_k=20, min_p=0.3, min_tokens=5, ignore_eos=True, some_unknown_field=1))
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason == "stop"


@pytest.mark.parametrize("chat", [False, True])
def test_stream_deltas_join_to_the_whole_text(served, chat):
    if chat:
        create, kw = served.client.chat.completions.create, dict(messages=[{"role": "user", "content": "Tell"}])
    else:
        create, kw = served.client.completions.create, dict(prompt="Tell me a story")
    kw.update(model=NAME, max_tokens=25, temperature=0, stop=["q"])
    whole = create(**kw)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kw))
    content = [c for c in chunks if c.choices]
    pieces = [(c.choices[0].delta.content or "") if chat else c.choices[0].text for c in content]
    text = whole.choices[0].message.content if chat else whole.choices[0].text
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 3
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + [
        whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_each_with_its_own_seed(served, offline):
    kw = dict(model=NAME, prompt="Pick", n=3, temperature=1.0, seed=5, max_tokens=8)
    got = served.client.completions.create(**kw)
    texts = [c.text for c in sorted(got.choices, key=lambda c: c.index)]
    assert sorted(c.index for c in got.choices) == [0, 1, 2] and len(set(texts)) == 3
    want = offline.generate("Pick", SamplingParams(temperature=1.0, seed=5, max_tokens=8), use_tqdm=False)[0]
    assert texts[0] == want.text                     # choice 0 keeps the seed as given
    assert [c.text for c in sorted(served.client.completions.create(**kw).choices,
                                   key=lambda c: c.index)] == texts   # seeded: reproducible
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)   # the shared prompt counts once
    assert got.usage.completion_tokens == 24
    streamed = {}
    for chunk in served.client.completions.create(stream=True, **kw):
        streamed[chunk.choices[0].index] = streamed.get(chunk.choices[0].index, "") + chunk.choices[0].text
    assert [streamed[i] for i in range(3)] == texts


def test_logprobs_in_openai_shapes(served, offline):
    want = offline.generate("Hello", greedy(5, logprobs=2), use_tqdm=False)[0]
    got = served.client.completions.create(model=NAME, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([a[t].logprob for t, a in zip(want.token_ids, want.logprobs)])
    assert "".join(lp.tokens) == want.text and all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(5)]
    chat = served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(e.token for e in content) == chat.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob for e in content)


def test_models_tokenize_detokenize(served, offline):
    assert [m.id for m in served.client.models.list()] == [NAME]
    ids = served.post("/tokenize", {"prompt": "Hello"}).json()
    assert ids["tokens"] == offline.tokenizer.encode("Hello") and ids["count"] == len(ids["tokens"])
    assert served.post("/detokenize", {"tokens": [72, 105]}).json() == {"prompt": "Hi"}
    chat = served.post("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert bytes(chat["tokens"]).decode() == "user: Hi\nassistant: "
    assert served.post("/tokenize", {"model": "other", "prompt": "x"}).status_code == 404


# -- errors -------------------------------------------------------------------------------------
def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["param"] == param, error
    return error


def test_bad_requests_are_400_naming_the_field(served):
    base = {"model": NAME, "prompt": "Hi", "max_tokens": 3}
    for field, value in [("best_of", 2), ("presence_penalty", 0.5), ("frequency_penalty", -1),
                         ("logit_bias", {"5": 1.0}), ("echo", True), ("temperature", -1), ("top_p", 0),
                         ("max_tokens", 0), ("seed", -3), ("n", 0), ("logprobs", 21), ("top_k", -2)]:
        assert_error(served.post("/v1/completions", {**base, field: value}), 400, field)
    assert_error(served.post("/v1/completions", {**base, "prompt": "x" * 600}), 400, "prompt")  # too long
    assert_error(served.post("/v1/completions", {**base, "prompt": [999]}), 400, "prompt")
    assert_error(served.post("/v1/completions", {**base, "max_tokens": "many"}), 400, "max_tokens")
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    for field, value in [("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("response_format", {"type": "json_object"})]:
        assert_error(served.post("/v1/chat/completions", {**chat, field: value}), 400, field)
    assert served.post("/v1/chat/completions", {**chat, "response_format": {"type": "text"}}).status_code == 200
    assert_error(served.post("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}), 400,
                 "top_logprobs")
    assert served.post("/v1/completions", {**base, "max_tokens": None, "ignore_eos": True}).json()["usage"]["completion_tokens"] == 16
    for raw in [b"{not json", b"[1, 2]", b""]:
        assert_error(httpx.post(served.url + "/v1/completions", content=raw), 400)
    assert_error(served.post("/v1/completions", {**base, "model": "gpt-4"}), 404, "model")
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as bad:
        served.client.completions.create(model=NAME, prompt="Hi", max_tokens=2, best_of=3)
    assert bad.value.body["param"] == "best_of"


def test_api_key(model, monkeypatch):
    with serving(model, api_key="sesame") as s:
        assert s.client.completions.create(model=NAME, prompt="Hi", max_tokens=2, temperature=0).choices[0].text
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}]:
            assert_error(s.post("/v1/completions", {"prompt": "Hi"}, headers=headers), 401)
            assert_error(httpx.get(s.url + "/v1/models", headers=headers), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope").models.list()
        assert httpx.get(s.url + "/health").status_code == 200 and httpx.get(s.url + "/metrics").status_code == 200
    from functional_llm.serve.main import parser
    monkeypatch.setenv("FUNCTIONAL_LLM_API_KEY", "from-env")
    assert parser()[0].parse_args([]).api_key == "from-env"


def test_body_over_the_limit_is_413(model):
    with serving(model, max_body_bytes=1000) as s:
        assert_error(s.post("/v1/completions", {"prompt": "x" * 2000}), 413)
        chunked = httpx.post(s.url + "/v1/completions", timeout=10,    # no content-length: counted
                             content=iter([json.dumps({"prompt": "x" * 2000}).encode()]))
        assert_error(chunked, 413)
        assert s.post("/v1/completions", {"prompt": "x" * 100, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("mode", MODES)
def test_queue_full_is_429(model, mode):
    with serving(model, max_waiting=1, step_delay=0.05, mode=mode) as s:
        async def main():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(s.url + "/v1/completions", json={
                    "prompt": f"Hi {i}", "max_tokens": 3}) for i in range(8)))
        statuses = [r.status_code for r in asyncio.run(main())]
        assert 200 in statuses and 429 in statuses and set(statuses) == {200, 429}, statuses
        rejected = next(r for r in asyncio.run(main()) if r.status_code == 429)
        assert assert_error(rejected, 429, "max_waiting")["type"] == "rate_limit_error"
        s.wait_idle()


@pytest.mark.parametrize("mode", MODES)
def test_shutting_down_is_503_and_in_flight_streams_end_with_an_error(model, mode):
    with serving(model, step_delay=0.02, shutdown_timeout=0.3, mode=mode) as s:
        stream = s.client.completions.create(model=NAME, prompt="Hi", max_tokens=400, stream=True,
                                             extra_body={"ignore_eos": True})
        first = next(stream)
        s.on_loop(s.app.state.server.begin_shutdown)
        time.sleep(0.05)
        assert_error(s.post("/v1/completions", {"prompt": "Hi"}), 503)
        assert httpx.get(s.url + "/health").json() == {"status": "draining"}
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
        assert first.choices[0].text is not None
        s.wait_idle()


@pytest.mark.parametrize("mode", MODES)
def test_engine_failure_turns_health_unhealthy_and_fails_fast(model, mode):
    setup = functools.partial(failing_child_steps, 5) if mode == "process" else None
    with serving(model, mode=mode, child_setup=setup) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        if mode == "thread":
            failing_child_steps(5, s.engine._llm)
        stream = s.client.completions.create(model=NAME, prompt="Hi", max_tokens=50, stream=True,
                                             extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError, match="engine has stopped"):   # mid-stream: an error event
            for _ in stream:
                pass
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "injected" in health.json()["reason"]
        start = time.monotonic()
        assert_error(s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}), 503)
        assert time.monotonic() - start < 1


def test_engine_process_crash_turns_health_unhealthy_and_fails_fast(model):
    """The child killed mid-stream: the stream ends with an error event, /health turns
    unhealthy at once (no request needed to notice), new requests get 503 without waiting."""
    with serving(model, mode="process", step_delay=0.02) as s:
        stream = s.client.completions.create(model=NAME, prompt="Hi", max_tokens=400, stream=True,
                                             extra_body={"ignore_eos": True})
        next(stream)
        os.kill(s.engine._process.pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine has stopped"):
            for _ in stream:
                pass
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "exited" in health.json()["reason"]
        start = time.monotonic()
        assert_error(s.post("/v1/completions", {"prompt": "Hi"}), 503)
        assert time.monotonic() - start < 1


def test_engine_process_interface(model, offline):
    """EngineProcess directly: typed errors at construction and per request (rebuilt in this
    process, parameter kept), greedy outputs equal offline generate, abort ends a stream, a
    closed stream is aborted, shutdown fails live callers with EngineDead and ends the child."""
    from functional_llm.errors import EngineDead, InvalidConfig, InvalidPrompt
    with pytest.raises(InvalidConfig):
        EngineProcess(model, num_kv_blocks=0)
    engine = EngineProcess(model, **SMALL)
    proc = engine._process

    async def main():
        with pytest.raises(InvalidPrompt) as bad:
            await anext(engine.generate([999], greedy(3)))
        assert bad.value.parameter == "prompt"
        want = offline.generate([5, 6, 7], greedy(10), use_tqdm=False)[0]
        outs = [o async for o in engine.generate([5, 6, 7], greedy(10), "a")]
        assert [t for o in outs for t in o.delta_token_ids] == list(want.token_ids)
        assert "".join(o.delta_text for o in outs) == want.text and outs[-1].finish_reason == "length"
        assert outs[0].prompt_token_ids == (5, 6, 7) and not any(o.finished for o in outs[:-1])
        long = SamplingParams(max_tokens=400, ignore_eos=True)
        gen = engine.generate([1, 2, 3], long, "b")
        await anext(gen)
        await engine.abort("b")
        rest = [o async for o in gen]                        # what was on its way, then the end
        assert not any(o.finished for o in rest) and len(rest) < 400
        gen = engine.generate([1, 2, 3], long, "c")
        await anext(gen)
        await gen.aclose()                                   # the caller left: aborted
        # a burst: the adds of one event-loop turn go out as one command; callers that leave at
        # once are aborted after their add (an abort never overtakes it); a text prompt's ids
        # come from the engine, and every output is whole
        burst = [asyncio.ensure_future(_collect(engine.generate([1, 2, i], greedy(4), f"burst{i}")))
                 for i in range(8)]
        text = asyncio.ensure_future(_collect(engine.generate("ab", greedy(3))))
        await asyncio.sleep(0)
        for task in burst[::3]:
            task.cancel()
        done = [await t for t in burst[1::3] + burst[2::3]]
        assert all(len(outs) and sum(len(o.delta_token_ids) for o in outs) == 4 and outs[-1].finished
                   and not any(o.finished for o in outs[:-1]) for outs in done)
        want = offline.generate("ab", greedy(3), use_tqdm=False)[0]
        outs = await text
        assert outs[0].prompt_token_ids == want.prompt_token_ids and outs[-1].prompt_token_ids == want.prompt_token_ids
        assert "".join(o.delta_text for o in outs) == want.text
        await engine.abort("nothing")                        # answered once "c" and the burst are gone too
        assert engine.counters["num_running"] == 0 and engine.counters["blocks_in_use"] == 0
        batches = engine.generate_batches([1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True), "e")
        first = await anext(batches)
        time.sleep(0.5)                                      # a busy event loop: outputs pile up
        later = [b async for b in batches]
        assert len(later[0]) > 1 and sum(map(len, [first] + later)) == 30 and later[-1][-1].finished
        live = engine.generate([1, 2, 3], long, "d")
        await anext(live)
        engine.shutdown()
        with pytest.raises(EngineDead):
            async for _ in live:
                pass
        with pytest.raises(EngineDead):
            await anext(engine.generate([1, 2], greedy(2)))
    asyncio.run(main())
    assert not proc.is_alive() and proc.exitcode == 0 and engine.dead_reason == "the engine was shut down"
    engine.shutdown()                                        # idempotent


async def _collect(gen) -> list:
    return [o async for o in gen]


def test_outputs_queued_together_make_one_chunk():
    """A stream folds a choice's queued outputs into one chunk: text and logprobs joined, the
    offsets running on, finish_reason the last output's."""
    from types import SimpleNamespace

    from functional_llm.outputs import Logprob
    from functional_llm.serve.respond import _by_choice, _Choice, _choice_body, _take

    def out(tid, text, finish=None):
        return SimpleNamespace(delta_text=text, delta_token_ids=(tid,), finish_reason=finish,
                               delta_logprobs=({tid: Logprob(-0.5, 1, text)},))
    a, b = _Choice(0, [1], None), _Choice(1, [1], None)
    batch = [(a, out(5, "He")), (b, out(6, "x")), (a, out(7, "llo")), (a, out(8, "!", "stop"))]
    pieces = {c.index: _take(c, outs, 1) for c, outs in _by_choice(batch).items()}
    body = _choice_body(a, 1, False, piece=pieces[0])
    assert (body["text"], body["finish_reason"]) == ("Hello!", "stop")
    assert body["logprobs"]["tokens"] == ["He", "llo", "!"] and body["logprobs"]["text_offset"] == [0, 2, 5]
    assert _choice_body(b, None, True, piece=pieces[1]) == {"index": 1, "logprobs": None, "finish_reason": None,
                                                           "delta": {"content": "x"}}
    more = _take(b, [out(9, "y", "length")], None)
    assert (more["text"], more["offset"], b.text, b.finish_reason) == ("y", 1, "xy", "length")


# -- disconnects, metrics ---------------------------------------------------------------------
def test_concurrent_streams_with_a_third_disconnecting(served, offline):
    prompts = [f"Story {i}:" for i in range(8)]
    wants = {p: o.text for p, o in zip(prompts, offline.generate(prompts, greedy(30), use_tqdm=False))}
    rng = random.Random(0)
    quitters = set(rng.sample(range(64), 21))

    async def client(i, http):
        prompt, pieces, finishes = prompts[i % len(prompts)], [], []
        body = {"model": NAME, "prompt": prompt, "max_tokens": 30, "temperature": 0, "stream": True}
        if i in quitters:   # left alone, these would run to max_model_len
            body.update(max_tokens=1000, ignore_eos=True)
        async with http.stream("POST", served.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    return prompt, "".join(pieces), finishes, True
                chunk = json.loads(line.removeprefix("data: "))
                pieces.append(chunk["choices"][0]["text"])
                finishes.append(chunk["choices"][0]["finish_reason"])
                if i in quitters and len(pieces) == 1 + i % 5:
                    return prompt, len("".join(pieces)), None, False   # leaving the block closes the connection
        raise AssertionError("the stream ended without [DONE]")

    async def main():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as http:
            return await asyncio.gather(*(client(i, http) for i in range(64)))
    before = served.metrics()["functional_llm:generation_tokens_total"]
    results = asyncio.run(main())
    done = [r for r in results if r[3]]
    assert len(done) == 43
    for prompt, text, finishes, _ in done:
        # an engine ahead of the HTTP side may coalesce a whole stream into one chunk
        assert text == wants[prompt] and finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    generated = served.wait_idle(timeout=15)["functional_llm:generation_tokens_total"] - before
    # the quitters stopped a few tokens after what they had read (a chunk may carry several
    # tokens: an engine that runs ahead of the HTTP side sends fewer, larger chunks)
    read = sum(r[1] for r in results if not r[3])   # a character per token
    assert generated - 43 * 30 < read + 21 * 20


@pytest.mark.parametrize("mode", MODES)
def test_a_disconnect_aborts_within_one_step(model, mode):
    with serving(model, step_delay=0.05, mode=mode) as s:
        steps = lambda: s.engine.counters["steps"]   # noqa: E731
        body = {"prompt": "Hi", "max_tokens": 400, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            assert s.engine.counters["num_running"] == 1
            left_at = steps()
        s.wait_idle()
        assert steps() - left_at <= 2
        with pytest.raises(httpx.ReadTimeout):    # not streamed: the client gives up mid-request
            s.post("/v1/completions", body, timeout=0.3)
        left_at = steps()
        s.wait_idle()
        assert steps() - left_at <= 2
        assert s.metrics().get('functional_llm:request_success_total{finished_reason="length"}', 0) == 0


@pytest.mark.parametrize("mode", MODES)
def test_metrics_count_what_was_served(model, mode):
    with serving(model, mode=mode) as s:
        s.client.completions.create(model=NAME, prompt="Hello", max_tokens=6, temperature=0)
        s.client.completions.create(model=NAME, prompt="Hello", max_tokens=6, temperature=0, stop=["\x00"],
                                    stream=True).close()
        s.client.completions.create(model=NAME, prompt="Hello", max_tokens=6, temperature=0)
        m = s.wait_idle()
        p = "functional_llm:"
        assert m[p + 'request_success_total{finished_reason="length"}'] == 2
        assert m[p + "prompt_tokens_total"] >= 10 and m[p + "generation_tokens_total"] >= 12
        assert m[p + "time_to_first_token_seconds_count"] >= 2 and m[p + "e2e_request_latency_seconds_count"] == 2
        assert m[p + "inter_token_latency_seconds_count"] >= 10 and m[p + "request_queue_time_seconds_count"] >= 2
        assert m[p + "prefix_cache_hits_total"] > 0 and m[p + "prefix_cache_queries_total"] >= 10
        assert m[p + "num_preemptions_total"] == 0


def test_cli_options_follow_the_llm_signature():
    import inspect

    from functional_llm.cli import main
    from functional_llm.serve.main import byte_size, parser
    ap, names = parser()
    assert names == [n for n in inspect.signature(LLM.__init__).parameters if n != "self"]
    args = ap.parse_args(["--max-body-bytes", "4MiB", "--no-enable-prefix-caching", "--max-num-seqs", "8"])
    assert (args.max_body_bytes, args.enable_prefix_caching, args.max_num_seqs) == (4 << 20, False, 8)
    assert (args.host, args.port, args.shutdown_timeout) == ("127.0.0.1", 8000, 10.0)
    assert byte_size("500kB") == 500_000 and byte_size("1048576") == 1 << 20
    assert main(["serve", "--port", "notaport"]) == 2 and main(["serve", "--help"]) == 0


@pytest.mark.parametrize("mode", MODES)
def test_cli_engine_option_errors_are_messages(model, mode, capsys):
    """A value the engine refuses (found when it is built, in the child in process mode) is a
    one-line error and exit code 2, not a traceback; no server starts."""
    from functional_llm.cli import main
    assert main(["serve", "--model", model, "--engine-mode", mode, "--kv-cache-dtype", "int4",
                 "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: kv_cache_dtype='int4'" in err and "Traceback" not in err


def test_sigterm_stops_the_cli_server_cleanly(model):
    """functional-llm serve in its own process: SIGTERM ends an in-flight stream (finished, or
    aborted with an error event after --shutdown-timeout) and the server shuts down."""
    import signal
    import subprocess
    import sys
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "functional_llm.cli", "serve", "--model", model,
                             "--port", str(port), "--block-size", "4", "--num-kv-blocks", "256",
                             "--shutdown-timeout", "0.5"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            time.sleep(0.1)
        body = {"prompt": "Hi", "max_tokens": 480, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2].removeprefix("data: "))
        assert "error" in last or last["choices"][0]["finish_reason"] == "length", last
        assert proc.wait(15) in (0, -signal.SIGTERM)   # uvicorn re-raises the signal when done
        assert b"Application shutdown complete" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
