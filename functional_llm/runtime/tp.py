"""Tensor parallelism across processes: rank 0 drives the engine, ranks 1..N-1 are workers that
mirror every device step on their shard of the weights. Before each step rank 0 broadcasts its
host inputs over the control group (runtime/groups.py; the message: runtime/message.py, no
pickling); every rank runs the same Runner.launch on them, and since each rank computes the
full logits and sampling is counter-based, all sample the same tokens (rank 0's are read). A
pipelined step's feed reads the tokens the worker's own Runner last returned.

Start-up: spawned (rank 0 creates a TCP store on a free port and starts N-1 processes of the
torch.multiprocessing spawn context; each reports "ready" in the store, then all join the
groups) or under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set: env:// rendezvous,
nothing is spawned; a rank >= 1 serves steps inside the LLM constructor, then leaves the
process with SystemExit(0)). Every rank builds its runner with the same `build` function; the
KV pool size is the minimum over the ranks.

Failures: rank 0 checks that its spawned workers are alive and have reported no error before
each step; a worker that raises sends its traceback over a queue and exits, which closes its
sockets, so a collective rank 0 is waiting in fails at once. Either way the caller gets a
WorkerError naming the rank, and the remaining workers are stopped. Spawned workers exit when
rank 0's process ends (they watch it), and gloo groups have finite timeouts. Shutdown frees
each rank's CUDA graphs before its groups: destroying an NCCL group that live graphs captured
collectives of hangs.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from functional_llm.errors import FunctionalLLMError, InvalidConfig
from functional_llm.model.sharding import Mesh
from functional_llm.runtime.runner import Feed
from functional_llm.runtime.groups import STARTUP_TIMEOUT, Groups, join_groups, rank_device, torchrun_rank
from functional_llm.runtime.message import HEADER_LEN, STOP, decode, encode
from functional_llm.runtime.staging import HostInputs

JOIN_TIMEOUT_S = 10.0                     # a worker's exit after "stop", before it is terminated
REPORT_WAIT_S = 5.0                       # after a failed collective: wait this long for a report
FAULT_ENV = "FUNCTIONAL_LLM_TP_FAULT"     # tests: "spawn", "joined" or "step:N" fails workers


class WorkerError(RuntimeError):
    """A tensor-parallel rank failed (or the workers were shut down); the LLM cannot step."""


def _fault(where: str) -> None:
    if os.environ.get(FAULT_ENV) == where:
        raise RuntimeError(f"injected fault at {where!r} ({FAULT_ENV})")


# ---- rank 0 -----------------------------------------------------------------------------------

class _Workers:
    """Rank 0's handle on the other ranks: spawned processes (none under torchrun), their error
    queue, the groups, and a way to free rank 0's graphs. Holds no reference to the TPRunner,
    so its shutdown can be the TPRunner's finalizer."""

    def __init__(self, procs, errors):
        self.procs, self.errors = procs, errors
        self.groups: Groups | None = None
        self.failure: str | None = None
        self.release_graphs = lambda: None   # rank 0's graphs captured collectives: freed
                                             # before the groups are destroyed (else it hangs)

    def check(self, exited: str = "") -> None:
        """Raise WorkerError if a worker reported an error or is no longer running (`exited` is
        added to the account of a worker that exited)."""
        if self.failure is None and (report := self._report(exited)):
            self.fail(report)
        if self.failure is not None:
            raise WorkerError(self.failure)

    def _report(self, exited: str = "") -> str | None:
        if self.errors is not None and not self.errors.empty():
            rank, text = self.errors.get()
            return f"tensor-parallel rank {rank} failed:\n{text}"
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                return f"tensor-parallel rank {rank} exited with code {proc.exitcode}{exited}"
        return None

    def await_ready(self, store, deadline: float) -> None:
        """Wait until every spawned worker has reached the rendezvous, checking on them."""
        keys = [f"ready/{r}" for r in range(1, len(self.procs) + 1)]
        while not store.check(keys):
            self.check(" before joining: a spawned worker first imports the main module; does "
                       "the script guard its entry point with `if __name__ == '__main__':`?")
            if time.monotonic() > deadline:
                self.fail(f"tensor-parallel workers did not start within {STARTUP_TIMEOUT}")
                raise WorkerError(self.failure)
            time.sleep(0.02)

    def wait_report(self) -> str | None:
        """A worker's report (its traceback, or its exit), waiting up to REPORT_WAIT_S for one:
        a worker that crashed is the usual reason a collective breaks."""
        deadline = time.monotonic() + (REPORT_WAIT_S if self.procs else 0.0)
        while (report := self._report()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return report

    def failed(self, exc: Exception) -> WorkerError:
        """Stop everything after `exc` in a step; the error to raise (a worker's report if one
        comes, else exc's description)."""
        if self.failure is None:
            self.fail(self.wait_report() or "tensor-parallel step failed on rank 0 (under "
                      f"torchrun: see the other ranks' logs): {type(exc).__name__}: {exc}")
        return WorkerError(self.failure)

    def fail(self, reason: str) -> None:
        self.failure = reason
        self.shutdown(graceful=False)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the workers (a "stop" message, then terminate whatever has not exited within
        JOIN_TIMEOUT_S) and release the groups. Idempotent."""
        self.failure = self.failure or "the tensor-parallel workers were shut down (LLM.close())"
        self.release_graphs()
        if graceful and self.groups is not None:
            with contextlib.suppress(Exception):   # a broken group: destroyed below, after the join
                # (an int64 tensor, as every header)
                dist.broadcast(torch.tensor([STOP] + [0] * (HEADER_LEN - 1)), 0, group=self.groups.control)
                # the workers release their groups on "stop": release ours at the same time
                # (an NCCL group destroyed after its peers have exited was seen to hang)
                self.groups.destroy()
                self.groups = None
        deadline = time.monotonic() + (JOIN_TIMEOUT_S if graceful else 0.5)
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            for stop, wait in ((proc.terminate, 2.0), (proc.kill, None)):
                if proc.is_alive():
                    stop()
                    proc.join(wait)
        if self.groups is not None:
            self.groups.destroy()
            self.groups = None
        self.procs = []
        if self.errors is not None:
            self.errors.close()
            self.errors = None


class TPRunner:
    """Rank 0's Runner: each launch first broadcasts the step to the workers, then runs the
    local Runner (whose forward meets the workers' in the collectives). Any other attribute
    (model, kv, graphs, device) is the local runner's; close() stops the workers (also at
    garbage collection and at interpreter exit)."""

    def __init__(self, local, workers: _Workers):
        self.local, self._workers = local, workers
        workers.release_graphs = local.release_graphs
        self.close = weakref.finalize(self, workers.shutdown)   # runs once: close(), GC or exit

    def __getattr__(self, name: str):   # only for names TPRunner itself lacks
        return getattr(self.local, name)

    def launch(self, host: HostInputs, feed: Feed | None = None):   # -> engine.StepOut
        workers = self._workers
        workers.check()
        try:
            for part in encode(host, feed):   # header, payload (never empty: message.encode)
                dist.broadcast(torch.from_numpy(part), 0, group=workers.groups.control)
            return self.local.launch(host, feed)
        except Exception as e:
            raise workers.failed(e) from e
        except BaseException:        # interrupted half-way: the ranks are out of step
            workers.fail("a step was interrupted on rank 0; the workers were stopped")
            raise


def start(spec, build):
    """Start tensor parallelism over spec.world ranks; returns rank 0's (TPRunner, SchedConfig).
    Under torchrun a rank >= 1 instead serves steps until rank 0 stops it, then raises
    SystemExit(0). build(spec, mesh, device, agree) -> (Runner, SchedConfig) builds one rank's
    device half (a module-level function: spawned workers receive it by name)."""
    if (env := torchrun_rank()) is not None:
        rank, world, local_rank = env
        if world != spec.world:
            raise InvalidConfig("tensor_parallel_size", spec.world,
                                f"must equal WORLD_SIZE={world} when launched by torchrun")
        device = rank_device(spec, local_rank)
        groups = join_groups(device, rank, world)
        if rank > 0:
            try:
                serve(build, spec, groups, device)
            finally:
                groups.destroy()
            raise SystemExit(0)
        return _start_rank0(spec, build, _Workers([], None), lambda: groups, device)

    if dist.is_initialized():
        raise InvalidConfig("tensor_parallel_size", spec.world, "this process already has a torch."
                            "distributed default group (another LLM with tensor_parallel_size > 1 still "
                            "open?): close it first, or launch every rank with torchrun")
    device = rank_device(spec, 0)
    ctx = mp.get_context("spawn")
    # port 0: the OS picks a free one
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=STARTUP_TIMEOUT, wait_for_workers=False)
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_spawned_worker, name=f"functional_llm-tp{rank}",
                         args=(build, spec, rank, store.port, errors)) for rank in range(1, spec.world)]
    workers = _Workers([], errors)

    def join():
        for proc in procs:
            proc.start()
            workers.procs.append(proc)    # only started processes are joined at shutdown
        workers.await_ready(store, time.monotonic() + STARTUP_TIMEOUT.total_seconds())
        return join_groups(device, 0, spec.world, store)

    return _start_rank0(spec, build, workers, join, device)


def _start_rank0(spec, build, workers: _Workers, join, device):
    try:
        workers.groups = groups = join()
        local, sched = build(spec, Mesh(0, spec.world, groups.data), device, groups.agree_min)
    except WorkerError:
        raise
    except BaseException as e:
        # rank 0's own typed error (a bad model folder...) is re-raised as is; a broken
        # collective is most likely a worker's failure: raise that worker's account
        crashed = isinstance(e, Exception) and not isinstance(e, FunctionalLLMError)
        report = workers.wait_report() if crashed else None
        workers.fail(report or f"start-up failed on rank 0: {type(e).__name__}: {e}")
        if report:
            raise WorkerError(report) from e
        raise
    return TPRunner(local, workers), sched


# ---- workers ----------------------------------------------------------------------------------

def serve(build, spec, groups: Groups, device) -> None:
    """A worker rank: build this rank's runner, then run every step rank 0 broadcasts, until a
    "stop" message."""
    _fault("joined")
    runner, _ = build(spec, Mesh(groups.rank, groups.world, groups.data), device, groups.agree_min)
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    last, step = None, 0
    while True:
        dist.broadcast(header, 0, group=groups.control)
        h = header.numpy().copy()
        if h[0] == STOP:
            runner.release_graphs()     # before the caller destroys the groups
            return
        payload = torch.empty(int(h[1]), dtype=torch.uint8)
        dist.broadcast(payload, 0, group=groups.control)
        host, dst, index = decode(h, payload.numpy())
        _fault(f"step:{step}")
        last = runner.launch(host, None if dst is None else Feed(dst, last, index)).tokens
        step += 1


def _spawned_worker(build, spec, rank: int, port: int, errors) -> None:
    """Entry point of a spawned rank (rank >= 1)."""
    if (parent := mp.parent_process()) is not None:  # rank 0's process ended (even by SIGKILL): leave with it
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()
    try:
        _fault("spawn")
        if torch.device(spec.device).type == "cpu":   # share the cores with the other ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
        device = rank_device(spec, rank)
        store = dist.TCPStore("127.0.0.1", port, None, False, timeout=STARTUP_TIMEOUT)
        store.set(f"ready/{rank}", "1")
        groups = join_groups(device, rank, spec.world, store)
        serve(build, spec, groups, device)
        groups.destroy()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        os._exit(1)   # no teardown: the OS closes the sockets, which wakes rank 0's collective
