"""A Hypothesis state machine for the pipelined engine (async scheduling): the same inputs
drive three engines in lockstep, and the pipelined ones must give the synchronous one's tokens.

* sync    schedule -> device step -> commit, per step (pure transitions);
* piped   the pipelined order of the same pure transitions, as Engine._pipelined_step runs
          them: schedule k -> launch k -> resolve k-1 (its plan without the rows of sequences
          that ended while it was in flight) -> advance k (likewise). The decode rows of step
          k read PENDING on the host; the simulated device feeds them step k-1's samples;
* engine  the real Engine(pipeline=True) over a fake Runner that runs the same simulated
          model on the staged host inputs (slots, tables, the device-side feed). Each step it
          must return the piped lane's deltas and hold a state with the same digest, so the
          piped lane is exactly the engine's order and every check below covers it.

The simulated model (properties/sim.py) computes each position's KV from its input id and the
KV before it and samples from the last KV, so a wrong or placeholder input id changes every
later token; a PENDING reaching the model fails at once (I16). Random arrivals (shared
prefixes, a request id reused right after its request ended), aborts and stop-string
finishes, tiny pools (preemption, also of a sequence whose token is still pending), tiny
budgets (chunking), stop ids, EOS and max_tokens. After every transition of both pure lanes:
I1-I5, I7, I8, I12, I16 (core/invariants.py, mid-step forms inside a step), I6, I11 after
schedule, I9 through the simulated KV. At the end both drain; every request that core finished
has exactly the tokens and reason it has alone (I10) in both, so the lanes agree (I17);
an aborted one has a prefix of them.
"""
from __future__ import annotations

import attrs
import numpy as np
import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from functional_llm.core import commit as C
from functional_llm.core import scheduler as S
from functional_llm.core.blocks import chain_hash
from functional_llm.core.commit import PENDING
from functional_llm.core.invariants import check_state
from functional_llm.core.records import Deltas, Request, new_state
from functional_llm.core.trace import state_digest
from functional_llm.errors import InvalidPrompt, RequestTooLarge
from functional_llm.runtime.engine import Engine
from functional_llm.runtime.runner import StepOut
from properties import sim
from properties.profiles import budget
from properties.sim import guarded


class SyncLane:
    """The synchronous engine's order: schedule, device step, commit."""

    def __init__(self, cfg):
        self.cfg, self.state = cfg, new_state(cfg)
        self.kv = sim.FakeKV(cfg.num_blocks, cfg.block_size)

    def unfinished(self) -> bool:
        return bool(self.state.seqs)

    def add(self, req: Request) -> None:
        self.state = S.admit(self.state, self.cfg, req)

    def finish(self, rid: str) -> None:
        self.state = C.finish(self.state, rid)

    def step(self) -> Deltas:
        before = self.state
        state, plan = S.schedule(before, self.cfg)
        sim.check_plan(before, state, plan, self.cfg)               # I5 (in-step), I6, I11
        check_state(state, self.cfg, chain_hash, plan)
        if not plan.rids:
            self.state = state
            return Deltas()
        tokens = sim.device_step(self.kv, state, plan)              # I9 on every read
        self.state, deltas = C.commit(state, self.cfg, plan, tokens)
        return deltas


@attrs.define
class Flight:
    """A launched step of the piped lane: its plan, its samples (still "on the device"), and
    the rids whose rows must be dropped when it is resolved."""

    plan: object
    tokens: list
    gone: set = attrs.Factory(set)

    def samples(self) -> dict:
        """rid -> its sample: what the device feeds the next step in place of PENDING."""
        return dict(zip((r for r, s in zip(self.plan.rids, self.plan.sample) if s), self.tokens))


