"""Traces written by LLM(trace=PATH) and checked by `functional-llm replay` (I14): a recorded
run replays exactly, with and without the model, for the synchronous and the pipelined loop
(async_scheduling); a tampered trace is reported at the step that was tampered with."""
import json
import subprocess
import sys

import attrs
import pytest

from functional_llm import LLM, SamplingParams
from functional_llm.cli import main
from tests.tiny_models import add_char_tokenizer, make_tiny_model

EOS = 255


@pytest.fixture(scope="module", params=["sync", "pipelined"])
def recorded(tmp_path_factory, request):
    """A traced run with chunked prefills, prefix hits, preemptions, seeded and unseeded
    sampling, a stop-string finish and an abort; the pipelined loop's drops rows of both."""
    folder = tmp_path_factory.mktemp("trace")
    model = add_char_tokenizer(make_tiny_model("qwen3", folder / "model", seed=1))
    path = folder / "run.jsonl"
    llm = LLM(str(model), block_size=4, num_kv_blocks=12, max_num_batched_tokens=9, trace=str(path),
              async_scheduling=request.param == "pipelined")
    shared = list(range(5, 25))
    prompts = [shared, shared[:15] + [7, 8], [3, 4, 5], shared[:12]]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=16, ignore_eos=True),
              SamplingParams(max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    llm.generate(prompts, params, use_tqdm=False)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    text = llm.generate("Hello", greedy, use_tqdm=False)[0].text
    stopped = llm.generate(["Hello", "Bye"], attrs.evolve(greedy, stop=[text[3:5]]), use_tqdm=False)
    assert stopped[0].finish_reason == "stop"                 # found by the shell: a finish line
    rid = llm.add_request([9] * 5, SamplingParams(max_tokens=30))
    llm.step()
    llm.step()
    llm.abort(rid)
    while llm.has_unfinished_requests():   # the pipelined loop: resolve the step in flight
        llm.step()
    llm.engine.trace.close()
    return model, path, llm.counters


def test_I14_recorded_run_replays_exactly_with_and_without_the_model(recorded):
    model, path, counters = recorded
    assert counters["chunked_prefills"] and counters["cache_hit_tokens"] and counters["preemptions"]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["kind"] == "header" and records[0]["shell"]["dtype"] == "float32"
    assert {"arrive", "finish", "step"} <= {r["kind"] for r in records}
    assert {"abort", "stop"} == {r["reason"] for r in records if r["kind"] == "finish"}
    if records[0]["pipeline"]:        # rows of ended sequences were dropped and recorded
        assert any(r["resolve_dropped"] for r in records if r["kind"] == "step")
    assert sum(r["kind"] == "step" for r in records) == counters["steps"]
    # core only, in a fresh process: digests must not depend on the process (no hash())
    done = subprocess.run([sys.executable, "-m", "functional_llm.cli", "replay", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{counters['steps']} steps replayed" in done.stdout
    assert main(["replay", str(path), "--model", str(model)]) == 0


def _tamper(path, out, step, change):
    """Copy the trace with `change` applied to the record of step `step`."""
    lines = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "step" and record["step"] == step:
            change(record)
        lines.append(json.dumps(record))
    out.write_text("\n".join(lines) + "\n")
    return out


def _sampling_step(path, skip):
    steps = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["step"] for r in steps if r["kind"] == "step" and r["tokens"]][skip]


@pytest.mark.parametrize("field,reported", [("tokens", "digest"), ("plan", "plan"),
                                            ("digest", "digest"), ("finished", "finished")])
def test_I14_tampered_trace_is_reported_at_the_right_step(recorded, tmp_path, capsys, field, reported):
    model, path, _ = recorded
    step = _sampling_step(path, 5)
    change = {"tokens": lambda r: r["tokens"].__setitem__(0, (r["tokens"][0] + 1) % EOS),
              "plan": lambda r: r["plan"]["counts"].__setitem__(0, r["plan"]["counts"][0] + 1),
              "digest": lambda r: r.__setitem__("digest", "0" * 32),
              "finished": lambda r: r["finished"].__setitem__("req-0", "stop")}[field]
    bad = _tamper(path, tmp_path / "bad.jsonl", step, change)
    assert main(["replay", str(bad)]) == 1
    assert f"diverged at step {step} ({reported})" in capsys.readouterr().err


def test_I14_pipelined_trace_reports_a_tampered_drop(recorded, tmp_path, capsys):
    model, path, _ = recorded
    records = [json.loads(line) for line in path.read_text().splitlines()]
    if not records[0]["pipeline"]:
        pytest.skip("the synchronous loop drops no rows")
    step = next(r["step"] for r in records if r["kind"] == "step" and r["resolve_dropped"])
    bad = _tamper(path, tmp_path / "bad.jsonl", step, lambda r: r["resolve_dropped"].clear())
    assert main(["replay", str(bad)]) == 1
    assert f"diverged at step {step} (dropped)" in capsys.readouterr().err


def test_I14_model_replay_reports_a_tampered_token_as_a_token_divergence(recorded, tmp_path, capsys):
    model, path, _ = recorded
    step = _sampling_step(path, 3)
    bad = _tamper(path, tmp_path / "bad.jsonl", step,
                  lambda r: r["tokens"].__setitem__(-1, (r["tokens"][-1] + 1) % EOS))
    assert main(["replay", str(bad), "--model", str(model)]) == 1
    assert f"diverged at step {step} (tokens)" in capsys.readouterr().err


def test_replay_rejects_files_that_are_not_traces(tmp_path, capsys):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"kind": "step"}\n')
    assert main(["replay", str(bad)]) == 2
    bad.write_text("not json\n")
    assert main(["replay", str(bad)]) == 2
    assert main(["replay", str(tmp_path / "missing.jsonl")]) == 2
    assert "error:" in capsys.readouterr().err


def test_trace_plot_writes_a_png(recorded, tmp_path):
    pytest.importorskip("matplotlib")
    _, path, _ = recorded
    out = tmp_path / "run.png"
    assert main(["trace", "plot", str(path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
