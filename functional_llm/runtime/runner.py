"""The device half of a step: `device_step` (the model forward, logits and sampler as one
function over the weights, the KV pool and the staged inputs), `compile_step` (the same, one
torch.compile'd function), and the Runner that owns weights, pool and step graphs and
launches each step, eagerly or replayed from its CUDA graph. The engine (runtime/engine.py)
drives it; every tensor-parallel rank runs the same Runner on the same host inputs.
"""
from __future__ import annotations

import functools
import types

import attrs
import numpy as np
import torch

from functional_llm.core.records import SchedConfig
from functional_llm.model.llama import compute_logits, forward
from functional_llm.runtime.graphs import StepGraphs
from functional_llm.runtime.sampling import sample, token_logprobs
from functional_llm.runtime.staging import HostInputs, StepInputs, to_device


@attrs.frozen(slots=True)
class DeviceModel:
    """What the device step closes over: weights, model config, attention backend, and the
    tensor-parallel mesh (None on one device)."""

    params: dict
    cfg: object
    backend: object
    mesh: object = None


def device_step(model: DeviceModel, kv: torch.Tensor, inputs: StepInputs) -> tuple:
    """Model forward + sampling for one step; inputs.attn already went through the backend's
    `prepare` (host work, outside any compiled region). Writes the new tokens' K/V into kv;
    returns (sampled ids [Bs], their rows' raw logits [Bs, V] in the model dtype, final hidden
    [T, E]), still on the device (the caller decides when to sync; logits and hidden serve
    logprobs, and cost nothing more: both are materialised anyway; a float32 copy of the
    logits would be a [Bs, V] write every step, so the sampler and logprobs widen them as
    they read them)."""
    hidden = forward(model.params, model.cfg, inputs.input_ids, inputs.positions, inputs.attn,
                     kv, model.backend, model.mesh)
    logits = compute_logits(model.params, model.cfg, hidden[inputs.sample_rows], model.mesh, dtype=None)
    return sample(logits, inputs.sampling), logits, hidden


@attrs.frozen(slots=True)
class StepOut:
    """A launched step's outputs on the device: tokens [Bs], and the logprobs the step's
    requests asked for (token_logprobs' four tensors, or None; prompt: the same for the
    prompt tokens of prompt_logprobs requests)."""

    tokens: torch.Tensor
    logprobs: tuple | None = None
    prompt: tuple | None = None


def compile_step(model: DeviceModel, backend: str | None = None):
    """device_step as one torch.compile'd function (fullgraph: any graph break is an error),
    by default through `piecewise` (Inductor): it fuses norms, rope, residual adds,
    activation, casts and the sampler's passes with their neighbours; attention (+ KV write)
    stays one registered op per layer and the collectives are functional. Shapes of tokens
    and rows are dynamic (the graphs mark them), so one compile per sampler mode serves every
    bucket. Each call compiles a fresh copy of device_step's code object: Dynamo keeps
    compiled entries (and counts recompiles) per code object, so each LLM's compiled step
    lives and dies with it, and a process that makes many LLMs never reaches the recompile
    limit."""
    def step(kv: torch.Tensor, inputs: StepInputs) -> tuple:
        return device_step(model, kv, inputs)
    fresh = types.FunctionType(step.__code__.replace(), step.__globals__, "step", None, step.__closure__)
    return torch.compile(fresh, fullgraph=True, backend=backend or piecewise)


def piecewise(gm: torch.fx.GraphModule, example_inputs: list, compiler=None):
    """The compiled step's torch.compile backend. Dynamo traces the whole step as one graph;
    it is cut at each registered op (attention + KV write: opaque to Inductor anyway, so no
    fusion is lost) and Inductor compiles the pieces between the cuts one by one. The pieces
    from one layer's attention to the next are the same graph in every layer, so all but the
    first come from Inductor's cache, and the two sampler modes share every piece but the
    last: start-up compiles about three layers' worth per mode instead of the whole model.
    The ops run between the pieces as they are, writing the pool in place. compiler(piece,
    example inputs) -> callable: Inductor's compile_fx unless given (tests)."""
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.passes.split_module import split_module
    compiler = compiler or compile_fx
    piece, ids, opaque = 0, {}, set()
    for node in gm.graph.nodes:
        cut = node.op == "call_function" and str(node.target).startswith("functional_llm.")
        ids[node] = piece = piece + cut
        opaque |= {f"submod_{piece}"} if cut else set()
        piece += cut
    split = split_module(gm, None, ids.__getitem__, keep_original_order=True)

    class CompilePieces(torch.fx.Interpreter):     # runs the pieces on fake inputs
        def call_module(self, target, args, kwargs):
            out = super().call_module(target, args, kwargs)
            if target not in opaque:
                split.__dict__[target] = compiler(getattr(split, target), list(args))
            return out

    fake_mode = torch._guards.detect_fake_mode()
    with fake_mode, torch._dispatch.python.enable_python_dispatcher():
        CompilePieces(split).run(*[fake_mode.from_tensor(t) if isinstance(t, torch.Tensor)
                                   else t for t in example_inputs])
    return split


