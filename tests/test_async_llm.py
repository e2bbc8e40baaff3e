"""AsyncLLM on a tiny random model: concurrent callers batched together, cancellation, typed
errors in one caller only, QueueFull, engine failure and shutdown reaching every caller.
Each test runs under asyncio.wait_for, so a hang fails instead of blocking the suite."""
import asyncio
import contextlib
import random
import time

import attrs
import pytest

from functional_llm import LLM, AsyncLLM, SamplingParams
from functional_llm.errors import EngineDead, InvalidPrompt, InvalidSamplingParams, QueueFull
from tests.tiny_models import add_char_tokenizer, make_tiny_model

TIMEOUT_S = 30
SMALL = dict(block_size=4, num_kv_blocks=1024)   # the default CPU pool (2 GiB) takes seconds to build


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = make_tiny_model("qwen3", tmp_path_factory.mktemp("q3"), seed=1)
    return str(add_char_tokenizer(folder))   # text, so streamed text and stop strings are checked


@pytest.fixture(scope="module")
def reference(qwen3):
    return LLM(qwen3, **SMALL)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def slow_steps(engine, seconds):
    """Make each step take at least `seconds`, so 'within one step' is measurable."""
    real = engine._llm.step

    def step():
        time.sleep(seconds)
        return real()
    engine._llm.step = step


async def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def assert_in_order(outs):
    """Each output adds one token (a step samples one per request) to the cumulative token_ids,
    its deltas are exactly what is new (joined, the text so far), only the last is finished."""
    seen, text = (), ""
    for out in outs:
        assert out.token_ids[:len(seen)] == seen
        assert len(out.token_ids) == len(seen) + 1 or (out.finished and out.token_ids == seen)
        if hasattr(out, "delta_token_ids"):
            assert tuple(out.delta_token_ids) == out.token_ids[len(seen):]
            text += out.delta_text
        seen = out.token_ids
    assert not any(out.finished for out in outs[:-1])
    if outs and outs[-1].finished and hasattr(outs[-1], "delta_text"):
        assert text == outs[-1].text


LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


def test_64_concurrent_callers_with_cancellations_match_generate(qwen3, reference):
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 250) for _ in range(rng.randint(3, 12))] for _ in range(64)]
    modes = [rng.choice(["full", "full", "break", "cancel"]) for _ in range(64)]
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=rng.randint(6, 20),
                             ignore_eos=i % 3 == 0,
                             stop=list("aeiou") if i % 4 == 0 and modes[i] == "full" else None)
              for i in range(64)]
    want = reference.generate(prompts, params, use_tqdm=False)
    assert any(w.finish_reason == "stop" and params[i].stop for i, w in enumerate(want))
    # streams stopped early ask for many tokens, so only their abort can free their blocks; a
    # request's tokens depend on (prompt, seed, position), not on max_tokens
    asked = [p if m == "full" else attrs.evolve(p, max_tokens=400, ignore_eos=True)
             for p, m in zip(params, modes)]
    got = [[] for _ in range(64)]

    async def consume(engine, i, stop_after):
        async with contextlib.aclosing(engine.generate(prompts[i], asked[i])) as stream:
            async for out in stream:
                got[i].append(out)
                if len(got[i]) == stop_after:
                    break

    async def main():
        async with AsyncLLM(qwen3, **SMALL) as engine:
            tasks = [asyncio.create_task(consume(engine, i, rng.randint(1, 5) if m == "break" else None))
                     for i, m in enumerate(modes)]
            for i in rng.sample([i for i, m in enumerate(modes) if m == "cancel"], k=modes.count("cancel")):
                await asyncio.sleep(rng.uniform(0, 0.01))
                tasks[i].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await engine.abort("no-such-request")   # a barrier: every close before it is applied
            return engine.counters

    counters = run(main())
    assert counters["blocks_in_use"] == 0
    complete = 0
    for outs, w, mode in zip(got, want, modes):
        assert_in_order(outs)
        if outs and outs[-1].finished:
            complete += 1
            assert outs[-1].token_ids == w.token_ids and outs[-1].finish_reason == w.finish_reason
            assert outs[-1].text == w.text
        else:
            assert mode != "full"
            tokens = outs[-1].token_ids if outs else ()
            assert tokens[:len(w.token_ids)] == w.token_ids[:len(tokens)]
    assert complete == modes.count("full") and modes.count("cancel") > 5 and modes.count("break") > 5
    # batched: far fewer steps than tokens made
    assert counters["steps"] < sum(len(outs[-1].token_ids) for outs in got if outs) / 4


def test_bad_request_fails_only_its_caller(qwen3, reference):
    good = [[5, 6, 7], [9, 10, 11, 12]]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = reference.generate(good, sp, use_tqdm=False)

    async def collect(engine, prompt, params):
        return [out async for out in engine.generate(prompt, params)]

    async def main():
        async with AsyncLLM(qwen3, **SMALL) as engine:
            results = await asyncio.gather(
                collect(engine, good[0], sp), collect(engine, [], sp),
                collect(engine, [999], sp), collect(engine, good[1], {"temperature": 0}),
                collect(engine, good[1], sp), return_exceptions=True)
            after = await collect(engine, good[0], sp)   # the loop goes on
            return results, after, engine.counters

    (ok0, empty, vocab, as_dict, ok1), after, counters = run(main())
    assert isinstance(empty, InvalidPrompt) and empty.parameter == "prompt"
    assert isinstance(vocab, InvalidPrompt) and vocab.value == [999]
    assert isinstance(as_dict, InvalidSamplingParams) and as_dict.parameter == "sampling_params"
    assert ok0[-1].token_ids == want[0].token_ids and ok1[-1].token_ids == want[1].token_ids
    assert after[-1].token_ids == want[0].token_ids and counters["blocks_in_use"] == 0


