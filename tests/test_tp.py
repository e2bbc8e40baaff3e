"""LLM(..., tensor_parallel_size=2) on CPU over gloo: the same tokens as one process (greedy,
seeded sampling, the pipelined engine) on every tiny architecture, typed errors before anything
starts, worker failures surfacing in the caller with no process left behind, and a torchrun
launch.

Each TP=2 LLM spawns one worker process (a fresh interpreter importing torch: a few seconds),
so the tests share what they can and keep the models tiny."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from functional_llm import LLM, InvalidConfig, SamplingParams
from functional_llm.runtime.tp import FAULT_ENV, WorkerError
from tests.tiny_models import make_tiny_model

ARCHS = ["qwen3", "qwen2", "llama", "llama-mqa"]   # llama-mqa: 1 kv head < 2 ranks (replicated)
SMALL = dict(block_size=4, num_kv_blocks=96)      # a small pool: no 2 GiB default per rank
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SEEDED = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=10 + i, max_tokens=8,
                         ignore_eos=True) for i in range(4)]


def prompts(n, lo=3, hi=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 250, (int(torch.randint(lo, hi, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


PROMPTS = prompts(4)


def tokens(outs):
    return [list(o.token_ids) for o in outs]


def no_children(timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Rank 0 and its worker share the CI machine's cores: one intra-op thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {arch: str(make_tiny_model(arch, tmp_path_factory.mktemp(arch), seed=0)) for arch in ARCHS}


@pytest.fixture(scope="module")
def tp1(folders):
    """TP=1 greedy and seeded tokens of every architecture (the reference)."""
    out = {}
    for arch, folder in folders.items():
        llm = LLM(folder, **SMALL)
        out[arch] = (tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)),
                     tokens(llm.generate(PROMPTS, SEEDED, use_tqdm=False)))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_tokens_equal_tp1(folders, tp1, arch):
    greedy, seeded = tp1[arch]
    assert len({t for seq in greedy for t in seq}) > 5, "degenerate tiny model"
    with LLM(folders[arch], tensor_parallel_size=2, max_num_batched_tokens=24, **SMALL) as llm:
        assert len(multiprocessing.active_children()) == 1
        full, rank0 = llm.model_config, llm.engine.runner.model.cfg   # rank 0 holds half
        assert (rank0.num_heads, rank0.intermediate_size) == (full.num_heads // 2,
                                                              full.intermediate_size // 2)
        assert rank0.num_kv_heads == max(full.num_kv_heads // 2, 1)
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == greedy
        assert tokens(llm.generate(PROMPTS, SEEDED, use_tqdm=False)) == seeded
        assert llm.counters["cache_hit_tokens"] > 0      # the second call reused the prefixes
    assert no_children()
    with pytest.raises(WorkerError, match="shut down"):  # closed: no silent single-rank steps
        llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)


def test_tp2_fp8_cache_equals_tp1_fp8_cache(folders):
    """kv_cache_dtype="fp8" under TP: each rank quantizes its own kv heads (scales per token
    and head), so TP=2 gives TP=1's tokens."""
    folder = folders["qwen3"]
    want = tokens(LLM(folder, kv_cache_dtype="fp8", **SMALL).generate(PROMPTS, GREEDY, use_tqdm=False))
    with LLM(folder, tensor_parallel_size=2, kv_cache_dtype="fp8", **SMALL) as llm:
        assert llm.engine.runner.kv.dtype == torch.uint8          # the fp8 pool on rank 0
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want


