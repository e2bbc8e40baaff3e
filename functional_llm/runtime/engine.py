"""The engine: the impure shell that owns the current core state and the Runner (the device
half, runtime/runner.py), and drives one step as   schedule -> stage -> launch -> commit.

The state is only ever replaced, never edited: `self.state` always holds a value some pure
transition returned. The KV pool is the one in-place object (a donated buffer).
"""
from __future__ import annotations

from types import MappingProxyType

import attrs
import numpy as np
import torch

from functional_llm.core import commit as C
from functional_llm.core import scheduler as S
from functional_llm.core import trace as T
from functional_llm.core.records import Counters, Deltas, Request, SchedConfig, TokenLogprobs, new_state
from functional_llm.errors import EngineStalled
from functional_llm.runtime.runner import Feed, Runner, StepOut
from functional_llm.runtime.staging import HostInputs, stage_host


class _InFlight:
    """A launched step: its plan, its outputs on the device and their copy to the host."""

    def __init__(self, plan, out: StepOut, state=None, host: HostInputs | None = None):
        """state, host: the step's (post-schedule) state and inputs, read only when the step
        computed logprobs, to know whose they are."""
        self.plan, self.device_tokens, self.gone = plan, out.tokens, set()
        self.sampled = [r for r, s in zip(plan.rids, plan.sample) if s]
        self.row_of = {rid: k for k, rid in enumerate(self.sampled)}
        arrays = (out.tokens, *(out.logprobs or ()), *(out.prompt or ()))
        self.want = {} if out.logprobs is None else {   # rid -> logprobs k
            rid: k for rid in self.sampled if (k := state.seqs[rid].req.params.logprobs) is not None}
        self.prompt = None   # (rid per prompt row, target ids, k per rid)
        if out.prompt is not None:
            rids = [plan.rids[r] for r in host.row_of_token(host.prompt_rows)]
            self.prompt = rids, host.prompt_ids.tolist(), {
                rid: state.seqs[rid].req.params.prompt_logprobs for rid in set(rids)}
        if out.tokens.is_cuda:
            self.host = [torch.empty(a.shape, dtype=a.dtype, pin_memory=True)
                         .copy_(a, non_blocking=True) for a in arrays]
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = list(arrays), None

    def tokens(self) -> list:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host[0].tolist()

    def with_logprobs(self, deltas: Deltas) -> Deltas:
        """deltas plus the logprobs of this step's rows that asked (after tokens())."""
        if not self.want and self.prompt is None:
            return deltas
        toks, *lists = [h.tolist() for h in self.host]

        def entry(block, i, token, k):   # block: (logprob, rank, top values, top ids) lists
            lp, rank, top_v, top_i = block
            return TokenLogprobs(token, lp[i], rank[i], tuple(zip(top_i[i][:k], top_v[i][:k])))
        sampled = {rid: entry(lists[:4], i, toks[i], self.want[rid])
                   for i, rid in enumerate(self.sampled) if rid in self.want and rid not in self.gone}
        prompt = {}
        if self.prompt is not None:
            rids, targets, ks = self.prompt
            for i, (rid, tok) in enumerate(zip(rids, targets)):
                prompt.setdefault(rid, []).append(entry(lists[-4:], i, tok, ks[rid]))
        return attrs.evolve(deltas, logprobs=MappingProxyType(sampled), prompt_logprobs=MappingProxyType(
            {rid: tuple(entries) for rid, entries in prompt.items()}))


