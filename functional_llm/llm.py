"""LLM: the user-facing shell (tokenizer, validation, stop strings, progress, outputs) around
the Engine. Everything a user can get wrong is checked here or in core.check_request before
the engine state changes."""
from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import itertools
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import attrs
import immutables
import torch
import xxhash

from functional_llm.core.records import Request, SamplingParams
from functional_llm.core.trace import TraceWriter, header_record
from functional_llm.errors import InvalidModel, InvalidPrompt, InvalidSamplingParams
from functional_llm.model.config import load_config
from functional_llm.model.gguf import ensure_default_model
from functional_llm.outputs import Emitted, RequestOutput, apply
from functional_llm.outputs import start as start_output
from functional_llm.progress import Progress
from functional_llm.runtime.build import build_runner, check_arguments, device_spec
from functional_llm.runtime.engine import Engine

Prompt = Union[str, Sequence[int]]


class LLM(contextlib.AbstractContextManager):
    def __init__(self, model: Optional[str] = None, max_model_len: Optional[int] = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: Optional[int] = None,
                 block_size: Optional[int] = None, num_kv_blocks: Optional[int] = None,
                 enable_prefix_caching: bool = True, dtype: Optional[str] = None,
                 device: Optional[str] = None, seed: int = 0, attention_backend: Optional[str] = None,
                 enforce_eager: bool = False, trace: Optional[str] = None,
                 async_scheduling: Optional[bool] = None, tensor_parallel_size: int = 1,
                 kv_cache_dtype: str = "auto", batch_invariant: bool = False):
        """trace: a file path; every input, Plan, sampled token and core-state digest is
        written there as JSON lines (`functional-llm replay PATH` checks it).
        async_scheduling: schedule step k+1 while step k runs on the device (the pipelined
        engine, runtime/engine.py); default on for GPUs, off on CPU (where the forward runs in
        the caller's thread, nothing overlaps). Outputs are the same either way; a trace
        records whichever loop runs.
        tensor_parallel_size: split the model over this many ranks (runtime/tp.py): this
        process is rank 0 and spawns the others (on GPUs rank r uses cuda:r), or, launched by
        torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set), every rank constructs the
        LLM: rank 0's constructor returns as usual, a rank >= 1's serves steps until rank 0
        closes, then raises SystemExit(0). Call close() (or use `with LLM(...) as llm:`) to stop
        the workers; they are also stopped when the LLM is collected and at exit.
        kv_cache_dtype: "auto" (the model dtype) or "fp8" (float8 e4m3 with a scale per token
        and kv head, kernels/base.py: about twice the tokens in the same memory; the triton
        and reference backends).
        batch_invariant: a request's tokens and logprobs depend only on its own inputs, not on
        what else is in the step or how its prompt was chunked: GEMMs and norms of fixed
        tiles and order (kernels/invariant.py), attention without split-KV and one tile shape
        for decode and prefill rows (README: what it guarantees and costs). GPU only."""
        sizes = dict(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                     num_kv_blocks=num_kv_blocks, tensor_parallel_size=tensor_parallel_size)
        device = check_arguments(sizes, device)          # before the model loads
        quiet_collector()   # first collects what LLMs dropped before this one held (its pool)
        model = ensure_default_model() if model is None else model
        path, cfg = Path(model), load_config(Path(model))
        spec, _ = device_spec(path, cfg, device, dtype, attention_backend, enforce_eager,
                              kv_cache_dtype=kv_cache_dtype, batch_invariant=batch_invariant, **sizes)
        if spec.world == 1:
            runner, sched = build_runner(spec)
        else:
            from functional_llm.runtime import tp
            runner, sched = tp.start(spec, build_runner)   # torchrun rank >= 1: SystemExit(0)
        try:
            sched = attrs.evolve(sched, eos_token_ids=tuple(cfg.eos_token_ids),
                                 enable_prefix_caching=enable_prefix_caching)
            self.tokenizer, self.model_config, self.seed, self._spec = _tokenizer(path), cfg, seed, spec
            async_scheduling = device.type == "cuda" if async_scheduling is None else async_scheduling
            writer = None if trace is None else TraceWriter(trace, header_record(
                sched, _trace_shell(spec, runner.graphs, seed), pipeline=async_scheduling))
            self.engine = Engine(runner, sched, pipeline=async_scheduling, trace=writer)
        except BaseException:
            if spec.world > 1:
                runner.close()    # stop the workers now, not at exit
            raise
        self._ids = map("req-{}".format, itertools.count())   # auto request ids: req-0, req-1, ...
        # rid -> OutputState of every live request (outputs.apply); replaced, never mutated
        self._outputs = immutables.Map()
        self._decode = (functools.partial(self.tokenizer.decode, skip_special_tokens=True)
                        if self.tokenizer is not None else lambda ids: "")   # weight-only: token ids only
        quiet_collector()

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the tensor-parallel workers (tensor_parallel_size > 1); idempotent. Nothing to
        do on one device. A closed tensor-parallel LLM raises WorkerError on its next step.
        (Without close, the workers stop when the runner is collected or at exit.)"""
        getattr(getattr(getattr(self, "engine", None), "runner", None), "close", lambda: None)()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- incremental API ----------------------------------------------------------------------
    def add_request(self, prompt: Prompt, sampling_params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Validate and admit one request; returns its id. Raises before any state change.
        step() reports it, with its delta, in every step that changes it."""
        req = self._request(prompt, sampling_params, request_id)
        self._add(req, prompt, stream=True)
        return req.rid

    def abort(self, request_id: str) -> None:
        """End a live request now (its blocks are freed); no output reports it any more.
        Raises UnknownRequest for an id that is not live."""
        self.engine.finish(request_id)
        self._outputs = self._outputs.delete(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the outputs of every request that changed, each with
        delta_text / delta_token_ids (new since its previous output)."""
        return list(self._step().outputs)

    @property
    def counters(self) -> dict:
        """The engine's Counters plus gauges of its state now (the server's /metrics reads them)."""
        state = self.engine.state
        return dict(attrs.asdict(state.counters), blocks_in_use=state.blocks_in_use, num_blocks=
                    state.pool.num_blocks, num_running=len(state.running), num_waiting=len(state.waiting))

    # -- batch API ------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run the prompts to the end: one final RequestOutput per prompt, in order. Text is
        decoded once per request at its end (per step only for requests with stop strings)."""
        reqs = self._requests(prompts, sampling_params)
        done, bar = {}, Progress(reqs, self.engine.counters, use_tqdm)
        paused = gc.isenabled()
        gc.disable()    # see quiet_collector: one collection of the young records stalls a step
        try:
            for out in self._run(reqs, stream=False, on_step=bar.step):
                done[out.request_id] = out
                bar.finished(out)
        finally:
            if paused:
                gc.enable()
            bar.close()
        return [done[req.rid] for req, _ in reqs]

    def stream(self, prompt_or_prompts, sampling_params=None) -> Iterator[RequestOutput]:
        """Outputs as they come: every step, one RequestOutput per request that changed, whose
        delta_text / delta_token_ids are new since its previous one (text and token_ids stay
        cumulative); joined, the deltas give the final text. Text that may begin a stop string
        is held back until it is known not to. Arguments as generate's; they are checked here,
        before anything runs. Closing the generator early aborts its unfinished requests."""
        return self._run(self._requests(prompt_or_prompts, sampling_params), stream=True)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {'role', 'content'} dicts) or a list of them."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidModel("model", "<tokenizer>", "this model has no chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                    tokenize=False) for c in convs]
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        outs = self.generate(ids, sampling_params, use_tqdm)
        return [attrs.evolve(o, prompt=t) for o, t in zip(outs, texts)]

    # -- internals ----------------------------------------------------------------------------
    def _requests(self, prompts, sampling_params) -> list:
        """[(Request, prompt)], every one built and validated before any is admitted."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidSamplingParams("sampling_params", f"<{len(params)} items>",
                                            f"need one per prompt ({len(prompts)}) or a single one")
        else:
            _bad_params(sampling_params)
        return [(self._request(p, sp, None), p) for p, sp in zip(prompts, params)]

    def _request(self, prompt, params, request_id) -> Request:
        """The one construction of a request: built and validated here, admitted as is."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            _bad_params(params)
        ids = self._encode(prompt)
        if params.stop and self.tokenizer is None:
            raise InvalidSamplingParams("stop", params.stop, "stop strings need a tokenizer")
        if params.prompt_logprobs is not None and self._spec.world > 1:
            # (rank 0 scores prompt rows alone; a vocab-parallel head would need every rank)
            raise InvalidSamplingParams("prompt_logprobs", params.prompt_logprobs,
                                        "not served with tensor_parallel_size > 1")
        if params.top_p < 1 and self._spec.batch_invariant:   # (its softmax and cumsum: README)
            raise InvalidSamplingParams("top_p", params.top_p, "batch_invariant=True does not cover top-p yet")
        if request_id is None:   # auto ids skip ids in use, so they never collide with a user's
            rid = next(r for r in self._ids if r not in self._outputs)
        else:
            rid = str(request_id)
            if rid in self._outputs:
                raise InvalidPrompt("request_id", rid, "is already in use by a live request")
        seed = params.seed if params.seed is not None else (
            xxhash.xxh64_intdigest(f"{self.seed}:{rid}".encode()) & (2**63 - 1))
        req = Request(rid=rid, prompt=tuple(ids), params=params, seed=seed)
        self.engine.check(req)
        return req

    def _add(self, req: Request, prompt, stream: bool) -> None:
        self.engine.add(req)
        self._outputs = self._outputs.set(
            req.rid, start_output(req, prompt if isinstance(prompt, str) else None, stream))

    def _encode(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidPrompt("prompt", prompt, "this model has no tokenizer: pass token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise InvalidPrompt("prompt", prompt, "must be a str or a list of int token ids")
        if not ids:
            raise InvalidPrompt("prompt", prompt, "must not be empty")
        vocab = self.model_config.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise InvalidPrompt("prompt", bad[:5], f"token ids must be in [0, {vocab})")
        return ids

    def _step(self, on_step=None) -> Emitted:
        """One engine step folded into the outputs; requests that reached a stop string end."""
        deltas = self.engine.step()
        self._outputs, emitted = apply(self._outputs, deltas, self._decode)
        for rid in emitted.stops:
            self.engine.finish(rid, "stop")
        if on_step is not None:
            on_step(deltas, self.engine.counters)
        return emitted

    def _run(self, reqs, stream: bool, on_step=None) -> Iterator[RequestOutput]:
        """Admit reqs, step until all have finished, yield their outputs (stream: every step;
        else only the final ones). Other requests' outputs are dropped. However it ends (done,
        an error, the generator closed), no request of reqs is left running."""
        left = set()
        try:
            for req, prompt in reqs:
                self._add(req, prompt, stream)
                left.add(req.rid)
            while left:
                for out in self._step(on_step).outputs:
                    if out.request_id in left:
                        if out.finished:
                            left.discard(out.request_id)
                        yield out
        finally:
            for rid in left:
                if rid in self._outputs:
                    self._outputs = self._outputs.delete(rid)
                    if rid in self.engine.state.seqs:  # a step that failed midway may have ended it
                        self.engine.finish(rid)


GC_FIRST_THRESHOLD = 50_000


def quiet_collector() -> None:
    """Long-lived start-up objects (tokenizer, configs, modules) leave the cyclic collector's
    view, and it runs less often. Every step allocates a few thousand fresh immutable records
    (acyclic: reference counting frees them), so with the default threshold (700) the
    collector ran several times per step and its older generations, re-scanning the live
    state's token vectors, cost ~4 ms on some steps at 256 sequences (benchmarks/host_step.py).
    Process-wide, like gc.freeze itself; what an earlier LLM froze is unfrozen first, so a
    dropped LLM's cycles (its KV pool with them) are collected, not kept for good."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    # ...and return to it at exit: frozen objects are never finalized, and extension types
    # that count their live instances (triton's nanobind ones, imported by torch._dynamo)
    # then print "leaked" lines at interpreter exit
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
    first, *rest = gc.get_threshold()
    gc.set_threshold(max(first, GC_FIRST_THRESHOLD), *rest)
    # Even so, one collection of the young generation at 256 sequences took ~50 ms on the GPU
    # machine's CPU (benchmarks/throughput.py --gaps: gc_max_ms): a 50 ms hole in the device's
    # work. generate() therefore pauses the collector for its run (the per-step records are
    # acyclic: reference counting frees them) and restores it after.


def _bad_params(params):
    hint = ": build one with SamplingParams(**params)" if isinstance(params, dict) else ""
    raise InvalidSamplingParams("sampling_params", params,
                                f"must be a SamplingParams or a list of them, not a {type(params).__name__}{hint}")


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidPrompt("prompts", prompts, "must be a str, a list of ids, or a non-empty list of them")
    return [list(prompts)] if all(isinstance(t, int) for t in prompts) else list(prompts)


def _trace_shell(spec, graphs, seed: int) -> dict:
    """A trace header's shell part: what a replay with the model needs, and what can make the
    same inputs give other tokens (versions, determinism flags)."""
    import platform
    import functional_llm
    return {"model": spec.model, "dtype": spec.dtype, "device": spec.device,
            "attention_backend": spec.attention_backend, "enforce_eager": spec.enforce_eager,
            "cuda_graphs": graphs is not None, "seed": seed, "tensor_parallel_size": spec.world,
            "kv_cache_dtype": spec.kv_cache_dtype,
            "versions": {"functional_llm": functional_llm.__version__, "torch": torch.__version__,
                         "python": platform.python_version(), "xxhash": xxhash.VERSION},
            "determinism": {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                            "batch_invariant": spec.batch_invariant}}


def _tokenizer(path: Path):
    """The folder's tokenizer, or None for weight-only folders (token-id prompts only)."""
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))
