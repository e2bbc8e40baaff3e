"""One tensor-parallel rank's process groups: the data group the forward's collectives use (the
default group) and the control group the step messages travel on; joining them (a TCP store
or torchrun's env://), and the rank's device."""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import attrs
import torch
import torch.distributed as dist

from functional_llm.errors import InvalidConfig

STARTUP_TIMEOUT = timedelta(minutes=30)   # rank 0 waiting for workers to join and load weights
STEP_TIMEOUT = timedelta(minutes=10)      # one collective of the forward
IDLE_TIMEOUT = timedelta(days=30)         # a worker waiting for the next step (the user may idle)
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@attrs.frozen(slots=True)
class Groups:
    """One rank's process groups: data (the model's collectives) and control (step messages)."""

    rank: int
    world: int
    data: object = attrs.field(eq=False)
    control: object = attrs.field(eq=False)
    owns_default: bool = True     # the default group was created here (destroyed on shutdown)

    def agree_min(self, n: int) -> int:
        """The minimum of n over the ranks (the KV pool size every rank can hold)."""
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def destroy(self) -> None:
        for group, mine in ((self.control, True), (None, self.owns_default)):
            if mine and dist.is_initialized():
                with contextlib.suppress(Exception):   # already gone (a failed rank): nothing
                    dist.destroy_process_group(group)     # left to release


def join_groups(device: torch.device, rank: int, world: int, store=None) -> Groups:
    """Join (or reuse, under torchrun) the default group (NCCL between GPUs, else gloo), then
    create the control group (gloo: the step messages are host arrays)."""
    if owns := not dist.is_initialized():
        where = {"store": store} if store is not None else {"init_method": "env://"}
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=STEP_TIMEOUT, **where)
    elif dist.get_world_size() != world:
        raise InvalidConfig("tensor_parallel_size", world, "the torch.distributed default group "
                            f"of this process has {dist.get_world_size()} ranks")
    control = dist.new_group(backend="gloo", timeout=STARTUP_TIMEOUT if rank == 0 else IDLE_TIMEOUT)
    return Groups(rank, world, dist.group.WORLD, control, owns)


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world, local rank) when launched by torchrun (or with its variables set)."""
    if not all(k in os.environ for k in _TORCHRUN_ENV):
        return None
    rank = int(os.environ["RANK"])
    return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))


def rank_device(spec, local_rank: int) -> torch.device:
    """The device of a rank: on GPUs cuda:<local rank>, made current."""
    device = torch.device(spec.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device
