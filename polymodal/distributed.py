"""Where this process stands in a distributed job: rank and world size.

An initialised torch.distributed group wins; otherwise the launcher's environment is read: torchrun, the
DeepSpeed launcher and `accelerate launch` set RANK/WORLD_SIZE, SLURM's srun sets SLURM_PROCID/SLURM_NTASKS,
and Open MPI sets OMPI_COMM_WORLD_RANK/SIZE.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

_ENV_PAIRS = (
    ("RANK", "WORLD_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
)


@dataclass(frozen=True)
class Placement:
    rank: int = 0
    world_size: int = 1


def placement() -> Placement:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return Placement(dist.get_rank(), dist.get_world_size())
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    for rank_var, world_var in _ENV_PAIRS:
        if rank_var in os.environ and world_var in os.environ:
            return Placement(int(os.environ[rank_var]), int(os.environ[world_var]))
    return Placement()


# Inside `local_only()`, code that would talk to the other ranks (the contrastive losses' all-gathers) acts as a
# world of one. A context variable, so it holds for this call stack only and ends with the `with` block.
_local_only: ContextVar[bool] = ContextVar("polymodal_local_only", default=False)


@contextmanager
def local_only() -> Iterator[None]:
    """Run work one rank does alone (counting a batch's FLOPs before training) with world-of-one semantics: no
    collective is called, so nothing waits for the other ranks and NCCL is never handed CPU tensors."""
    token = _local_only.set(True)
    try:
        yield
    finally:
        _local_only.reset(token)


def collective_world() -> tuple[int, int]:
    """(rank, world size) for collectives: those of the initialised process group, or (0, 1) without one or
    inside `local_only()`."""
    import torch.distributed as dist

    if _local_only.get() or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()
