"""Hypothesis-generated traces (I14): random workloads on the simulated model are recorded the
way the Engine records them (and, for the pipelined loop, by the real Engine(pipeline=True)
over the simulated device of the pipeline machine), written as JSON lines, read back and
replayed. The replay must match every step; a trace tampered at one step must be reported at
exactly that step."""
from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from functional_llm.core import commit as C
from functional_llm.core import scheduler as S
from functional_llm.core import trace as T
from functional_llm.core.records import Deltas, Request, new_state
from functional_llm.errors import FunctionalLLMError
from functional_llm.runtime.engine import Engine
from properties import sim
from properties.profiles import budget
from properties.test_pipeline_machine import FakeRunner

# one event before a step: ("arrive", prompt, params, seed) | ("finish", pick, reason) | ("step",)
events = st.one_of(
    st.tuples(st.just("arrive"), sim.prompts(), sim.sampling(), st.integers(0, 3)),
    st.tuples(st.just("finish"), st.integers(0, 99), st.sampled_from(["abort", "stop"])),
    st.just(("step",)), st.just(("step",)), st.just(("step",)))


DRAIN = 500    # steps: far more than any generated workload needs (liveness, I7)


def record_run(cfg, script) -> tuple[list, object]:
    """Run the script on the simulated model, recording like runtime/engine.py does, then
    drain. Returns the records and the final state."""
    state, kv = new_state(cfg), sim.FakeKV(cfg.num_blocks, cfg.block_size)
    records, arrivals = [T.header_record(cfg, {"model": "simulated"})], 0

    def step():
        nonlocal state
        index = state.counters.steps
        state, plan = S.schedule(state, cfg)
        tokens, deltas = sim.device_step(kv, state, plan), Deltas()
        if plan.rids:   # the engine skips the device and commit for an empty plan
            state, deltas = C.commit(state, cfg, plan, tokens)
        records.append(T.step_record(index, plan, tokens, state, deltas))

    for event in script:
        if event[0] == "step":
            step()
        elif event[0] == "arrive":
            req = Request(f"r{arrivals}", event[1], event[2], event[3], arrivals)
            try:
                state = S.admit(state, cfg, req)
            except FunctionalLLMError:
                continue
            arrivals += 1
            records.append(T.arrival_record(req, state.counters.steps))
        elif state.seqs:
            rid = sorted(state.seqs)[event[1] % len(state.seqs)]
            state = C.finish(state, rid)
            records.append(T.finish_record(rid, event[2], state.counters.steps))
    for _ in range(DRAIN):
        if not state.seqs:
            break
        step()
    return records, state


class _Kept(list):
    """Stands in for TraceWriter: the engine's records, kept in memory."""

    def write(self, record: dict) -> None:
        self.append(record)


def record_pipelined_run(cfg, script) -> tuple[list, object]:
    """The script through the real pipelined Engine, which writes its own records; then drain
    (the step in flight included)."""
    records = _Kept([T.header_record(cfg, {"model": "simulated"}, pipeline=True)])
    engine, arrivals = Engine(FakeRunner(cfg), cfg, pipeline=True, trace=records), 0
    for event in script:
        if event[0] == "step":
            engine.step()
        elif event[0] == "arrive":
            try:
                engine.add(Request(f"r{arrivals}", event[1], event[2], event[3]))
            except FunctionalLLMError:
                continue
            arrivals += 1
        elif engine.state.seqs:
            engine.finish(sorted(engine.state.seqs)[event[1] % len(engine.state.seqs)], event[2])
    for _ in range(2 * DRAIN):
        if not engine.has_unfinished():
            break
        engine.step()
    return list(records), engine.state


RECORDERS = {False: record_run, True: record_pipelined_run}


@settings(max_examples=budget(150))
@given(cfg=sim.sched_configs(), script=st.lists(events, max_size=30))
def test_I14_generated_traces_replay_exactly(cfg, script):
    _replays_exactly(*record_run(cfg, script))


@settings(max_examples=budget(100))
@given(cfg=sim.sched_configs(), script=st.lists(events, max_size=30))
def test_I14_generated_pipelined_traces_replay_exactly(cfg, script):
    _replays_exactly(*record_pipelined_run(cfg, script))


def _replays_exactly(records, final):
    back = [T.decode(T.encode(r)) for r in records]
    assert back == records, "I14: a record does not survive JSON"
    report = T.replay(back)
    assert report.ok, f"I14: {report.divergence}"
    assert report.steps == sum(r["kind"] == "step" for r in records)
    assert T.state_digest(report.state) == T.state_digest(final)


@settings(max_examples=budget(150))
@given(cfg=sim.sched_configs(), script=st.lists(events, min_size=1, max_size=30), data=st.data())
def test_I14_tampered_step_is_reported_at_that_step(cfg, script, data):
    pipelined = data.draw(st.booleans(), label="pipelined")
    records, _ = RECORDERS[pipelined](cfg, script + [("step",)])
    steps = [i for i, r in enumerate(records) if r["kind"] == "step"]
    i = data.draw(st.sampled_from(steps), label="tampered record")
    rec = copy.deepcopy(records[i])
    kept = _kept_rows(records, i) if pipelined else range(len(rec["tokens"]))
    kinds = ["plan", "digest", "finished"] + (["tokens"] if kept else [])
    kind = data.draw(st.sampled_from(kinds), label="field")
    if kind == "tokens":   # a row whose token core uses (a dropped row's token is unused)
        k = data.draw(st.sampled_from(list(kept)), label="row")
        rec["tokens"][k] = (rec["tokens"][k] + data.draw(st.integers(1, sim.VOCAB - 1))) % sim.VOCAB
    elif kind == "plan":
        if rec["plan"]["rids"]:
            rec["plan"]["counts"][0] += 1
        else:
            rec["plan"]["preempted"].append("r0")
    elif kind == "digest":
        rec["digest"] = "0" * 32
    else:
        rec["finished"]["nobody"] = "stop"
    report = T.replay(records[:i] + [rec] + records[i + 1:])
    assert not report.ok and report.divergence.step == rec["step"], \
        f"I14: tampered {kind} of step {rec['step']}, replay says {report.divergence}"


def _kept_rows(records, i) -> list:
    """The rows of pipelined step record i's tokens that resolve keeps: the sampling rows of
    the step before, less those of requests that ended while it was in flight."""
    prev = [r for r in records[:i] if r["kind"] == "step"]
    if not prev or records[i]["resolves"] is None:
        return []
    plan = prev[-1]["plan"]
    rids = [rid for rid, s in zip(plan["rids"], plan["sample"]) if s]
    return [k for k, rid in enumerate(rids) if rid not in records[i]["resolve_dropped"]]