@attrs.frozen(slots=True)
class Feed:
    """Input ids the host does not know yet: ids[dst[i]] = src[index[i]], src being the
    previous step's sampled tokens, still on the device (the pipelined engine)."""

    dst: np.ndarray      # [F] int64 rows of the step's input ids
    src: torch.Tensor    # [Bs'] the previous step's tokens on the device
    index: np.ndarray    # [F] int64 rows of src


PROMPT_SLICE = 1024   # prompt-logprob rows scored at once


class Runner:
    """The device half of a step: host inputs in, sampled tokens (on the device) out. Owns the
    weights, the KV pool and the step graphs. Rank 0 and every tensor-parallel worker run
    the same Runner on the same host inputs."""

    def __init__(self, model: DeviceModel, kv: torch.Tensor, sched: SchedConfig, device,
                 cuda_graphs: bool = False, compiled: bool = False):
        """compiled: the step is compile_step(model). cuda_graphs: every step is replayed from
        a graph captured here, at start-up (runtime/graphs.py); kv then holds one extra block
        past the pool (index sched.num_blocks) that padding writes into."""
        self.model, self.kv, self.device = model, kv, device
        self.step_fn = compile_step(model) if compiled else functools.partial(device_step, model)
        self.graphs = None
        if cuda_graphs:
            assert kv.shape[2] == sched.num_blocks + 1, "graphs need the scratch block"
            self.graphs = StepGraphs(self._graph_step, sched.max_num_seqs, sched.max_num_batched_tokens,
                                     -(-sched.max_model_len // sched.block_size), sched.num_blocks,
                                     sched.block_size, sched.max_model_len, device, mark_dynamic=compiled)
            self.graphs.capture_all()

    def release_graphs(self) -> None:
        """Free the step graphs (later steps run eagerly): before a process group whose
        collectives they captured is destroyed."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def _graph_step(self, inputs: StepInputs) -> tuple:
        with torch.inference_mode():
            return self.step_fn(self.kv, self._prepared(inputs))

    def _prepared(self, inputs: StepInputs) -> StepInputs:
        return attrs.evolve(inputs, attn=self.model.backend.prepare(inputs.attn))

    def launch(self, host: HostInputs, feed: Feed | None = None) -> StepOut:
        """Queue the step on the device; returns its outputs without waiting for them."""
        with torch.inference_mode():
            if self.graphs is not None:
                tokens, logits, hidden = self.graphs.run(host, feed)
            else:
                inputs = to_device(host, self.device)
                if feed is not None and len(feed.dst):
                    inputs.input_ids.index_copy_(0, _dev(feed.dst, self.device),
                                                 feed.src[_dev(feed.index, self.device)])
                tokens, logits, hidden = self.step_fn(self.kv, self._prepared(inputs))
            return StepOut(tokens, *self._logprobs(host, tokens, logits, hidden))

    def _logprobs(self, host: HostInputs, tokens, logits, hidden) -> tuple:
        """Only for steps whose requests ask (the others pay nothing): the sampled tokens'
        logprobs from the step's logits; the prompt tokens' from logits of their rows'
        hidden states, computed in slices of <= PROMPT_SLICE rows (vocab-wide rows are big)."""
        sampled = prompt = None
        if host.logprobs_k >= 0:
            sampled = token_logprobs(logits[:len(tokens)], tokens, host.logprobs_k)
        if host.prompt_k >= 0:
            m, rows, ids = self.model, _dev(host.prompt_rows, self.device), _dev(host.prompt_ids, self.device)
            parts = [token_logprobs(compute_logits(m.params, m.cfg, hidden[rows[i:i + PROMPT_SLICE]], m.mesh),
                                   ids[i:i + PROMPT_SLICE], host.prompt_k)
                     for i in range(0, len(rows), PROMPT_SLICE)]
            prompt = tuple(torch.cat(p) for p in zip(*parts)) if parts else None
        return sampled, prompt


def _dev(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(a).to(device, non_blocking=True)

