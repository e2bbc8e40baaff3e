"""Traces: a JSON-lines record of everything core/ needs to redo a run, and its replay.

A trace is one header line, then one line per external input (an arrival, or a finish decided
outside core: an abort, a stop string) and one line per step (its Plan, the sampled tokens,
the finishes and a digest), in the order they happened. Core transitions are deterministic
functions of those lines, so replaying them through admit / finish / schedule / commit must
reproduce every Plan and digest, with no model (docs/transitions.md, I14).

A pipelined engine's trace (header "pipeline": true) records its loop instead: step k's line
holds step k's Plan, the samples of step k-1 (resolved in step k) and the rows each half
dropped; replay runs schedule k, resolve k-1, advance k in that order (pipelined_step_record).

Every line is a JSON object with a "kind" ("header", "arrive", "finish", "step"); "step"
on input lines is the index of the step they precede. Never pickle: a trace is data.
Pure except TraceWriter (appends lines to a file) and read_trace (reads them).
"""
from __future__ import annotations

import json
from typing import Callable, Iterable, Optional

import attrs
import numpy as np
import xxhash

from functional_llm.core import commit as C
from functional_llm.core import scheduler as S
from functional_llm.core.records import (Deltas, Plan, Request, SamplingParams, SchedConfig,
                                         SchedState, new_state)
from functional_llm.errors import FunctionalLLMError

FORMAT = 2          # 2: the header says which loop was recorded ("pipeline"); 1 is synchronous
READABLE = (1, 2)
_PLAN_FIELDS = ("rids", "starts", "counts", "sample", "preempted")


class TraceError(FunctionalLLMError):
    """A trace file that cannot be read or replayed (malformed line, unknown format)."""


# -- digest ------------------------------------------------------------------------------------
def state_digest(state: SchedState, deltas: Deltas = Deltas()) -> str:
    """128-bit hex digest of the core state and of what the last step emitted (its Deltas).

    Stable across processes and machines: xxh3 over explicit little-endian integers and
    UTF-8 strings, never Python's salted hash(). Covers the queues, every Seq, the pool
    (refcounts, free order, prefix index) and the counters; the deltas make a tampered token
    visible even when its sequence finished in that step and left the state."""
    h = xxhash.xxh3_128()

    def ints(values, dtype="<i8"):
        a = np.asarray(list(values), dtype=dtype)
        h.update(np.asarray(a.size, dtype="<i8").tobytes())
        h.update(a.tobytes())

    def text(s: str):
        b = s.encode()
        ints((len(b),))
        h.update(b)

    for queue in (state.waiting, state.running):
        ints((len(queue),))
        for rid in queue:
            text(rid)
    for rid, seq in sorted(state.seqs.items()):   # request ids are unique: Seqs never compared
        text(rid)
        ints(seq.tokens)
        ints((seq.num_computed, -1 if seq.num_cached is None else seq.num_cached))
        ints(seq.block_table.tolist())
        ints(seq.block_hashes, "<u8")
    pool = state.pool
    ints(pool.ref)
    ints(pool.queue[i] for i in range(pool.head, len(pool.queue))      # live free order only:
         if pool.ref[pool.queue[i]] == 0 and pool.queued_at[pool.queue[i]] == i)  # no layout
    for b, info in sorted(pool.cached.items()):
        ints((b, info.epoch) + ((-1, -1) if info.parent is None else tuple(info.parent)))
        ints((info.hash,), "<u8")
        ints(info.tokens)
    ints((k for k, _ in sorted(pool.by_hash.items())), "<u8")
    ints(v for _, v in sorted(pool.by_hash.items()))
    ints(attrs.astuple(state.counters) + (pool.next_epoch,))
    for rid, tok in zip(deltas.rids, deltas.tokens):
        text(rid)
        ints((tok,))
    for rid, reason in sorted(deltas.finished.items()):
        text(rid)
        text(reason)
    return h.hexdigest()


# -- records -------------------------------------------------------------------------------------
def config_to_json(cfg: SchedConfig) -> dict:
    fn = cfg.hash_fn   # recorded by name: replay must be handed the function itself
    return {**attrs.asdict(cfg), "eos_token_ids": list(cfg.eos_token_ids),
            "hash_fn": None if fn is None else f"{fn.__module__}.{fn.__qualname__}"}


def config_from_json(d: dict, hash_fn: Optional[Callable] = None) -> SchedConfig:
    """hash_fn: needed (and only accepted) when the trace was recorded with a custom one."""
    if (d.get("hash_fn") is None) != (hash_fn is None):
        raise TraceError("hash_fn", d.get("hash_fn"), "replay needs the recorded chain hash")
    return SchedConfig(**{**d, "eos_token_ids": tuple(d["eos_token_ids"]), "hash_fn": hash_fn})


def header_record(cfg: SchedConfig, shell: Optional[dict] = None, pipeline: bool = False) -> dict:
    """shell: what core cannot know (model, dtype, device, versions, determinism flags).
    pipeline: the steps are the pipelined loop's (pipelined_step_record)."""
    return {"kind": "header", "format": FORMAT, "pipeline": pipeline, "config": config_to_json(cfg),
            "digest": "xxh3_128", "shell": shell or {}}


