"""Online serving benchmark: a load generator for an OpenAI-compatible server.

Starts `functional-llm serve` in its own process (or uses a running one with --url), sends a
warm-up pass, then for each request rate sends the workload with Poisson arrivals (inf: all at
once), streaming /v1/completions with token-id prompts, max_tokens and ignore_eos. Prints one
JSON line per rate: request and output-token throughput, and TTFT / TPOT / ITL p50, p90, p99 in
ms from the SSE chunks' arrival times; --plot writes latency against rate (the `plot` extra).
--offline first times `LLM.generate` on the same requests with the same engine options (parsed
from --server-args by the server's own parser) in a process of its own, before the server
starts, and reports the server's all-at-once tok/s as a percentage of it (issue 12 item 5: what
serving costs). --out DIR writes DIR/serve.json (every row, the offline run, the percentage)
and DIR/serve.png.

On the GPU machine: random-weight Qwen3-0.6B plus a tokenizer with its 151,936-entry
vocabulary, written to DIR first (later runs: --model DIR), the headline workload:
    python benchmarks/serve.py --write-model /tmp/qwen3-0.6b-random --rates 4,8,16,32,inf \\
        --server-args "--max-model-len 4096" --plot serve.png
    python benchmarks/serve.py --model /tmp/qwen3-0.6b-random --workload shared-prefix ...
Serving cost against offline generate, same call (share TORCHINDUCTOR_CACHE_DIR: the server
then starts from the offline process's compiled kernels; rates run in the order given):
    python benchmarks/serve.py --write-model /tmp/qwen3-0.6b-random --offline --rates inf,32,16,8,4 \\
        --server-args "--max-model-len 4096 --attention-backend triton" --out results/
On CPU, a toy model: --write-model DIR --tiny --vocab 1024 --num-prompts 4 --max-tokens 32
--rates 2,inf. client_cpu_pct near 100 means the client, not the server, is the bottleneck.
With psutil, each row also has the server process's CPU (server_cpu_pct of one core,
server_cpu_us_per_tok) and its children's (engine_proc_cpu_pct: the engine process, the
default --engine-mode): the HTTP side's cost per token, whatever else the machine runs.
--fake-engine STEP_MS serves a fake engine instead (each step holds the GIL for STEP_MS, then
gives every request a token): the HTTP side's capacity, apart from the model, e.g.
    python benchmarks/serve.py --write-model /tmp/toy --tiny --vocab 1024 --fake-engine 5 \
        --max-tokens 256 --rates inf --server-args "--engine-mode thread"
"""
import argparse
import asyncio
import concurrent.futures
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

from throughput import QWEN3_06B, random_model, workload

# --tiny: toy dimensions (Qwen3's shape kept: q/k norms, head_dim != hidden / heads) for CPU runs
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)


def write_model(folder, vocab=QWEN3_06B["vocab_size"], tiny=False) -> str:
    """Random weights (throughput.random_model) plus a word-level tokenizer covering every id:
    id i is the word "w{i}" and decoding joins words with spaces, so every generated token
    streams as non-empty text. Qwen3's special tokens keep their ids (the last three below a
    smaller --vocab); encoding words it does not know gives w0."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    bos = min(QWEN3_06B["bos_token_id"], vocab - 3)   # <|endoftext|>, <|im_start|>, <|im_end|>
    special = {bos: "<|endoftext|>", bos + 1: "<|im_start|>", bos + 2: "<|im_end|>"}
    os.makedirs(folder, exist_ok=True)
    config = {**QWEN3_06B, **(TINY if tiny else {}), "vocab_size": vocab,
              "bos_token_id": bos, "eos_token_id": bos + 2}
    random_model(folder, config, "cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()   # the engines run in other processes: leave them the memory
    tok = Tokenizer(models.WordLevel({special.get(i, f"w{i}"): i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}"
                          "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant "
                          "{% endif %}")
    fast.save_pretrained(folder)
    return folder


def requests_for(args, vocab) -> list:
    """(prompt ids, max_tokens) of the chosen workload, ids folded into a smaller vocabulary."""
    if args.workload == "headline":   # drawn for all 256 as BENCHMARK.md, so n < 256 is its first n
        prompts, outs = workload(256)
        prompts, outs = prompts[:args.num_prompts], outs[:args.num_prompts]
    else:                             # one long common prefix, short distinct suffixes
        rng = random.Random(1)
        prefix = [rng.randint(0, 10000) for _ in range(args.prefix_len)]
        prompts = [prefix + [rng.randint(0, 10000) for _ in range(rng.randint(32, 256))]
                   for _ in range(args.num_prompts)]
        outs = [rng.randint(100, 1024) for _ in prompts]
    return [([t % vocab for t in p], min(o, args.max_tokens or o)) for p, o in zip(prompts, outs)]


async def one_request(client, url, model, prompt, max_tokens):
    """Stream one completion: (send time, arrival time of each content chunk, output tokens, error).
    Output tokens come from the final usage chunk (a chunk may carry several tokens)."""
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, ignore_eos=True,
                temperature=0.6, stream=True, stream_options={"include_usage": True})
    start, times, tokens, error = time.monotonic(), [], None, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return start, times, 0, f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    times.append(time.monotonic())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if "error" in chunk:
                    error = chunk["error"].get("message", "error event")
    except httpx.HTTPError as e:
        error = repr(e)
    return start, times, len(times) if tokens is None else tokens, error


async def send_shard(url, model, shard, t0):
    """Send each request at its scheduled time whether or not earlier ones have finished (an
    open loop). No connection limit or timeout: at rate inf every stream is open at once."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        tasks = []
        for at, prompt, max_tokens in shard:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(client, url, model, prompt, max_tokens)))
        return await asyncio.gather(*tasks)


