"""A Hypothesis state machine over admit / schedule / commit / finish with the simulated model
of properties/sim.py: random arrivals with shared prefixes, random prompt and output lengths,
tiny pools (preemption storms), tiny token budgets (chunking), aborts and stop-string
finishes. After every rule: I1-I8 and I12 (core/invariants.py), I11, I9 through the
simulated KV, and I15: the naive pool of properties/reference_pool.py, driven through the pool
operations each transition implies (preemptions free victims' tables, appends and admissions
allocate, hits acquire, commit indexes full blocks and frees finished tables, finishes free),
must hand out the same blocks and end with the same refcounts, free order and reachable
cached blocks (a table freed in the wrong order evicts cached prefixes first). At the end it
drains the engine: every request must finish (liveness, I7) with exactly the tokens it
generates alone (I10, simulated).
"""
from __future__ import annotations

import attrs
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from functional_llm.core import commit as C
from functional_llm.core import scheduler as S
from functional_llm.core.blocks import blocks_for, chain_hash
from functional_llm.core.invariants import check_state
from functional_llm.core.records import Request, new_state
from functional_llm.errors import InvalidPrompt, RequestTooLarge
from properties import sim
from properties.profiles import budget
from properties.reference_pool import NaivePool
from properties.sim import guarded
from properties.test_pool_machine import _free_order, _reachable


class PoolMirror:
    """The naive pool, driven through the pool operations a scheduler transition performed,
    read off its input state, output state and Plan, in the order the scheduler does them."""

    def __init__(self, cfg):
        self.model, self.S = NaivePool(cfg.num_blocks, cfg.block_size), cfg.block_size
        self.caching = cfg.enable_prefix_caching

    def schedule(self, before, after, plan) -> None:
        victims = list(plan.preempted)       # in the order they were preempted
        for rid, start in zip(plan.rids, plan.starts):
            old, new = before.seqs[rid], after.seqs[rid]
            if rid in before.running:        # append: victims go until the new blocks fit
                have = len(old.block_table)
                while len(new.block_table) - have > len(self.model.free_order) and victims:
                    self.model.free(before.seqs[victims.pop(0)].block_table)
            else:                            # admission: the cached prefix, then new blocks
                have = start // self.S
                hit = self.model.match(new.tokens) if self.caching else []
                assert hit == list(new.block_table[:have]), "I15: prefix match"
                self.model.acquire(hit)
            got = self.model.allocate(len(new.block_table) - have)
            assert got == list(new.block_table[have:]), "I15: allocation order"
        for rid in victims:                  # the youngest preempting itself, last
            self.model.free(before.seqs[rid].block_table)

    def advance(self, before, after, plan) -> None:
        for rid in plan.rids:                # newly indexed full blocks, row by row
            seq, table = after.seqs[rid], after.seqs[rid].block_table
            for j in range(len(before.seqs[rid].block_hashes), len(seq.block_hashes)):
                self.model.register(int(table[j]), tuple(seq.tokens[:(j + 1) * self.S]),
                                    int(table[j - 1]) if j else None)

    def free(self, seq) -> None:
        self.model.free(seq.block_table)

    def check(self, pool) -> None:
        assert list(pool.ref) == self.model.ref, "I15: refcounts"
        assert _free_order(pool) == self.model.free_order, "I15: free order"
        assert _reachable(pool) == {b: p for b, (p, _) in self.model.cached.items()}, "I15: cached blocks"