class Engine:
    """Incremental API: add_request / step / abort. Not thread-safe (one caller drives it).

    Synchronous loop: schedule -> launch -> wait for tokens -> commit. Pipelined loop
    (pipeline=True): schedule k -> launch k -> resolve k-1 -> advance k, so the host's
    scheduling and bookkeeping of one step run while the device computes the previous one;
    the decode rows of step k read their input ids from step k-1's tokens on the device
    (Feed), and each step() returns the deltas of the step before. A sequence that finishes
    in resolve k-1 was already planned in step k: that row is wasted and dropped (Plan.without)
    before advance k and resolve k; its blocks are released at once (step k's write into them
    precedes, on the device stream, any later step that reuses them, and lands past every
    indexed block)."""

    def __init__(self, runner: Runner, sched: SchedConfig, pipeline: bool = False,
                 trace: T.TraceWriter | None = None):
        """trace: records every input, Plan, token and state digest (core/trace.py); with
        pipeline, the pipelined loop's order too (its header must say pipeline=True), so a
        replay re-runs the same transitions in the same order."""
        self.runner, self.sched, self.pipeline, self.trace = runner, sched, pipeline, trace
        self.state = new_state(sched)
        self._flight: _InFlight | None = None
        self.dropped_rows = 0   # pipelined: planned rows whose sequence ended while in flight

    # -- inputs from outside core ---------------------------------------------------------
    def check(self, req: Request) -> None:
        """Raise the typed error add() would raise, without admitting anything."""
        S.check_request(self.sched, req)

    def add(self, req: Request) -> None:
        """Admit a request built and validated by the shell, as is (admit stamps its arrival)."""
        self.state = S.admit(self.state, self.sched, req)  # raises before any change
        if self.trace is not None:
            self.trace.write(T.arrival_record(self.state.seqs[req.rid].req, self.state.counters.steps))

    def finish(self, rid: str, reason: str = "abort") -> None:
        """End a request for a reason decided outside core (stop string, abort)."""
        self.state = C.finish(self.state, rid)
        if self._flight is not None:
            self._flight.gone.add(rid)
        if self.trace is not None:
            self.trace.write(T.finish_record(rid, reason, self.state.counters.steps))

    def has_unfinished(self) -> bool:
        return bool(self.state.waiting or self.state.running or self._flight)

    @property
    def counters(self) -> Counters:
        return self.state.counters

    @property
    def kv(self) -> torch.Tensor:
        return self.runner.kv

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> Deltas:
        """One step; returns the deltas of the step resolved now (the pipelined loop: of the
        step before). Raises EngineStalled, state unchanged, when nothing can ever run."""
        if self.pipeline:
            return self._pipelined_step()
        state, plan = S.schedule(self.state, self.sched)
        self._check_stall(plan)
        if not plan.rids:
            self.state, tokens, deltas = state, [], Deltas()
        else:
            host = stage_host(state, plan, self.sched)
            flight = _InFlight(plan, self.runner.launch(host), state, host)
            tokens = flight.tokens()
            self.state, deltas = C.commit(state, self.sched, plan, tokens)
            deltas = flight.with_logprobs(deltas)
        if self.trace is not None:
            self.trace.write(T.step_record(state.counters.steps - 1, plan, tokens, self.state, deltas))
        return deltas

    def _check_stall(self, plan) -> None:
        """Nothing scheduled, nothing running or in flight, yet requests wait: the next step
        would see the same state (schedule changed only the step count), so the caller would
        loop forever. Raised before self.state changes."""
        if not plan.rids and self.state.waiting and not self.state.running and self._flight is None:
            cfg = self.sched
            raise EngineStalled("request_id", self.state.waiting, (
                f"cannot be scheduled with nothing running (max_num_seqs={cfg.max_num_seqs}, "
                f"max_num_batched_tokens={cfg.max_num_batched_tokens}, num_kv_blocks={cfg.num_blocks} of "
                f"{cfg.block_size} tokens, {self.state.pool.num_free} free); abort them"))

    def _pipelined_step(self) -> Deltas:
        state, plan = S.schedule(self.state, self.sched)
        self._check_stall(plan)
        self.state, prev, launched = state, self._flight, None
        if plan.rids:
            host = stage_host(self.state, plan, self.sched)
            feed = None
            if prev is not None:
                dst = np.flatnonzero(host.ids == C.PENDING)
                feed = Feed(dst, prev.device_tokens, np.fromiter(
                    (prev.row_of[plan.rids[r]] for r in host.row_of_token(dst)), np.int64, len(dst)))
            launched = _InFlight(plan, self.runner.launch(host, feed), self.state, host)
        tokens, deltas = [], Deltas()   # the trace records plan k, step k-1's samples
        if prev is not None:
            prev_plan, keep = prev.plan.without(prev.gone)
            self.dropped_rows += len(prev.plan.rids) - len(prev_plan.rids)
            tokens = prev.tokens()
            self.state, deltas = C.resolve(self.state, self.sched, prev_plan,
                                           [t for t, k in zip(tokens, keep) if k])
            deltas = prev.with_logprobs(deltas)
            if launched is not None:
                launched.gone.update(deltas.finished)
        if launched is not None:
            self.state = C.advance(self.state, self.sched, plan.without(launched.gone)[0])
        self._flight = launched
        if self.trace is not None:
            self.trace.write(T.pipelined_step_record(
                self.state.counters.steps - 1, plan, launched.gone if launched else (),
                prev and prev.plan, prev.gone if prev else (), tokens, self.state, deltas))
        return deltas

    def device_tokens(self, state, plan, fed: dict | None = None) -> list:
        """Run the device step for a scheduled (state, plan): writes the KV, returns the sampled
        tokens. Also what `functional-llm replay --model` calls for each recorded step.
        fed: rid -> the token to read where the host says PENDING (a pipelined trace's step
        k-1 samples, which the engine fed on the device)."""
        host = stage_host(state, plan, self.sched)
        if fed:
            ids = host.ids.copy()
            dst = np.flatnonzero(ids == C.PENDING)
            ids[dst] = [fed[plan.rids[r]] for r in host.row_of_token(dst)]
            host = attrs.evolve(host, ids=ids)
        return self.runner.launch(host).tokens.tolist()