def client_proc(url, model, shard, t0):
    """One client process's share, on its own event loop: one Python process parses only ~10k
    SSE chunks/s through httpx, less than a GPU server streams at saturation."""
    cpu = time.process_time()
    results = asyncio.run(send_shard(url, model, shard, t0))
    return results, time.process_time() - cpu


def run_rate(pool, procs, url, model, reqs, rate, seed=0):
    """reqs at `rate`, dealt round-robin to the client processes: (records, seconds from the
    first send to the last chunk, the busiest client process's CPU seconds)."""
    rng = random.Random(seed)   # exponential gaps: a Poisson process (inf: all at once)
    gaps = [0.0 if math.isinf(rate) else rng.expovariate(rate) for _ in reqs]
    items = [(at, p, m) for at, (p, m) in zip(itertools.accumulate([0.0] + gaps[1:]), reqs)]
    t0 = time.monotonic() + 0.2   # one clock for all processes (CLOCK_MONOTONIC is system-wide)
    outs = [f.result() for f in [pool.submit(client_proc, url, model, items[k::procs], t0)
                                 for k in range(procs)]]
    results = [r for rs, _ in outs for r in rs]
    end = max(t[-1] if t else s for s, t, _, _ in results)
    return results, end - t0, max(cpu for _, cpu in outs)


def summarize(results, duration) -> dict:
    """Throughput and latency (ms) from one_request's records. TTFT: send to first content
    chunk. TPOT: (e2e - TTFT) / (tokens - 1) per request, e2e ending at the last content chunk.
    ITL: every gap between consecutive content chunks (as vLLM's benchmark counts them)."""
    ok = [(s, t, n) for s, t, n, err in results if err is None and t]
    ttft = [t[0] - s for s, t, n in ok]
    tpot = [(t[-1] - t[0]) / (n - 1) for s, t, n in ok if n > 1]
    itl = [b - a for _, t, _ in ok for a, b in zip(t, t[1:])]
    out = dict(completed=len(ok), failed=len(results) - len(ok), duration_s=round(duration, 3),
               req_s=round(len(ok) / duration, 3),
               output_tok_s=round(sum(n for _, _, n in ok) / duration, 1))
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = round(1e3 * float(np.percentile(xs, q)), 2) if xs else None
    return out