def arrival_record(req: Request, step: int) -> dict:
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(req.params).items()}
    return {"kind": "arrive", "step": step, "rid": req.rid, "prompt": list(req.prompt),
            "params": params, "seed": req.seed, "arrival": req.arrival}


def request_from_record(r: dict) -> Request:
    return Request(r["rid"], tuple(r["prompt"]), SamplingParams(**r["params"]), r["seed"], r["arrival"])


def finish_record(rid: str, reason: str, step: int) -> dict:
    """A finish decided outside core: reason 'abort' (the user) or 'stop' (a stop string)."""
    return {"kind": "finish", "step": step, "rid": rid, "reason": reason}


def plan_to_json(plan: Plan) -> dict:
    return {f: list(getattr(plan, f)) for f in _PLAN_FIELDS}


def step_record(step: int, plan: Plan, tokens, state: SchedState, deltas: Deltas) -> dict:
    """state: the state after the step's commit; deltas: what the commit returned."""
    return {"kind": "step", "step": step, "plan": plan_to_json(plan), "tokens": list(tokens),
            "finished": dict(deltas.finished), "digest": state_digest(state, deltas)}


def pipelined_step_record(step: int, plan: Plan, advance_dropped, prev_plan: Optional[Plan],
                          resolve_dropped, tokens, state: SchedState, deltas: Deltas) -> dict:
    """Step k of the pipelined loop (schedule k, launch k, resolve k-1, advance k). plan: step
    k as scheduled; advance_dropped: its rids whose rows advance k skipped; prev_plan: step
    k-1 as scheduled (None: nothing was in flight), resolve_dropped: its rids whose rows
    resolve k-1 skipped; tokens: every sample of step k-1, dropped rows' included (what the
    device returned); state: after advance k; deltas: what resolve k-1 returned."""
    return {**step_record(step, plan, tokens, state, deltas),
            "advance_dropped": [r for r in plan.rids if r in advance_dropped],
            "resolves": None if prev_plan is None else step - 1,
            "resolve_dropped": [r for r in (prev_plan.rids if prev_plan else ()) if r in resolve_dropped]}


def encode(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))


def decode(line: str, where: str = "<trace>") -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError("trace", where, f"not a JSON line: {e}") from None
    if not isinstance(record, dict) or "kind" not in record:
        raise TraceError("trace", where, "each line must be an object with a 'kind'")
    return record


