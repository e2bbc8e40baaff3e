"""benchmarks/serve.py's arithmetic on synthetic chunk timings, and one end-to-end run of it on a
toy model on the CPU (--offline --out); the GPU runs are made by hand, see its docstring."""
import argparse
import json
import pathlib
import subprocess
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


def test_serving_cost():
    rows = [dict(rate=4.0, output_tok_s=500.0), dict(rate="inf", output_tok_s=900.0)]
    assert bench.serving_cost(rows, dict(output_tok_s=1000.0)) == dict(
        offline_tok_s=1000.0, serve_tok_s=900.0, serve_pct_of_offline=90.0)
    assert bench.serving_cost(rows, None) == {} and bench.serving_cost(rows[:1], {"output_tok_s": 1.0}) == {}


def test_offline_and_out_end_to_end(tmp_path):
    """--offline --out on a toy model on the CPU: the offline run generates every requested token
    with the server's engine options, the sweep completes, serve.json holds both and the ratio."""
    pytest.importorskip("fastapi")
    out = tmp_path / "out"
    cmd = [sys.executable, str(pathlib.Path(bench.__file__)), "--write-model", str(tmp_path / "m"),
           "--tiny", "--vocab", "1024", "--num-prompts", "4", "--max-tokens", "8", "--rates", "inf",
           "--client-procs", "1", "--offline", "--server-args", "--max-model-len 1024 --block-size 8",
           "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=240, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    report = json.loads((out / "serve.json").read_text())
    assert report["offline"]["output_tokens"] == 4 * 8
    assert report["offline"]["engine_options"] == "--max-model-len 1024 --block-size 8"
    [row] = report["sweep"]
    assert (row["rate"], row["completed"], row["failed"]) == ("inf", 4, 0)
    assert report["serve_pct_of_offline"] == pytest.approx(
        100 * row["output_tok_s"] / report["offline"]["output_tok_s"], abs=0.1)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "serve.png").stat().st_size > 0


def test_fake_engine_measures_the_http_side(tmp_path):
    """--fake-engine: the server over a fake engine (every request a token per step) in both
    engine modes; every token arrives, and with psutil the server's CPU per token is reported."""
    pytest.importorskip("fastapi")
    model = bench.write_model(str(tmp_path / "m"), vocab=1024, tiny=True)
    for mode in ("process", "thread"):
        cmd = [sys.executable, str(pathlib.Path(bench.__file__)), "--model", model, "--fake-engine", "1",
               "--num-prompts", "16", "--max-tokens", "40", "--rates", "inf", "--client-procs", "1",
               "--server-args", f"--engine-mode {mode}"]
        done = subprocess.run(cmd, check=True, timeout=240, capture_output=True, text=True)
        [row] = [json.loads(line) for line in done.stdout.splitlines()]
        assert (row["completed"], row["failed"], row["output_tok_s"] * row["duration_s"]) == (
            16, 0, pytest.approx(16 * 40, rel=0.01))
        try:
            import psutil  # noqa: F401
        except ImportError:
            continue
        assert row["server_cpu_us_per_tok"] > 0
        assert (row["engine_proc_cpu_pct"] > 0) == (mode == "process")
