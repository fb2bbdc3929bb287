"""Training on several processes (torchrun): who this process is, and its part of every global batch.

    torchrun --nproc_per_node=N -m pipeline.cli distill JOB.yaml

Every process runs the same ``train()``. The job's batch_size stays the GLOBAL batch: the epoch's
seeded order is the single process's, and at step s rank r reads the r-th contiguous slice of
that process's batch s, so the union of the ranks' batches at every step is exactly the
single-process batch. DistributedDataParallel averages the ranks' gradients; as every loss term
is a mean over the batch and every rank holds batch_size / N samples, that average is the
gradient of the global batch's loss (within float rounding).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["World", "start", "end", "local_batch_size", "GlobalBatchSlices"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    device: torch.device
    owns_group: bool  # started here (from torchrun's environment), so ended here

    @property
    def main(self) -> bool:
        return self.rank == 0

    def counts(self, n: int) -> list[int]:
        """Every rank's n, in rank order."""
        t = torch.tensor([n], dtype=torch.int64, device=self._comm_device)
        out = [torch.zeros_like(t) for _ in range(self.size)]
        dist.all_gather(out, t)
        return [int(x.item()) for x in out]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of a (float64) tensor over all ranks."""
        t = values.to(self._comm_device, torch.float64)
        dist.all_reduce(t)
        return t.cpu()

    def from_main(self, fn: Callable):
        """fn() run on rank 0 alone, its result (or its error, raised) on every rank."""
        box = [None]
        if self.main:
            try:
                box[0] = (fn(), None)
            except Exception as e:  # raised on every rank below, so none waits forever
                box[0] = (None, e)
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        value, error = box[0]
        if error is not None:
            raise error
        return value

    def barrier(self) -> None:
        dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo takes CPU tensors (and CUDA ones)
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _rank_device(name: str, local_rank: int) -> torch.device:
    """auto / cuda → cuda:LOCAL_RANK (cpu where there is no GPU); cpu as given. An explicit cuda:N
    would put every process on the same GPU, so it is refused."""
    if name.startswith("cuda:"):
        raise ValueError(f"device {name!r} names one GPU, which every process would share; use 'cuda' or 'auto' "
                         f"(each process takes cuda:LOCAL_RANK)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"device 'cuda': process LOCAL_RANK={local_rank} has no GPU of its own "
                             f"(this machine has {torch.cuda.device_count()}); start at most that many processes")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def start(device: str) -> World | None:
    """The training processes' world, or None for a single process (no torchrun, no process group).

    Under torchrun (WORLD_SIZE > 1 in the environment) the process group is started here: gloo on
    CPU, NCCL on CUDA. A process group the caller started already (any size) is used as it is.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _rank_device(device, local_rank), owns_group=False)
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    where = _rank_device(device, local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), where, owns_group=True)


def end(world: World | None) -> None:
    """After a run: its DistributedDataParallel wrapper is freed now (it sits in a reference cycle, and
    freed at interpreter exit its gloo work aborted the process one exit in five: 'terminate called
    without an active exception'), then the process group is destroyed if the run started it."""
    if world is None:
        return
    gc.collect()
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Each rank's share of the global batch; refuses a batch the ranks cannot share equally
    (unequal shares would weigh the ranks' mean losses wrongly)."""
    if global_batch % world_size:
        raise ValueError(f"batch_size {global_batch} (the global batch) does not divide among {world_size} "
                         f"processes; use a multiple of {world_size}")
    return global_batch // world_size


class GlobalBatchSlices(Sampler[int]):
    """Rank r's part of a single-process order: at step s, the r-th contiguous slice of global batch s.

    order: the single process's sampler (its iteration gives the epoch's order); the last, partial
    global batch is dropped, as the single process's drop_last does. Read with batch_size =
    global_batch / world_size.
    """

    def __init__(self, order: Iterable[int] | Sized, global_batch: int, rank: int, world_size: int):
        self.order, self.global_batch, self.rank = order, global_batch, rank
        self.local = local_batch_size(global_batch, world_size)

    def __iter__(self) -> Iterator[int]:
        order = list(self.order)
        for start_ in range(0, len(order) - self.global_batch + 1, self.global_batch):
            first = start_ + self.rank * self.local
            yield from order[first : first + self.local]

    def __len__(self) -> int:
        return len(self.order) // self.global_batch * self.local
