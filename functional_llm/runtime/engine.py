"""The engine: the impure shell that owns the device (weights, KV pool) and the current core
state, and drives one step as   schedule -> stage -> device step -> commit.

The state is only ever replaced, never edited: `self.state` always holds a value some pure
transition returned. The KV pool is the one in-place object (a donated buffer).
"""
from __future__ import annotations

import attrs
import torch

from functional_llm.core import commit as C
from functional_llm.core import scheduler as S
from functional_llm.core import trace as T
from functional_llm.core.records import Counters, Deltas, Request, SchedConfig, new_state
from functional_llm.runtime.graphs import DecodeGraphs
from functional_llm.runtime.sampling import gumbel_argmax, sample
from functional_llm.runtime.staging import StepInputs, stage_host, to_device
from functional_llm.model.llama import compute_logits, forward


@attrs.frozen(slots=True)
class DeviceModel:
    """What the device step closes over: weights, model config, attention backend."""

    params: dict
    cfg: object
    backend: object
    argmax_fn: object = gumbel_argmax    # a torch.compile'd copy on GPUs


def device_step(model: DeviceModel, kv: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """Model forward + sampling for one step. Writes the new tokens' K/V into kv; returns the
    sampled token ids [Bs] (still on the device: the caller decides when to sync)."""
    attn = model.backend.prepare(inputs.attn)
    hidden = forward(model.params, model.cfg, inputs.input_ids, inputs.positions, attn, kv,
                     model.backend)
    logits = compute_logits(model.params, model.cfg, hidden[inputs.sample_rows.long()])
    return sample(logits, inputs.sampling, model.argmax_fn)


class Engine:
    """Incremental API: add_request / step / abort. Not thread-safe (one caller drives it)."""

    def __init__(self, model: DeviceModel, kv: torch.Tensor, sched: SchedConfig, device,
                 cuda_graphs: bool = False, trace: T.TraceWriter | None = None):
        """cuda_graphs: replay decode steps from CUDA graphs; kv then holds one extra block
        past the pool (index sched.num_blocks) that padded graph rows write into.
        trace: records every input, Plan, token and state digest (core/trace.py)."""
        self.model, self.kv, self.sched, self.device = model, kv, sched, device
        self.trace = trace
        self.state = new_state(sched)
        self._arrivals = 0
        self.graphs = None
        if cuda_graphs:
            assert kv.shape[2] == sched.num_blocks + 1, "graphs need the scratch block"
            self.graphs = DecodeGraphs(self._graph_step, sched.max_num_seqs,
                                       -(-sched.max_model_len // sched.block_size), sched.num_blocks,
                                       sched.block_size, sched.max_model_len, device)

    def _graph_step(self, inputs: StepInputs) -> torch.Tensor:
        with torch.inference_mode():
            return device_step(self.model, self.kv, inputs)

    # -- inputs from outside core ---------------------------------------------------------
    def check(self, req: Request) -> None:
        """Raise the typed error add() would raise, without admitting anything."""
        S.check_request(self.sched, req)

    def add(self, rid: str, prompt, params, seed: int) -> None:
        req = Request(rid, tuple(prompt), params, seed, self._arrivals)
        self.state = S.admit(self.state, self.sched, req)  # raises before any change
        self._arrivals += 1
        if self.trace is not None:
            self.trace.write(T.arrival_record(req, self.state.counters.steps))

    def finish(self, rid: str, reason: str = "abort") -> None:
        """End a request for a reason decided outside core (stop string, abort)."""
        self.state = C.finish(self.state, rid)
        if self.trace is not None:
            self.trace.write(T.finish_record(rid, reason, self.state.counters.steps))

    def has_unfinished(self) -> bool:
        return bool(self.state.waiting or self.state.running)

    @property
    def counters(self) -> Counters:
        return self.state.counters

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> Deltas:
        state, plan = S.schedule(self.state, self.sched)
        if not plan.rids:
            self.state, tokens, deltas = state, [], Deltas()
        else:
            tokens = self.device_tokens(state, plan)
            self.state, deltas = C.commit(state, self.sched, plan, tokens)
        if self.trace is not None:
            self.trace.write(T.step_record(state.counters.steps - 1, plan, tokens, self.state, deltas))
        return deltas

    def device_tokens(self, state, plan) -> list:
        """Run the device step for a scheduled (state, plan): writes the KV, returns the sampled
        tokens. Also what `functional-llm replay --model` calls for each recorded step."""
        host = stage_host(state, plan, self.sched.block_size)
        if self.graphs is not None and self.graphs.fits(host):
            return self.graphs.run(host).tolist()
        with torch.inference_mode():
            return device_step(self.model, self.kv, to_device(host, self.device)).tolist()
