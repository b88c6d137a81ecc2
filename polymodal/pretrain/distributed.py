"""Start the process group from whichever launcher started us.

torchrun, the DeepSpeed launcher and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. `srun` alone sets only SLURM_* variables, so they are mapped here (the rendezvous host is the
first node of the job). A plain `polymodal pretrain` is a world of one. CUDA gets NCCL, CPU gets gloo.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list ('gpu[003-005,9],cpu1' -> 'gpu003'); scontrol when present."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    """A TCP port free on this host right now (for a private rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fill_environment() -> str:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT present; returns the launcher's name."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        if "ACCELERATE_DYNAMO_BACKEND" in env or "ACCELERATE_MIXED_PRECISION" in env:
            launcher = "accelerate"
        elif "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        else:
            launcher = "deepspeed" if "CROSS_RANK" in env or "LOCAL_SIZE" in env else "env"
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
        return launcher
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # Same port on every task without talking: derived from the job id.
        env.setdefault("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return "single"


def use_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import time; without CUDA it must be told to use the CPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _local_world() -> tuple[int, int, int, torch.device, str, str]:
    """Rank, world size, local rank, this rank's device and backend, launcher: from the launcher's environment."""
    launcher = _fill_environment()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return rank, world_size, local_rank, torch.device("cuda", torch.cuda.current_device()), "nccl", launcher
    return rank, world_size, local_rank, torch.device("cpu"), "gloo", launcher


def init_distributed(timeout_minutes: float = 30) -> World:
    use_cpu_accelerator_if_no_gpu()
    world = World(*_local_world())

    import deepspeed

    deepspeed.init_distributed(dist_backend=world.backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(minutes=timeout_minutes))
    return world


def start_process_group(timeout_minutes: float = 30) -> World:
    """Plain torch.distributed (no DeepSpeed) under any launcher; a single process starts no group at all."""
    world = World(*_local_world())
    if world.world_size > 1:
        torch.distributed.init_process_group(world.backend, timeout=timedelta(minutes=timeout_minutes))
    return world


def patient_barrier(world: World, hours: float = 24) -> None:
    """A barrier for waits that may outlast the process group's time-out, such as rank 0 consolidating and
    exporting a large ZeRO-3 checkpoint while the others wait: a gloo group of its own with a long time-out (a
    CPU barrier, so NCCL's watchdog has nothing pending meanwhile)."""
    if world.world_size == 1 or not torch.distributed.is_initialized():
        return
    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(hours=hours))
    torch.distributed.barrier(group=group)
    torch.distributed.destroy_process_group(group)


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