class SchedulerMachine(RuleBasedStateMachine):
    hashes = (None,)    # None: the engine's chain hash; the weak-hash machine overrides it
    compare = True      # I15: the naive pool knows no hashes, so not with weak ones

    @initialize(cfg=sim.sched_configs(), data=st.data())
    @guarded
    def setup(self, cfg, data):
        hash_fn = data.draw(st.sampled_from(type(self).hashes), label="hash_fn")
        self.cfg = attrs.evolve(cfg, hash_fn=hash_fn)
        self.hash = self.cfg.hash_fn or chain_hash
        self.state = new_state(self.cfg)
        self.kv = sim.FakeKV(self.cfg.num_blocks, self.cfg.block_size)
        self.mirror = PoolMirror(self.cfg) if self.compare else None
        self.requests, self.outputs = {}, {}
        self.ended = {}             # rid -> (finish reason, decided by core?)

    @rule(prompt=sim.prompts(), params=sim.sampling(), seed=st.integers(0, 3))
    def arrive(self, prompt, params, seed):
        self._arrive(prompt, params, seed)

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), suffix=st.lists(st.integers(1, 3), max_size=4), params=sim.sampling(),
          seed=st.integers(0, 3))
    def arrive_sharing(self, data, suffix, params, seed):
        """A follow-up: part of an earlier request's prompt and output, then new tokens."""
        base = data.draw(st.sampled_from(sorted(self.requests)), label="base")
        text = self.requests[base].prompt + tuple(self.outputs[base])
        self._arrive(text[:data.draw(st.integers(0, len(text)), label="cut")] + tuple(suffix),
                     params, seed)

    @guarded
    def _arrive(self, prompt, params, seed):
        rid = f"r{len(self.requests)}"
        req = Request(rid, prompt, params, seed, len(self.requests))
        longest = min(len(prompt) + params.max_tokens, self.cfg.max_model_len)
        try:
            self.state = S.admit(self.state, self.cfg, req)
        except InvalidPrompt:       # admit's documented refusals, and only those
            assert not prompt or len(prompt) >= self.cfg.max_model_len
            return
        except RequestTooLarge:
            assert blocks_for(longest, self.cfg.block_size) > self.cfg.num_blocks
            return
        assert 0 < len(prompt) < self.cfg.max_model_len
        assert blocks_for(longest, self.cfg.block_size) <= self.cfg.num_blocks
        assert self.state.waiting[-1] == rid and self.state.seqs[rid].num_computed == 0
        self.requests[rid], self.outputs[rid] = req, []

    @rule(n=st.integers(1, 4))
    def steps(self, n):
        for _ in range(n):
            self.step()

    @guarded
    def step(self):
        before = self.state
        state, plan = S.schedule(before, self.cfg)
        sim.check_plan(before, state, plan, self.cfg)              # I5 (in-step), I6, I11
        check_state(state, self.cfg, self.hash, plan)              # I1-I5, I7, I12 mid-step
        tokens = sim.device_step(self.kv, state, plan)             # I9 on every read
        advanced = C.advance(state, self.cfg, plan)                 # commit = resolve . advance
        self.state, deltas = C.resolve(advanced, self.cfg, plan, tokens)
        if self.mirror is not None:                                  # I15
            self.mirror.schedule(before, state, plan)
            self.mirror.advance(state, advanced, plan)
            for rid in deltas.finished:
                self.mirror.free(advanced.seqs[rid])
        for name, n in attrs.asdict(self.state.counters).items():   # what the run exercised
            if n > getattr(before.counters, name) and name not in ("steps", "prefill_tokens"):
                event(name)
        for d in deltas:
            self.outputs[d.rid] += d.new_tokens
            if d.finish_reason:
                self.ended[d.rid] = (d.finish_reason, True)

    @precondition(lambda self: self.state.seqs)
    @rule(data=st.data(), reason=st.sampled_from(["abort", "stop"]))
    @guarded
    def finish_outside_core(self, data, reason):
        """An abort, or a stop string the shell found (core cannot see text)."""
        rid = data.draw(st.sampled_from(sorted(self.state.seqs)))
        if self.mirror is not None:
            self.mirror.free(self.state.seqs[rid])
        self.state = C.finish(self.state, rid)
        self.ended[rid] = (reason, False)

    @invariant()
    def invariants_hold(self):
        if not hasattr(self, "state") or self.broken:
            return
        check_state(self.state, self.cfg, self.hash)                # I1-I5, I6 seats, I7, I8, I12
        if self.mirror is not None:
            self.mirror.check(self.state.pool)                       # I15
        for rid in self.state.running:                               # I9 (simulated)
            seq = self.state.seqs[rid]
            self.kv.check(seq, seq.num_computed)
        live = set(self.state.seqs)                                  # I7: nothing vanishes
        assert live | set(self.ended) == set(self.requests) and not live & set(self.ended), "I7"

    def teardown(self):
        if not hasattr(self, "state") or self.broken:
            return
        # Liveness: the oldest running request gains >= 1 token per step and is never
        # preempted (it fits the pool alone), so the work left bounds the steps left.
        bound = 2 * sum(len(r.prompt) + r.params.max_tokens for r in self.requests.values()) + 4
        for _ in range(bound):
            if not self.state.seqs:
                break
            self.step()
            self.invariants_hold()
        assert not self.state.seqs, f"I7: {sorted(self.state.seqs)} still live after {bound} steps"
        for rid, req in self.requests.items():                      # I10 (simulated)
            want, why = sim.reference_output(req, self.cfg.max_model_len)
            got, (reason, by_core) = tuple(self.outputs[rid]), self.ended[rid]
            if by_core:
                assert (got, reason) == (want, why), f"I10: {rid} gave {got} {reason}, alone {want} {why}"
            else:
                assert want[:len(got)] == got, f"I10: {rid} gave {got}, not a prefix of {want}"


class WeakHashSchedulerMachine(SchedulerMachine):
    hashes = sim.WEAK_HASHES
    compare = False


def test_I1_I2_I3_I4_I5_I6_I7_I8_I9_I10_I11_I12_I15_scheduler_machine():
    run_state_machine_as_test(SchedulerMachine, settings=settings(max_examples=budget(250)))


def test_I4_I9_I10_scheduler_machine_with_weak_hash():
    """Colliding chain hashes everywhere: only the token and parent comparison of
    match_prefix keeps wrong KV from being served."""
    run_state_machine_as_test(WeakHashSchedulerMachine, settings=settings(max_examples=budget(150)))