def counters(url) -> dict:
    """The server's preemption and prefix-cache counters (they explain latency at high rates)."""
    try:
        text = httpx.get(url + "/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    pattern = r"^functional_llm:(num_preemptions_total|prefix_cache_(?:queries|hits)_total) (\S+)$"
    return {k: float(v) for k, v in re.findall(pattern, text, re.M)}


def warmup_requests(reqs, vocab) -> list:
    """The first 32 prompts, whole (first prefills of long prompts are slow: keep them out of
    the timed runs), 16 tokens each, ids shifted so they share no prefix-cache blocks with the
    timed ones. The server and --offline's generate both get this pass."""
    return [([(20000 + t) % vocab for t in p], 16) for p, _ in reqs[:32]]


def offline_run(model, server_args, reqs, warm) -> dict:
    """LLM.generate on reqs (sampled as the server's requests are) after generating `warm`,
    timed as throughput.py times it. The engine options are the server's: `functional-llm
    serve`'s parser reads --server-args. Run in a process of its own, before the server."""
    import torch

    from functional_llm import LLM, SamplingParams
    from functional_llm.serve.main import parser
    ap, names = parser()
    opts = ap.parse_args(["--model", model, *shlex.split(server_args)])
    t0 = time.perf_counter()
    llm = LLM(**{name: getattr(opts, name) for name in names})
    startup = time.perf_counter() - t0

    def generate(batch):
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for _, m in batch]
        return llm.generate([p for p, _ in batch], params, use_tqdm=False)

    generate(warm)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    n_out = sum(len(r.token_ids) for r in generate(reqs))
    sync()
    dt = time.perf_counter() - t
    engine = llm.engine
    out = dict(output_tokens=n_out, seconds=round(dt, 3), output_tok_s=round(n_out / dt, 1),
               startup_s=round(startup, 1), backend=getattr(engine.runner.model.backend, "name", None),
               cuda_graphs=getattr(engine.runner, "graphs", None) is not None, steps=llm.counters["steps"],
               preemptions=llm.counters["preemptions"], engine_options=server_args)
    llm.close()
    return out


def cpu_seconds(pid) -> dict:
    """CPU seconds so far of the server's process and of its children (the engine process):
    the HTTP side's cost per token, apart from the machine's other load. {} without psutil."""
    try:
        import psutil
        proc = psutil.Process(pid)
        kids = proc.children(recursive=True)
        return dict(server=sum(proc.cpu_times()[:2]),
                    children=sum(sum(k.cpu_times()[:2]) for k in kids if k.is_running()))
    except Exception:   # no psutil, or a process that has gone
        return {}


def client_main(args, url, vocab, server_pid=None) -> list:
    model = args.served_model_name or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    reqs = requests_for(args, vocab)
    ctx = multiprocessing.get_context("spawn")   # the parent may hold CUDA (--write-model)
    with concurrent.futures.ProcessPoolExecutor(args.client_procs, mp_context=ctx) as pool:
        run_rate(pool, args.client_procs, url, model, warmup_requests(reqs, vocab), math.inf)
        rows = []
        for i, rate in enumerate(args.rates):
            # a first token per rate: no rate reuses the prefix-cache blocks of an earlier one
            batch = [([(10001 + i) % vocab] + p[1:], m) for p, m in reqs]
            before, cpu0 = counters(url), cpu_seconds(server_pid) if server_pid else {}
            results, duration, cpu = run_rate(pool, args.client_procs, url, model, batch, rate, seed=i)
            row = dict(rate="inf" if math.isinf(rate) else rate, workload=args.workload,
                       **summarize(results, duration), client_cpu_pct=round(100 * cpu / duration, 1))
            cpu1 = cpu_seconds(server_pid) if cpu0 else {}
            if cpu1:   # % of one core over the run; the server's CPU microseconds per output token
                tokens = max(1, sum(n for _, t, n, err in results if err is None and t))
                row.update(server_cpu_pct=round(100 * (cpu1["server"] - cpu0["server"]) / duration, 1),
                           engine_proc_cpu_pct=round(100 * (cpu1["children"] - cpu0["children"]) / duration, 1),
                           server_cpu_us_per_tok=round(1e6 * (cpu1["server"] - cpu0["server"]) / tokens, 1))
            after = counters(url)
            row.update({k: after[k] - before.get(k, 0) for k in after})
            errors = [e for *_, e in results if e is not None]
            if errors:
                row["first_error"] = errors[0]
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows


