"""Where this process stands in a distributed job: rank and world size.

An initialised torch.distributed group wins; otherwise the launcher's environment is read: torchrun, the
DeepSpeed launcher and `accelerate launch` set RANK/WORLD_SIZE, SLURM's srun sets SLURM_PROCID/SLURM_NTASKS,
and Open MPI sets OMPI_COMM_WORLD_RANK/SIZE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