def test_tp2_pipelined_equals_tp1_sync(folders):
    """async_scheduling with TP=2 (workers feed decode ids from their own previous tokens) under
    stops, preemption and chunked prefill; then a killed worker surfaces at the next step."""
    folder = folders["qwen3"]
    sync = LLM(folder, **SMALL)
    free = sync.generate(PROMPTS, GREEDY, use_tqdm=False)
    params = [SamplingParams(temperature=0.8 * (i % 2), top_k=20, seed=i, max_tokens=6 + i,
                             stop_token_ids=[free[i].token_ids[2 + i % 3]]) for i in range(4)]
    want = sync.generate(PROMPTS, params, use_tqdm=False)
    assert sum(o.finish_reason == "stop" for o in want) >= 2
    llm = LLM(folder, tensor_parallel_size=2, async_scheduling=True, block_size=4,
              num_kv_blocks=12, max_num_batched_tokens=9)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert tokens(got) == tokens(want)
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert llm.engine.dropped_rows > 0 and llm.counters["preemptions"] > 0
    assert llm.counters["chunked_prefills"] > 0 and llm.counters["blocks_in_use"] == 0

    worker, = multiprocessing.active_children()
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(5)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 exited with code -9"):
        llm.generate(PROMPTS, params, use_tqdm=False)
    assert time.monotonic() - t0 < 10
    assert no_children()
    llm.close()                                           # after a failure: a no-op


@pytest.mark.parametrize("where, message", [
    ("spawn", "rank 1 failed"),      # before the rendezvous: seen by polling the process
    ("joined", "rank 1 failed"),     # in the groups: rank 0's start-up collective breaks
    ("step:2", "rank 1 failed"),     # mid-run: rank 0's forward collective breaks
])
def test_worker_failure_surfaces_in_the_caller(folders, monkeypatch, where, message):
    monkeypatch.setenv(FAULT_ENV, where)       # inherited by the spawned worker only
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=message) as info:
        llm = LLM(folders["qwen2"], tensor_parallel_size=2, **SMALL)
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert f"injected fault at '{where}'" in str(info.value)   # the worker's own traceback
    assert time.monotonic() - t0 < 60
    assert no_children()
    if where.startswith("step"):
        with pytest.raises(WorkerError):      # stays failed
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)


def test_invalid_sizes_are_rejected_before_anything_starts(folders):
    cases = [(0, "tensor_parallel_size"), (-2, "tensor_parallel_size"),
             ("2", "tensor_parallel_size"),
             (3, "model.embed_tokens.weight"),      # 256 vocabulary rows over 3 ranks
             (8, "model.layers.0.self_attn.q_proj.weight")]   # 4 heads over 8 ranks
    for size, parameter in cases:
        with pytest.raises(InvalidConfig) as info:
            LLM(folders["llama"], tensor_parallel_size=size, **SMALL)
        assert info.value.parameter == parameter, size
    assert not multiprocessing.active_children()


TORCHRUN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from functional_llm import LLM, SamplingParams

    if __name__ == "__main__":
        torch.set_num_threads(1)
        folder, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        llm = LLM(folder, block_size=4, num_kv_blocks=96, tensor_parallel_size=2)
        # only rank 0 gets here: a rank >= 1 serves inside the constructor, then exits
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10,
                                                    ignore_eos=True), use_tqdm=False)
        with open(f"{out}-{os.environ['RANK']}.json", "w") as f:
            json.dump([list(o.token_ids) for o in outs], f)
        # no close(): the workers are stopped at exit
""")


def test_torchrun_launch(folders, tp1, tmp_path):
    script = tmp_path / "run_tp.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", str(script), folders["llama"],
                          str(tmp_path / "out"), json.dumps(PROMPTS)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "out-0.json").read_text()) == tp1["llama"][0]
    assert not (tmp_path / "out-1.json").exists()


def test_shutdown_frees_graphs_before_the_groups(monkeypatch):
    """On GPUs the decode graphs captured NCCL all-reduces, and destroying a group while such
    graphs live hangs: rank 0's close frees them first (the workers do so on "stop")."""
    from types import SimpleNamespace
    from functional_llm.runtime import tp
    events = []
    workers = tp._Workers([], None)
    workers.groups = SimpleNamespace(control=None, destroy=lambda: events.append("groups"))
    local = SimpleNamespace(release_graphs=lambda: events.append("graphs"))
    monkeypatch.setattr(tp.dist, "broadcast", lambda *a, **k: events.append("stop"))
    runner = tp.TPRunner(local, workers)
    runner.close()
    runner.close()                     # idempotent
    assert events == ["graphs", "stop", "groups"]
