"""Data-parallel training across processes with PyTorch's own engine (``torch.distributed``).

:func:`~pyro_flows_ext.train.fit` trains on several devices when it runs under ``torchrun``
(or inside a process group that the caller initialised): each process holds a replica of
the flow wrapped in :class:`torch.nn.parallel.DistributedDataParallel`, which averages the
gradients across processes during ``backward``. This module holds the few pieces ``fit``
needs around that: reading ``torchrun``'s environment, choosing the backend (NCCL on GPUs,
gloo on CPUs) and the device of each process, sharding the global batch, and reducing
metrics so that every process sees the same numbers and takes the same decisions.

How ``fit`` uses it, with ``W`` processes and ``batch_size=B``:

- ``B`` is the batch *per process*, as with ``DataLoader`` + ``DistributedSampler``; one step
  consumes a global batch of ``B * W`` examples: the slice of the epoch permutation that a
  single process with ``batch_size=B * W`` would take, cut into ``W`` contiguous shards. The
  permutation is seeded by ``(seed, epoch)`` as in a single process, so resuming at any step
  is exact and ``W`` processes follow the same trajectory as one process with a ``W`` times
  larger batch (to rounding, for continuous data; dequantization noise is drawn per process).
- ActNorm's data-dependent initialisation runs in every process on the same batch, and
  ``DistributedDataParallel``'s constructor then broadcasts process 0's parameters and
  buffers, so every replica starts from identical weights.
- Training losses and validation log-likelihoods are all-reduced: the history, early
  stopping and divergence checks are the same in every process. Only process 0 shows the
  progress bar and writes checkpoints; every process reads the checkpoint when resuming.

A launch on one machine with two GPUs (or two CPU processes, with gloo)::

    torchrun --standalone --nproc_per_node=2 -m pyro_flows_ext fit --data mnist

or from Python, in a script started by ``torchrun``::

    history = fit(flow, train, valid=valid, batch_size=64)  # 64 per process

Multi-node runs use ``torchrun``'s rendezvous (``--nnodes``, ``--rdzv-backend=c10d``,
``--rdzv-endpoint=HOST:PORT``); see the user guide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "Distributed",
    "TorchrunEnv",
    "backend_for",
    "check_distributed",
    "is_main_process",
    "process_count",
    "process_rank",
    "setup_distributed",
    "torchrun_env",
]


@dataclass(frozen=True)
class TorchrunEnv:
    """What ``torchrun`` tells each process: its global ``rank``, the ``world_size`` and its
    ``local_rank`` on the machine."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> TorchrunEnv | None:
    """The process's place in a ``torchrun`` launch, from ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK``; ``None`` outside one.

    Example:
        >>> torchrun_env() is None or torchrun_env().world_size >= 1
        True
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
            f"{os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
            f"{os.environ.get('LOCAL_RANK')!r}"
        ) from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world}")
    return TorchrunEnv(rank, world, local)


def process_rank() -> int:
    """This process's global rank: from the initialised process group, else from
    ``torchrun``'s environment, else 0.

    Example:
        >>> process_rank() >= 0
        True
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    env = torchrun_env()
    return 0 if env is None else env.rank


def process_count() -> int:
    """The number of processes of the run (1 outside ``torchrun`` and process groups)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    env = torchrun_env()
    return 1 if env is None else env.world_size


def is_main_process() -> bool:
    """Whether this is process 0, the one that prints and writes files."""
    return process_rank() == 0


def check_distributed(distributed: object) -> bool | None:
    """``distributed`` if it is ``True``, ``False`` or ``None`` (else a ``TypeError``)."""
    if not (distributed is None or isinstance(distributed, bool)):
        raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
    return distributed


def backend_for(device: torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` for the CPU.

    Example:
        >>> backend_for(torch.device("cpu"))
        'gloo'
    """
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class Distributed:
    """One process's view of a data-parallel run (``world_size == 1``: a plain run, and
    every method is the identity or a no-op).

    Attributes:
        rank, world_size: this process and the number of processes.
        device: where this process trains.
        owns_group: whether :func:`setup_distributed` created the process group (and
            :meth:`close` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Process 0: the one that logs and writes files."""
        return self.rank == 0

    @property
    def rank_key(self) -> tuple[int, ...]:
        """Extra seed key that gives each process its own random stream (empty alone)."""
        return (self.rank,) if self.enabled else ()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in ``DistributedDataParallel`` (which broadcasts process 0's parameters
        and buffers now, and averages gradients in ``backward``), or as it is alone."""
        if not self.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def shard(self, rows: Tensor) -> Tensor:
        """This process's contiguous part of ``rows`` (``tensor_split`` into ``world_size``).

        Example:
            >>> Distributed(rank=1, world_size=2).shard(torch.arange(6))
            tensor([3, 4, 5])
        """
        return torch.tensor_split(rows, self.world_size)[self.rank] if self.enabled else rows

    def sum(self, *values: float | Tensor) -> list[float]:
        """The sums of ``values`` over all processes (one float64 all-reduce)."""
        if not self.enabled:
            return [float(v) for v in values]
        parts = [torch.as_tensor(v, dtype=torch.float64).reshape(1).cpu() for v in values]
        total = torch.cat(parts).to(self.device)
        dist.all_reduce(total)
        return total.tolist()

    def mean(self, value: Tensor) -> float:
        """The mean of the scalar ``value`` over all processes."""
        if not self.enabled:
            return value.item()
        return self.sum(value.detach())[0] / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`setup_distributed` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _process_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def setup_distributed(distributed: bool | None, device: torch.device) -> Distributed:
    """The :class:`Distributed` view that :func:`~pyro_flows_ext.train.fit` trains with.

    Args:
        distributed: ``False``: one process. ``True``: data-parallel, which needs an
            initialised process group or ``torchrun``'s environment. ``None``: data-parallel
            exactly when one of those is there.
        device: the device asked for (already resolved; ``"cuda"`` without an index becomes
            ``cuda:LOCAL_RANK``). The process group is created with :func:`backend_for` it
            and ``torchrun``'s ``MASTER_ADDR``/``MASTER_PORT`` rendezvous, unless the caller
            initialised one already (which is then used and left open).

    Example:
        >>> setup_distributed(False, torch.device("cpu")).world_size
        1
    """
    if check_distributed(distributed) is False:
        return Distributed(device=device)
    env = torchrun_env()
    if dist.is_available() and dist.is_initialized():
        local = env.local_rank if env is not None else dist.get_rank()
        device = _process_device(device, local)
        return Distributed(dist.get_rank(), dist.get_world_size(), device)
    if env is None:
        if distributed:
            raise ValueError(
                "distributed=True needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, "
                "MASTER_PORT) or an initialised torch.distributed process group; launch with "
                "'torchrun --nproc_per_node=N ...'"
            )
        return Distributed(device=device)
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed support")
    device = _process_device(device, env.local_rank)
    dist.init_process_group(
        backend_for(device),
        rank=env.rank,
        world_size=env.world_size,
        device_id=device if device.type == "cuda" else None,
    )
    return Distributed(env.rank, env.world_size, device, owns_group=True)