@pytest.mark.parametrize("how", ["cancel", "aclose", "break", "abort"])
def test_cancel_frees_blocks_within_one_step(qwen3, how):
    async def main():
        async with AsyncLLM(qwen3, **SMALL) as engine:
            slow_steps(engine, 0.02)
            stream = engine.generate([3, 4, 5, 6, 7], LONG)
            seen = []

            async def consume():
                async for out in stream:
                    seen.append(out)
                    if how == "break" and len(seen) == 3:
                        break   # the generator is closed when collected, at once here

            task = asyncio.create_task(consume())
            await wait_until(lambda: len(seen) >= 3)
            assert engine.counters["blocks_in_use"] > 0
            steps = engine.counters["steps"]
            if how == "break":
                await task
                del stream
            elif how == "cancel":
                task.cancel()
            elif how == "aclose":
                task.cancel()   # stop the consumer first: aclose of a running generator raises
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await stream.aclose()
            else:
                await engine.abort(seen[0].request_id)
                assert engine.counters["blocks_in_use"] == 0   # done when abort returns
                await task                                     # its stream simply ended
            await wait_until(lambda: engine.counters["blocks_in_use"] == 0)
            assert engine.counters["steps"] <= steps + 1
            return len(seen)

    assert run(main()) < 300


def test_engine_failure_reaches_every_caller(qwen3):
    async def main():
        async with AsyncLLM(qwen3, **SMALL) as engine:
            real, calls = engine._llm.step, []

            def failing_step():
                calls.append(1)
                if len(calls) > 3:
                    raise RuntimeError("injected device failure")
                return real()
            engine._llm.step = failing_step
            results = await asyncio.gather(*(_drain(engine, [i + 2, 5, 6]) for i in range(8)),
                                           return_exceptions=True)
            with pytest.raises(EngineDead):   # later calls fail fast
                await engine.generate([1, 2, 3], LONG).__anext__()
            await engine.abort("anything")    # nothing to abort: returns
            return results

    results = run(main())
    assert all(isinstance(r, EngineDead) for r in results), results
    assert all(isinstance(r.__cause__, RuntimeError) and "injected" in str(r.__cause__) for r in results)


async def _drain(engine, prompt):
    return [out async for out in engine.generate(prompt, LONG)]


def test_queue_full_when_max_waiting_requests_wait(qwen3):
    async def main():
        async with AsyncLLM(qwen3, **SMALL, max_num_seqs=1, max_waiting=1) as engine:
            running = engine.generate([5, 6, 7], LONG)
            first = await running.__anext__()           # A runs; the only running slot
            waiting = asyncio.create_task(engine.generate([8, 9], SamplingParams(max_tokens=4)).__anext__())
            await asyncio.sleep(0)                      # B's task submits its request now
            with pytest.raises(QueueFull) as full:      # B (queued first) waits: C is refused
                await engine.generate([10, 11], SamplingParams(max_tokens=4)).__anext__()
            assert not waiting.done()
            await engine.abort(first.request_id)        # A ends: B starts
            assert (await waiting).token_ids
            later = [out async for out in engine.generate([12, 13], SamplingParams(max_tokens=4))]
            return full.value, later

    err, later = run(main())
    assert err.parameter == "max_waiting" and err.value == 1 and later[-1].finished
    with pytest.raises(Exception) as bad:
        AsyncLLM(max_waiting=0)   # checked before any model is loaded
    assert getattr(bad.value, "parameter", None) == "max_waiting"


def test_shutdown_with_requests_in_flight_ends_them(qwen3):
    async def main():
        engine = AsyncLLM(qwen3, **SMALL)
        slow_steps(engine, 0.005)
        seen = [[] for _ in range(4)]

        async def consume(i):
            async for out in engine.generate([i + 3, 4, 5], LONG):
                seen[i].append(out)
        tasks = [asyncio.create_task(consume(i)) for i in range(4)]
        await wait_until(lambda: all(seen))
        engine.shutdown()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(EngineDead):
            await engine.generate([1, 2], LONG).__anext__()
        engine.shutdown()   # idempotent
        return results, engine.counters

    results, counters = run(main())
    assert all(isinstance(r, EngineDead) for r in results), results
    assert counters["blocks_in_use"] == 0


def test_idle_loop_blocks_instead_of_spinning(qwen3):
    async def main():
        async with AsyncLLM(qwen3, **SMALL) as engine:
            real, looks = engine._llm.has_unfinished_requests, []

            def counted():   # the loop asks once per turn: a spinning loop asks thousands of times
                looks.append(1)
                return real()
            engine._llm.has_unfinished_requests = counted
            outs = [out async for out in engine.generate([5, 6], SamplingParams(max_tokens=4))]
            await asyncio.sleep(0.05)
            steps, before = engine.counters["steps"], len(looks)
            await asyncio.sleep(0.5)
            return outs, engine.counters["steps"] - steps, len(looks) - before

    outs, steps, looks = run(main())
    assert outs[-1].finished and steps == 0 and looks <= 2