def plot(rows, path, title, offline_tok_s=None):
    """TTFT and TPOT p50/p99 against rate, and output tok/s (offline generate's as a line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(rows, key=lambda r: math.inf if r["rate"] == "inf" else r["rate"])
    x = range(len(rows))   # rates as categories: "inf" has no place on a numeric axis
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name in zip(axes, ("ttft", "tpot")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [r[f"{name}_{q}_ms"] or math.nan for r in rows], style, label=f"{name.upper()} {q}")
        ax.set(ylabel="ms", yscale="log", title=name.upper())
    axes[2].plot(x, [r["output_tok_s"] for r in rows], "o-", label="through the server")
    if offline_tok_s:
        axes[2].axhline(offline_tok_s, color="gray", linestyle=":", label="offline generate")
    axes[2].set(ylabel="output tok/s", title="throughput", ylim=(0, None))
    for ax in axes:
        ax.set_xticks(list(x), [str(r["rate"]).removesuffix(".0") for r in rows])
        ax.set(xlabel="request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class _FakeOutput:
    """What the engine loops and the server read of a RequestOutput."""
    def __init__(self, rid, prompt, finish):
        self.request_id, self.prompt_token_ids, self.finish_reason = rid, prompt, finish
        self.num_cached_tokens, self.delta_text, self.delta_token_ids = 0, " w7", (7,)
        self.token_ids, self.delta_logprobs, self.finished = (7,), None, finish is not None


def one_token_each(live: dict) -> list:
    """A fake step's outputs: every live request (rid -> [prompt ids, tokens left]) gets one
    token (" w7", id 7); those whose last token it was leave `live`."""
    outs = []
    for rid, item in list(live.items()):
        item[1] -= 1
        outs.append(_FakeOutput(rid, item[0], "length" if item[1] == 0 else None))
        if item[1] == 0:
            del live[rid]
    return outs


def fake_engine(step_ms, llm):
    """Make `llm` a fake engine whose step holds the GIL for step_ms (host work, as a GPU
    step's Python side does) and gives every live request one token: the HTTP side's cost is
    then measured apart from the model's. Patches the instance (AsyncLLM's llm, or
    EngineProcess's child_setup)."""
    live = {}   # rid -> [prompt ids, tokens left]

    def add_request(prompt, params, rid=None):
        live[rid] = [tuple(prompt), params.max_tokens]
        return rid

    def step():
        end = time.perf_counter() + step_ms / 1e3
        while time.perf_counter() < end:
            pass
        return one_token_each(live)
    llm.add_request, llm.abort, llm.step = add_request, live.pop, step
    llm.has_unfinished_requests = lambda: bool(live)


def fake_server(port, step_ms, server_args):
    """The server over fake_engine(step_ms) (--fake-engine): `functional-llm serve`'s options
    from --server-args (--model: the LLM the fake replaces; --engine-mode)."""
    import uvicorn

    from functional_llm.serve.app import ServeConfig, build_app
    from functional_llm.serve.main import make_server, parser
    ap, names = parser()
    opts = ap.parse_args(shlex.split(server_args))
    options = {name: getattr(opts, name) for name in names}
    if getattr(opts, "engine_mode", "thread") == "process":
        from functools import partial

        from functional_llm.serve.engine_process import EngineProcess
        engine = EngineProcess(**options, child_setup=partial(fake_engine, step_ms))
    else:
        from functional_llm import AsyncLLM
        engine = AsyncLLM(**options)
        fake_engine(step_ms, engine._llm)
    app = build_app(engine, None, ServeConfig(model_name="fake"), owns_engine=True)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    try:
        make_server(config, app).run()
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()


def start_server(args):
    """`functional-llm serve` in its own process; returns it and its URL once /health answers."""
    with socket.socket() as s:           # a free port, unless one was asked for
        s.bind(("127.0.0.1", args.port))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "functional_llm.cli", "serve", "--model", args.model,
           "--port", str(port), *shlex.split(args.server_args)]
    if args.fake_engine is not None:
        cmd = [sys.executable, __file__, "--fake-server", str(port), "--fake-engine", str(args.fake_engine),
               "--server-args", shlex.join(["--model", args.model, *shlex.split(args.server_args)])]
    proc = subprocess.Popen(cmd, stdout=sys.stderr)   # server logs to stderr: stdout is the JSON lines
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + args.startup_timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit(f"server did not become healthy (exit code {proc.poll()}): {shlex.join(cmd)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder for the server this script starts")
    ap.add_argument("--url", help="use a running server instead, e.g. http://127.0.0.1:8000")
    ap.add_argument("--write-model", metavar="DIR", help="write the random model + tokenizer to DIR, serve it")
    ap.add_argument("--vocab", type=int, help="vocabulary size (written model; folds prompt ids); "
                    "default: the model's config.json, else 151936")
    ap.add_argument("--tiny", action="store_true", help="--write-model with toy dimensions (CPU)")
    ap.add_argument("--workload", choices=("headline", "shared-prefix"), default="headline")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: common prefix tokens")
    ap.add_argument("--max-tokens", type=int, help="cap on each request's output length (CPU runs)")
    ap.add_argument("--rates", type=lambda s: [float(r) for r in s.split(",")], default="1,2,4,8,inf")
    ap.add_argument("--plot", metavar="PATH", help="PNG of TTFT and TPOT p50/p99 against rate")
    ap.add_argument("--offline", action="store_true", help="first time LLM.generate on the same "
                    "requests and engine options (own process); report the server's inf-rate %% of it")
    ap.add_argument("--out", metavar="DIR", help="write DIR/serve.json and DIR/serve.png")
    ap.add_argument("--client-procs", type=int, default=max(1, min(8, os.cpu_count() // 2)),
                    help="client processes sharing the requests")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--server-args", default="", help="more `functional-llm serve` options, one string")
    ap.add_argument("--served-model-name", help="model name to send (default: /v1/models' first)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--fake-engine", type=float, metavar="STEP_MS", help="serve a fake engine "
                    "(each step holds the GIL for STEP_MS, then gives every request a token; --model: "
                    "the LLM it replaces): what the HTTP side can stream when the model costs nothing")
    ap.add_argument("--fake-server", type=int, metavar="PORT", help=argparse.SUPPRESS)   # start_server's
    args = ap.parse_args()
    if args.fake_server is not None:
        return fake_server(args.fake_server, args.fake_engine, args.server_args)
    if args.write_model:
        args.model = write_model(args.write_model, args.vocab or QWEN3_06B["vocab_size"], args.tiny)
    if bool(args.model) == bool(args.url):
        ap.error("give exactly one of --model / --write-model and --url")
    if args.offline and not args.model:
        ap.error("--offline needs --model or --write-model (the GPU must be free of a server)")
    vocab = args.vocab
    if vocab is None and args.model:
        with open(os.path.join(args.model, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
    vocab = vocab or QWEN3_06B["vocab_size"]
    report = dict(workload=args.workload, num_prompts=args.num_prompts, server_args=args.server_args)
    if args.offline:
        reqs = requests_for(args, vocab)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            report["offline"] = pool.submit(offline_run, args.model, args.server_args, reqs,
                                            warmup_requests(reqs, vocab)).result()
        print(json.dumps({"offline": report["offline"]}), flush=True)
    proc, url = start_server(args) if args.model else (None, args.url.rstrip("/"))
    try:
        rows = client_main(args, url, vocab, proc.pid if proc is not None else None)
    finally:
        if proc is not None:   # SIGTERM: the server finishes or aborts what is in flight, then exits
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    report["sweep"] = rows
    report.update(serving_cost(rows, report.get("offline")))
    if "serve_pct_of_offline" in report:
        print(json.dumps({k: report[k] for k in ("offline_tok_s", "serve_tok_s", "serve_pct_of_offline")}),
              flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "serve.json"), "w") as f:
            json.dump(report, f, indent=1)
    for path in filter(None, (args.plot, args.out and os.path.join(args.out, "serve.png"))):
        if rows:
            try:
                plot(rows, path, f"{args.workload} workload, {rows[0]['completed'] + rows[0]['failed']} "
                                 "requests per rate", report.get("offline_tok_s"))
            except ImportError as e:   # the JSON is written: plot it elsewhere (plot(report["sweep"], ...))
                print(f"no plot ({e})", file=sys.stderr)


def serving_cost(rows, offline) -> dict:
    """The server's all-at-once output tok/s as a percentage of offline generate's (item 5's
    target: >= 85)."""
    inf = [r for r in rows if r["rate"] == "inf"]
    if not offline or not inf:
        return {}
    served = inf[-1]["output_tok_s"]
    return dict(offline_tok_s=offline["output_tok_s"], serve_tok_s=served,
                serve_pct_of_offline=round(100 * served / offline["output_tok_s"], 1))


if __name__ == "__main__":
    main()
