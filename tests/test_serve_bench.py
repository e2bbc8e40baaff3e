"""benchmarks/serve.py's arithmetic on synthetic chunk timings (the load generator itself needs a
server; it is run by hand, see its docstring)."""
import argparse
import pathlib
import sys

import pytest

pytest.importorskip("httpx")
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
import serve as bench  # noqa: E402
from throughput import workload  # noqa: E402


def test_summarize_ttft_tpot_itl():
    results = [(0.0, [0.10, 0.12, 0.14, 0.16], 4, None),   # one token per chunk
               (0.05, [0.25, 0.35], 3, None),              # a chunk carried two tokens
               (0.0, [0.2], 1, "HTTP 429")]                # failed: left out of every figure
    s = bench.summarize(results, duration=1.0)
    assert (s["completed"], s["failed"], s["req_s"], s["output_tok_s"]) == (2, 1, 2.0, 7.0)
    assert s["ttft_p50_ms"] == pytest.approx(150.0)        # 100 and 200 ms
    assert s["tpot_p50_ms"] == pytest.approx(35.0)         # 60 ms / 3 and 100 ms / 2
    assert s["itl_p50_ms"] == pytest.approx(20.0)          # gaps 20, 20, 20, 100 ms
    assert s["itl_p99_ms"] == pytest.approx(20 + 0.97 * 80)


def test_summarize_nothing_completed():
    s = bench.summarize([(0.0, [], 0, "refused")], duration=2.0)
    assert s["completed"] == 0 and s["ttft_p50_ms"] is None and s["itl_p99_ms"] is None


def test_workloads():
    args = argparse.Namespace(workload="headline", num_prompts=5, prefix_len=64, max_tokens=None)
    prompts, outs = workload(256)
    assert bench.requests_for(args, 151936) == list(zip(prompts[:5], outs[:5]))   # BENCHMARK.md's
    args.max_tokens = 50
    small = bench.requests_for(args, 1000)
    assert all(m == 50 and max(p) < 1000 for p, m in small)
    args.workload = "shared-prefix"
    shared = bench.requests_for(args, 151936)
    assert len(shared) == 5 and len({tuple(p[:64]) for p, _ in shared}) == 1
    assert len({tuple(p[64:]) for p, _ in shared}) == 5