class PipedLane(SyncLane):
    """The pipelined order of the pure transitions (Engine._pipelined_step), checked after
    each one."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.flight = None

    def unfinished(self) -> bool:
        return bool(self.state.seqs or self.flight)

    def add(self, req: Request) -> None:
        super().add(req)
        if self.flight is not None and req.rid in self.flight.plan.rids:
            self.flight.gone.add(req.rid)       # that row belongs to the id's earlier request
            event("pipelined: id reused while its earlier request's row is in flight")

    def finish(self, rid: str) -> None:
        super().finish(rid)
        if self.flight is not None:
            if rid in self.flight.plan.rids:
                event("pipelined: row dropped (ended outside core while in flight)")
            self.flight.gone.add(rid)

    def step(self) -> Deltas:
        cfg, before = self.cfg, self.state
        self.state, plan = S.schedule(before, cfg)                   # schedule k
        sim.check_plan(before, self.state, plan, cfg)
        check_state(self.state, cfg, chain_hash, plan)
        if any(PENDING in self.state.seqs[r].tokens for r in plan.preempted):
            event("pipelined: a sequence preempted with its token pending")
        prev, launched = self.flight, None
        if plan.rids:                                                # launch k
            fed = None if prev is None else prev.samples()
            launched = Flight(plan, sim.device_step(self.kv, self.state, plan, fed))
        deltas = Deltas()
        if prev is not None:                                         # resolve k-1
            prev_plan, keep = prev.plan.without(prev.gone)
            tokens = [t for t, k in zip(prev.tokens, keep) if k]
            waiting = set(self.state.waiting)
            self.state, deltas = C.resolve(self.state, cfg, prev_plan, tokens)
            if waiting & set(deltas.finished):
                event("pipelined: resolve finishes a waiting (preempted) sequence")
            if launched is not None:
                wasted = set(deltas.finished) & set(plan.rids)
                if wasted:
                    event("pipelined: row dropped (finished by the resolve before it)")
                launched.gone.update(deltas.finished)
            mid = None if launched is None else plan.without(launched.gone)[0]
            check_state(self.state, cfg, chain_hash, mid)
        if launched is not None:                                     # advance k
            self.state = C.advance(self.state, cfg, plan.without(launched.gone)[0])
        self.flight = launched
        return deltas


class FakeRunner:
    """The device half for the real Engine: the simulated model over the staged host inputs.
    Like Runner.launch, it puts the previous step's tokens where the feed says, then computes
    each token's KV (slot) from its id and the KV of the position before, read through the
    row's block table, and samples each sampling row from its last KV."""

    def __init__(self, cfg):
        self.S, self.kv = cfg.block_size, {}      # slot -> the token prefix its KV holds

    def launch(self, host, feed=None) -> StepOut:
        ids = host.ids.copy()
        if feed is not None and len(feed.dst):
            ids[feed.dst] = feed.src.numpy()[feed.index]
        assert not (ids == PENDING).any(), f"I16: a pending token reaches the model at {np.flatnonzero(ids == PENDING)}"
        rows = host.row_of_token(np.arange(len(ids))).tolist()
        for t, (tok, r, p) in enumerate(zip(ids.tolist(), rows, host.positions.tolist())):
            before = () if p == 0 else self.kv.get(
                int(host.tables[r, (p - 1) // self.S]) * self.S + (p - 1) % self.S)
            assert before is not None, f"I9: row {r} position {p} attends to unwritten KV"
            self.kv[int(host.slots[t])] = before + (tok,)
        out = [sim.fake_next(seed, self.kv[int(host.slots[i])])
               for i, seed in zip(host.sample_rows.tolist(), host.ints[1].tolist())]
        return StepOut(torch.tensor(out, dtype=torch.int64))


class PipelineMachine(RuleBasedStateMachine):

    @initialize(cfg=sim.sched_configs())
    @guarded
    def setup(self, cfg):
        self.cfg = cfg
        self.sync, self.piped = SyncLane(cfg), PipedLane(cfg)
        self.engine = Engine(FakeRunner(cfg), cfg, pipeline=True)
        self.requests = {}          # key (rid#incarnation) -> Request
        self.key_of = {}            # rid -> the key of its latest request
        self.outputs = {self.sync: {}, self.piped: {}}   # lane -> key -> tokens
        self.ended = {self.sync: {}, self.piped: {}}     # lane -> key -> (reason, decided by core?)

    def lanes(self):
        return (self.sync, self.piped)

    @rule(prompt=sim.prompts(), params=sim.sampling(), seed=st.integers(0, 3))
    def arrive(self, prompt, params, seed):
        self._arrive(f"r{len(self.key_of)}", prompt, params, seed)

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), suffix=st.lists(st.integers(1, 3), max_size=4), params=sim.sampling(),
          seed=st.integers(0, 3))
    def arrive_sharing(self, data, suffix, params, seed):
        """A follow-up: part of an earlier request's prompt and (synchronous) output."""
        base = data.draw(st.sampled_from(sorted(self.requests)), label="base")
        text = self.requests[base].prompt + tuple(self.outputs[self.sync][base])
        self._arrive(f"r{len(self.key_of)}", text[:data.draw(st.integers(0, len(text)), label="cut")]
                     + tuple(suffix), params, seed)

    @precondition(lambda self: any(self._ended_everywhere(r) for r in self.key_of))
    @rule(data=st.data(), prompt=sim.prompts(), params=sim.sampling(), seed=st.integers(0, 3))
    def arrive_again(self, data, prompt, params, seed):
        """A new request under the id of one that has ended (maybe with a row still in flight)."""
        rid = data.draw(st.sampled_from(sorted(r for r in self.key_of if self._ended_everywhere(r))))
        self._arrive(rid, prompt, params, seed)

    def _ended_everywhere(self, rid) -> bool:
        return all(rid not in lane.state.seqs for lane in self.lanes())

    @guarded
    def _arrive(self, rid, prompt, params, seed):
        req = Request(rid, prompt, params, seed, len(self.requests))
        refused = []
        for add in (lambda: self.sync.add(req), lambda: self.piped.add(req),
                    lambda: self.engine.add(req)):
            try:
                add()
                refused.append(False)
            except (InvalidPrompt, RequestTooLarge):      # admit's documented refusals
                refused.append(True)
        assert len(set(refused)) == 1, f"{rid}: admitted by one engine, refused by another"
        if refused[0]:
            return
        key = self.key_of[rid] = f"{rid}#{sum(k.startswith(rid + '#') for k in self.requests)}"
        self.requests[key] = req
        for lane in self.lanes():
            self.outputs[lane][key] = []

    @rule(n=st.integers(1, 4))
    def steps(self, n):
        for _ in range(n):
            self.step_sync()
            self.step_piped()

    @guarded
    def step_sync(self):
        if self.sync.unfinished():
            self.record(self.sync, self.sync.step())

    @guarded
    def step_piped(self, digest=True):
        assert self.engine.has_unfinished() == self.piped.unfinished(), "I17: engine and lane disagree"
        if not self.piped.unfinished():
            return
        deltas, got = self.piped.step(), self.engine.step()
        assert (got.rids, got.tokens, dict(got.finished)) == \
            (deltas.rids, deltas.tokens, dict(deltas.finished)), "I17: the engine's deltas differ"
        if digest:
            self.same_state()
        self.record(self.piped, deltas)

    def same_state(self):
        assert state_digest(self.engine.state) == state_digest(self.piped.state), \
            "I17: the engine's state differs from the pipelined order of transitions"

    def record(self, lane, deltas):
        for d in deltas:
            key = self.key_of[d.rid]
            self.outputs[lane][key] += d.new_tokens
            if d.finish_reason:
                self.ended[lane][key] = (d.finish_reason, True)

    @precondition(lambda self: any(lane.state.seqs for lane in self.lanes()))
    @rule(data=st.data(), reason=st.sampled_from(["abort", "stop"]))
    @guarded
    def finish_outside_core(self, data, reason):
        """An abort, or a stop string the shell found: in each engine where it is still live."""
        rid = data.draw(st.sampled_from(sorted(set(self.sync.state.seqs) | set(self.piped.state.seqs))))
        for lane in self.lanes():
            if rid in lane.state.seqs:
                lane.finish(rid)
                self.ended[lane][self.key_of[rid]] = (reason, False)
        if rid in self.engine.state.seqs:
            self.engine.finish(rid, reason)

    @invariant()
    def invariants_hold(self):
        if not hasattr(self, "cfg") or self.broken:
            return
        for lane in self.lanes():
            state = lane.state
            check_state(state, self.cfg)                              # I1-I5, I7, I8, I12, I16
            for rid in state.running:                                 # I9 (simulated)
                seq = state.seqs[rid]
                lane.kv.check(seq, seq.num_computed)
            live = {self.key_of[r] for r in state.seqs}               # I7: nothing vanishes
            ended = set(self.ended[lane])
            assert live | ended == set(self.requests) and not live & ended, "I7"

    def teardown(self):
        if not hasattr(self, "cfg") or self.broken:
            return
        # Liveness (as in the scheduler machine); a pipelined step may spend a row on a
        # sequence that has already finished, so the piped lane gets twice the steps.
        bound = 2 * sum(len(r.prompt) + r.params.max_tokens for r in self.requests.values()) + 4
        drain = (self.step_sync, self.sync, bound), (lambda: self.step_piped(digest=False), self.piped, 2 * bound)
        for step, lane, steps in drain:
            for _ in range(steps):
                if not lane.unfinished():
                    break
                step()
                self.invariants_hold()
            assert not lane.unfinished(), f"I7: {sorted(lane.state.seqs)} still live after {steps} steps"
        self.same_state()      # the drain compared deltas; its end state shows any divergence
        if self.engine.dropped_rows:
            event("pipelined: the engine dropped rows")
        for key, req in self.requests.items():                       # I10, I17
            want, why = sim.reference_output(req, self.cfg.max_model_len)
            for inv, lane in (("I10", self.sync), ("I17", self.piped)):
                got, (reason, by_core) = tuple(self.outputs[lane][key]), self.ended[lane][key]
                if by_core:
                    assert (got, reason) == (want, why), f"{inv}: {key} gave {got} {reason}, alone {want} {why}"
                else:
                    assert want[:len(got)] == got, f"{inv}: {key} gave {got}, not a prefix of {want}"


def test_I1_I2_I3_I4_I5_I6_I7_I8_I9_I10_I11_I12_I16_I17_pipeline_machine():
    run_state_machine_as_test(PipelineMachine, settings=settings(max_examples=budget(150)))
