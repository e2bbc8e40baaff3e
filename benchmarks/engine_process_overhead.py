"""The engine process's own cost, apart from the model: CPU per step outside llm.step(), and
the time to admit a burst of requests.

The server's engine process (functional_llm/serve/engine_process.py) does, besides llm.step():
drain the command pipe, admit adds, build the per-step message, pickle it and send it (from a
sender thread sharing the child's GIL with the loop). On a GPU that host work sits on the
critical path once it no longer hides behind the device step. Here a real EngineProcess runs
over a fake LLM (child_setup) whose step costs almost nothing and gives every live request one
token (" w7", id 7): what remains is the engine process's overhead. The parent consumes every
stream with generate_batches on one event loop, as the server's single-choice path does.

Per round (all requests sent at once, each --max-tokens tokens) it reports:
  child_us_per_step    the child's CPU (all threads) per step, minus the fake step's own CPU
  parent_us_per_step   the server-side process's CPU per step (reader thread + event loop)
  admit_ms             wall time from the first generate call until every request has had
                       its first output (admission of the burst plus one instant step)
  child_admit_us_per_req  the child's CPU from the first add until every request is admitted
                       (outside the fake step, per request)
and the median over rounds. This machine's noise: run it a few times.
    python benchmarks/engine_process_overhead.py --requests 256 --max-tokens 128 --rounds 7
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import one_token_each  # noqa: E402  (the fake step's outputs)


def fake_llm(shared, step_ms, burst, llm):
    """child_setup: llm's add/abort/step replaced by a fake whose step sleeps step_ms (a device
    step: the GIL is free meanwhile) and gives every live request a token. `shared` (doubles)
    accumulates [the fake step's CPU, steps, the process's CPU from a burst's first add to its
    last, bursts admitted]."""
    live, burst_start = {}, []

    def add_request(prompt, params, rid=None):
        if not live and not burst_start:
            burst_start[:] = [time.process_time(), shared[0], 0]
        live[rid] = [tuple(prompt), params.max_tokens]
        if burst_start:
            burst_start[2] += 1
            if burst_start[2] == burst:   # the burst is in: its CPU, less the steps' meanwhile
                shared[2] += time.process_time() - burst_start[0] - (shared[0] - burst_start[1])
                shared[3] += 1
                burst_start.clear()
        return rid

    def step():
        time.sleep(step_ms / 1e3)
        t0 = time.thread_time()
        outs = one_token_each(live)
        shared[0] += time.thread_time() - t0
        shared[1] += 1
        return outs

    llm.add_request, llm.step = add_request, step
    llm.abort = lambda rid: live.pop(rid, None)
    llm.has_unfinished_requests = lambda: bool(live)


async def one_round(engine, prompts, params):
    start = time.perf_counter()
    first: list = []

    async def consume(prompt):
        got = 0
        async for batch in engine.generate_batches(prompt, params):
            if not got:
                first.append(time.perf_counter())
            got += len(batch)
        return got

    got = await asyncio.gather(*(consume(p) for p in prompts))
    return max(first) - start, sum(got)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--step-ms", type=float, default=5.0, help="the fake step's sleep (a device step)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds after one warm-up round")
    args = ap.parse_args()

    import multiprocessing

    import psutil
    from serve import write_model

    from functional_llm import SamplingParams
    from functional_llm.serve.engine_process import EngineProcess
    tmp = tempfile.mkdtemp()
    model = write_model(os.path.join(tmp, "model"), vocab=1024, tiny=True)
    shared = multiprocessing.get_context("spawn").Array("d", 4, lock=False)
    engine = EngineProcess(model, child_setup=partial(fake_llm, shared, args.step_ms, args.requests))
    child = psutil.Process(engine._process.pid)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [[(i * 31 + j) % 1000 for j in range(args.prompt_len)] for i in range(args.requests)]
    rows = []
    try:
        for r in range(args.rounds + 1):
            before, c0, cpu = list(shared), sum(child.cpu_times()[:2]), time.process_time()
            admit, outputs = asyncio.run(one_round(engine, prompts, params))
            time.sleep(0.05)   # the child's last message is out: its sender is idle
            pcpu, ccpu, after = time.process_time() - cpu, sum(child.cpu_times()[:2]) - c0, list(shared)
            steps = after[1] - before[1]
            if r:   # the first round warms up
                rows.append(dict(child_us_per_step=1e6 * (ccpu - (after[0] - before[0])) / steps,
                                 parent_us_per_step=1e6 * pcpu / steps, admit_ms=1e3 * admit,
                                 child_admit_us_per_req=1e6 * (after[2] - before[2]) / args.requests,
                                 steps=steps, outputs=outputs))
    finally:
        engine.shutdown()
    for row in rows:
        print(json.dumps({k: round(v, 1) for k, v in row.items()}))
    print(json.dumps({"median": {k: round(statistics.median(r[k] for r in rows), 1) for k in rows[0]},
                      "requests": args.requests, "max_tokens": args.max_tokens, "step_ms": args.step_ms}))


if __name__ == "__main__":
    main()
