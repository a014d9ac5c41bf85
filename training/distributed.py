"""Data-parallel training over processes (PyTorch DDP), as launched by `torchrun`.

Semantics, chosen so that N processes train the model single-process training would:

- **Same global batch.** `TrainConfig.batch_size` is the global batch. Every rank draws the same
  permutation (one numpy generator seeded with `TrainConfig.seed` on every rank) and takes a
  contiguous share of each global batch (`Distributed.shard`), so the global batches, their order
  and the number of optimiser steps per epoch do not depend on the number of processes. `lr` is
  therefore left as it is: no linear scaling, since the effective batch does not change.
- **Same loss.** Each rank multiplies its mean loss by `Shard.scale` (its share of the global
  batch's examples, or of its loss terms, times N); DDP averages gradients over ranks, so every
  rank steps with the gradient of the global batch's mean loss, whatever the split (an uneven
  last batch included).
- **Same initial weights.** DDP broadcasts rank 0's parameters when it wraps the model, and a
  resumed run broadcasts rank 0's checkpoint.
- Dropout streams are seeded `seed + rank`, as in nanoGPT: a process's masks cover only its rows,
  so they cannot match single-process training's masks anyway; everything else does (up to the
  order of floating-point sums in the gradient all-reduce).

Rank 0 alone evaluates, writes checkpoints, history, curves and results, and broadcasts the
validation metrics, so every rank takes the same early-stopping decision. The backend is gloo on
the CPU and NCCL on CUDA, one GPU per process (`cuda:LOCAL_RANK`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rank 0 validates alone while the other ranks wait in a collective: allow a long validation.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Shard:
    """One rank's part of a global batch."""

    rows: np.ndarray  # (b,) row indices of the training examples, never empty
    offset: int  # position of rows[0] within the global batch
    scale: float  # factor on this rank's mean loss: the mean over ranks is the global mean loss


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the process group; the default is single-process training."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "gloo" | "nccl" when the process group is up

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU (`cuda:LOCAL_RANK`) when training on CUDA."""
        if device.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, rows: np.ndarray, sizes: np.ndarray | None = None) -> Shard:
        """This rank's contiguous share of the global batch `rows`.

        `sizes[row]` is how many terms a row adds to the mean loss (default 1 per row; SASRec
        averages over the real positions of its windows). A rank left without rows (a last batch
        smaller than the world) gets the batch's first row with scale 0: DDP needs every rank to
        take part in every step, and a zero-weight row adds nothing to the gradient.
        """
        if not self.enabled:
            return Shard(rows=rows, offset=0, scale=1.0)
        mine = np.array_split(np.arange(len(rows)), self.world_size)[self.rank]
        if len(mine) == 0:
            return Shard(rows=rows[:1], offset=0, scale=0.0)
        if sizes is None:
            share = len(mine) / len(rows)
        else:
            weights = sizes[rows]
            share = float(weights[mine].sum()) / float(weights.sum())
        return Shard(rows=rows[mine], offset=int(mine[0]), scale=share * self.world_size)

    def wrap(self, model: nn.Module, loss_fn: Callable[[Any], Tensor]) -> Callable[[Any], Tensor]:
        """`loss_fn` as a step whose backward all-reduces `model`'s gradients (DDP).

        DDP hooks the gradients of the parameters used inside its forward, so a loss closure
        that calls the bare model works unchanged once it runs inside a DDP-wrapped module.
        """
        if not self.enabled:
            return loss_fn
        on_gpu = next(model.parameters()).device.type == "cuda"
        # static_graph: the same parameters take part in every step, and those that never do
        # (e.g. the s2i projection when its weight is 0) keep a None gradient, as without DDP.
        ddp = DistributedDataParallel(
            _LossModule(model, loss_fn),
            device_ids=[self.local_rank] if on_gpu else None,
            static_graph=True,
        )

        def step(batch: Any) -> Tensor:
            loss: Tensor = ddp(batch)
            return loss

        return step

    def mean(self, value: float) -> float:
        """The mean of `value` over ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]  # type: ignore[return-value]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's `module`."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def _comm_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


SINGLE = Distributed()


class _LossModule(nn.Module):
    """A module whose forward is a loss closure over `model`: what DDP wraps."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any], Tensor]) -> None:
        super().__init__()
        self.model = model  # registered, so DDP sees (and synchronises) its parameters
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(batch)


GROUP_BATCHES = 50  # batches per length-sorted group (the megabatch of HF's LengthGroupedSampler)


def global_batches(
    rng: np.random.Generator, n: int, batch_size: int, lengths: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """One epoch's global batches of row indices: a permutation of `n` rows drawn from `rng`, in
    chunks of `batch_size`. Every rank calls it with an identically seeded `rng`.

    With `lengths` (n,), batches group rows of similar length: the permutation is cut into
    groups of GROUP_BATCHES batches, each group sorted by length (ties in permutation order) and
    chunked, and the epoch's batches are then shuffled. Every row still comes once an epoch."""
    order = rng.permutation(n)
    if lengths is None:
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
        return
    if lengths.shape != (n,):
        raise ValueError(f"lengths must have shape ({n},), got {lengths.shape}")
    group = GROUP_BATCHES * batch_size
    batches = []
    for g in range(0, n, group):
        rows = order[g : g + group]
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
        batches += [rows[b : b + batch_size] for b in range(0, len(rows), batch_size)]
    for i in rng.permutation(len(batches)):
        yield batches[i]


def env_world_size() -> int:
    """The world size a launcher (torchrun) set in the environment, 1 when none did."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def launched(device: str = "auto") -> Iterator[Distributed]:
    """The process group described by torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), torn down on exit; single-process training when WORLD_SIZE is
    unset or 1.

    The backend follows the device: NCCL when `device` resolves to CUDA (one GPU per process,
    `cuda:LOCAL_RANK`), gloo otherwise.
    """
    world = env_world_size()
    if world <= 1:
        yield SINGLE
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=TIMEOUT)
    log.info("rank %d of %d (local rank %d), backend %s", rank, world, local_rank, backend)
    try:
        yield Distributed(rank=rank, world_size=world, local_rank=local_rank, backend=backend)
    finally:
        dist.destroy_process_group()