class TraceWriter:
    """Appends records to a JSON-lines file, one flushed line each, so a crashed run still
    leaves a readable (and replayable) prefix. The shell's only trace object."""

    def __init__(self, path, header: dict):
        self._file = open(path, "w", encoding="utf-8")
        self.write(header)

    def write(self, record: dict) -> None:
        self._file.write(encode(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_trace(path) -> list[dict]:
    """Raises TraceError for a missing file, a malformed line or a missing header."""
    try:
        with open(path, encoding="utf-8") as f:
            records = [decode(line, f"{path}:{i + 1}") for i, line in enumerate(f) if line.strip()]
    except OSError as e:
        raise TraceError("trace", str(path), str(e)) from None
    if not records or records[0]["kind"] != "header" or records[0].get("format") not in READABLE:
        raise TraceError("trace", str(path), f"first line must be a header of format {READABLE}")
    return records


# -- replay -----------------------------------------------------------------------------------
@attrs.frozen(slots=True)
class Divergence:
    step: int
    what: str          # 'input' | 'plan' | 'tokens' | 'finished' | 'digest'
    expected: object   # what the trace says
    actual: object     # what the replay produced


@attrs.frozen(slots=True)
class ReplayReport:
    steps: int                          # steps replayed (and matched) before any divergence
    divergence: Optional[Divergence]
    state: SchedState                   # the state where the replay stopped

    @property
    def ok(self) -> bool:
        return self.divergence is None


def replay(records: Iterable[dict], step_tokens: Optional[Callable] = None,
           hash_fn: Optional[Callable] = None, on_step: Optional[Callable] = None) -> ReplayReport:
    """Redo a trace's core transitions and stop at the first line they do not reproduce.

    step_tokens(state, plan) -> tokens: re-run the model for each step (the recorded tokens
    must come out); None feeds the recorded tokens. on_step(state, plan): called after each
    matched step (plots, statistics). Raises TraceError for a malformed trace (no header,
    unknown kind); every disagreement is a Divergence, not an exception."""
    it = iter(records)
    header = next(it, None)
    if header is None or header.get("kind") != "header" or header.get("format") not in READABLE:
        raise TraceError("trace", "<header>", f"first record must be a header of format {READABLE}")
    cfg = config_from_json(header["config"], hash_fn)
    state, steps = new_state(cfg), 0
    rest_of_step = _pipelined_step if header.get("pipeline") else _sync_step
    flight = None   # the launched, unresolved step (pipelined loop only)

    def stop(step, what, expected, actual):
        return ReplayReport(steps, Divergence(step, what, expected, actual), state)

    for r in it:
        kind, step = r.get("kind"), r.get("step")
        if kind in ("arrive", "finish", "step") and step != state.counters.steps:
            return stop(step, "input", f"a record for step {state.counters.steps}", f"step {step}")
        if kind == "arrive":
            try:
                state = S.admit(state, cfg, request_from_record(r))
            except (FunctionalLLMError, TypeError, KeyError) as e:
                return stop(step, "input", "an admissible request", repr(e))
            if state.seqs[r["rid"]].req.arrival != r["arrival"]:   # admit numbers arrivals
                return stop(step, "input", f"arrival {r['arrival']}", state.seqs[r["rid"]].req.arrival)
        elif kind == "finish":
            if r.get("rid") not in state.seqs:
                return stop(step, "input", f"live request {r.get('rid')!r}", sorted(state.seqs))
            state = C.finish(state, r["rid"])
            if flight is not None:     # as Engine.finish: its row in flight will be dropped
                flight = attrs.evolve(flight, gone=flight.gone | {r["rid"]})
        elif kind == "step":
            state, plan = S.schedule(state, cfg)
            if plan_to_json(plan) != r.get("plan"):
                return stop(step, "plan", r.get("plan"), plan_to_json(plan))
            state, deltas, flight, bad = rest_of_step(state, cfg, plan, r, flight, step_tokens)
            if bad is not None:
                return stop(step, *bad)
            if dict(deltas.finished) != r.get("finished"):
                return stop(step, "finished", r.get("finished"), dict(deltas.finished))
            if (digest := state_digest(state, deltas)) != r.get("digest"):
                return stop(step, "digest", r.get("digest"), digest)
            steps += 1
            if on_step is not None:
                on_step(state, plan)
        else:
            raise TraceError("trace", kind, "unknown record kind")
    return ReplayReport(steps, None, state)


def _sync_step(state, cfg, plan, r, flight, step_tokens):
    """The rest of a synchronous step after schedule: the device, then commit. Returns (state,
    deltas, flight, None) or (..., (what, expected, actual)) at the first mismatch; flight is
    None (nothing stays in flight), as _pipelined_step's signature."""
    tokens = r.get("tokens")
    if not isinstance(tokens, list) or len(tokens) != sum(plan.sample):
        return state, None, None, ("tokens", f"{sum(plan.sample)} sampled tokens", tokens)
    if not plan.rids:  # the engine skips commit (and the device) for an empty plan
        return state, Deltas(), None, None
    produced = tokens if step_tokens is None else list(step_tokens(state, plan))
    if produced != tokens:
        return state, None, None, ("tokens", tokens, produced)
    return (*C.commit(state, cfg, plan, tokens), None, None)


@attrs.frozen(slots=True)
class _Flight:
    """The pipelined loop's launched, unresolved step, as runtime/engine.py's _InFlight: its
    plan as scheduled, the rids whose rows are dropped (ended while it was in flight), and
    the tokens the model gave at launch (model replay only)."""

    plan: Plan
    gone: frozenset = frozenset()
    produced: Optional[list] = None


def _pipelined_step(state, cfg, plan, r, flight, step_tokens):
    """The rest of pipelined step k after schedule k, in the engine's order: launch k,
    resolve k-1 (its plan without the rows of sequences that ended in flight), advance k
    (without the rows of those that resolve k-1 finished). The record carries step k-1's
    tokens. Returns (state, deltas, flight, None or (what, expected, actual))."""
    tokens, deltas, produced, gone = r.get("tokens"), Deltas(), None, frozenset()
    want = 0 if flight is None else sum(flight.plan.sample)
    if not isinstance(tokens, list) or len(tokens) != want:
        return state, None, flight, ("tokens", f"{want} sampled tokens of the step in flight", tokens)
    if flight is not None and flight.produced is not None and flight.produced != tokens:
        return state, None, flight, ("tokens", tokens, flight.produced)
    if plan.rids and step_tokens is not None:                       # launch k
        fed = None if flight is None else dict(zip(   # decode rows read step k-1's samples
            (rid for rid, s in zip(flight.plan.rids, flight.plan.sample) if s), tokens))
        produced = list(step_tokens(state, plan, fed))
    if flight is not None:                                          # resolve k-1
        dropped = [rid for rid in flight.plan.rids if rid in flight.gone]
        if dropped != r.get("resolve_dropped"):
            return state, None, flight, ("dropped", r.get("resolve_dropped"), dropped)
        kept, keep = flight.plan.without(flight.gone)
        state, deltas = C.resolve(state, cfg, kept, [t for t, k in zip(tokens, keep) if k])
        gone = frozenset(deltas.finished)
    launched = _Flight(plan, gone, produced) if plan.rids else None
    if launched is not None:                                        # advance k
        dropped = [rid for rid in plan.rids if rid in launched.gone]
        if dropped != r.get("advance_dropped"):
            return state, None, launched, ("dropped", r.get("advance_dropped"), dropped)
        state = C.advance(state, cfg, plan.without(launched.gone)[0])
    return state, deltas, launched, None
